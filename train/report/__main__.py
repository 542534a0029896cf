"""`python -m train.report RUN_DIR [--out DIR]`: print the summary and the files written."""

from __future__ import annotations

import argparse
import sys

from train.report.plots import MatplotlibMissing
from train.report.summary import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Plots (loss, grad norm, max logit vs tau, expert load, throughput) and a text summary of "
                    "a run, from its metrics.jsonl and config.yaml. Needs no network and no wandb.",
    )
    parser.add_argument("run_dir", help="the run directory (train.out_dir), holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MatplotlibMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary, end="")
    print("wrote:")
    for p in report.files:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
