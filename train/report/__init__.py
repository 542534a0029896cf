"""Offline report of a run: PNG plots and a text summary from the run directory's `metrics.jsonl`.

    python -m train.report RUN_DIR [--out DIR]

Reads only local files (`metrics.jsonl`, `config.yaml`), needs no network and never imports wandb. Plots are
drawn with matplotlib's Agg canvas (no display, no global backend switch). Every plot degrades gracefully:
when the records lack its keys (an older run, a dense model, a crash after one line), it is skipped and the
summary says why. See docs/report.md for how to read each figure.
"""

from train.report.records import load_records, load_run_config
from train.report.summary import Report, build_report, render, summarize

__all__ = ["Report", "build_report", "load_records", "load_run_config", "render", "summarize"]
