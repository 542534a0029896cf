"""Reading a run directory: metrics.jsonl (tolerant of crash-truncated lines and non-finite values) and
config.yaml, and small helpers over the step records shared by the plots and the summary.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PLOTS = ("loss.png", "grad_norm.png", "max_logit.png", "expert_load.png", "load_imbalance.png", "throughput.png")
SUMMARY = "summary.txt"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
              "-infinity": -math.inf}
_LAYER_KEY = re.compile(r"^(?P<prefix>.+)/layer(?P<layer>\d+)$")
_FIGSIZE = (10.0, 4.0)
_DPI = 120
_MAX_HEATMAP_COLUMNS = 1000  # at most this many step bins per heatmap panel (fewer for small panels)


# --- reading ------------------------------------------------------------------------------------


def _decode(value: Any) -> Any:
    """The JSONL writes non-finite floats as null (older runs: as strings "nan", "inf", "-inf"): turn them back
    into floats. A null is NaN whatever the key (an older run's `"mfu": null`, no peak known, reads as "no value"
    either way: the plots and the summary skip non-finite values)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _NONFINITE.get(value.strip().lower(), value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All records of a JSONL file, and how many lines could not be parsed (e.g. one cut short by a crash)."""
    records, bad = [], 0
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                if "null" in line or '"nan"' in line or 'inf"' in line.lower():  # only then can a value be non-finite
                    rec = {k: _decode(v) for k, v in rec.items()}
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _metrics_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():  # `python -m train.report runs/x/metrics.jsonl` works too
        return run_dir
    return run_dir / "metrics.jsonl"


def load_records(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training step records, validation records) of a run, each sorted by step.

    Non-finite values (written as null, or as strings by older runs) come back as float NaN / inf; unparsable
    lines (a crash mid-write) are skipped;
    when a step appears twice (a resumed run whose log was not truncated) the later record wins.
    Raises FileNotFoundError naming the path when the run has no metrics.jsonl.
    """
    steps, evals, _ = _load(run_dir)
    return steps, evals


def _load(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {Path(run_dir)}: {path} does not exist")
    records, bad = _read_jsonl(path)
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        if rec.get("split") == "val" or ("val_loss" in rec and "loss" not in rec):
            evals[int(step)] = rec
        elif rec.get("split") in (None, "train"):
            steps[int(step)] = rec
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)], bad


def load_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's resolved config (`config.yaml`) as plain dicts, or None when it is missing or unreadable."""
    run_dir = Path(run_dir)
    path = (run_dir.parent if run_dir.is_file() else run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text())
    except Exception:  # a half-written or foreign file: report without it
        return None
    return cfg if isinstance(cfg, dict) else None


# --- series helpers -----------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A record value as a float (NaN/Inf kept), or None when absent or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _finite(value: Any) -> bool:
    v = _num(value)
    return v is not None and math.isfinite(v)


def _series(steps: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for the records that have `key` as a number; non-finite y become NaN (a gap in the line)."""
    xs, ys = [], []
    for rec in steps:
        v = _num(rec.get(key))
        if v is None:
            continue
        xs.append(rec["step"])
        ys.append(v if math.isfinite(v) else math.nan)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _layer_keys(steps: Iterable[dict[str, Any]], prefix: str) -> dict[int, str]:
    """{layer: key} for the keys `prefix/layer{i}` present in any record, sorted by layer."""
    found: dict[int, str] = {}
    for rec in steps:
        for key in rec:
            m = _LAYER_KEY.match(key)
            if m and m.group("prefix") == prefix:
                found[int(m.group("layer"))] = key
    return dict(sorted(found.items()))


def _nonfinite_steps(steps: Sequence[dict[str, Any]]) -> list[int]:
    """Steps whose loss or gradient norm is NaN/Inf (the trainer skipped their update)."""
    out = []
    for rec in steps:
        vals = [_num(rec.get(k)) for k in ("loss", "grad_norm")]
        if any(v is not None and not math.isfinite(v) for v in vals):
            out.append(rec["step"])
    return out


def _spike_steps(steps: Sequence[dict[str, Any]]) -> list[int]:
    return [rec["step"] for rec in steps if rec.get("spike") is True]


def _has(steps: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any record has a finite value for `key` (a series of only NaN / null has nothing to plot)."""
    return any(_finite(rec.get(key)) for rec in steps)


def _tau(cfg: dict[str, Any] | None) -> float | None:
    optim = (cfg or {}).get("optim")
    return _num(optim.get("qk_clip_tau")) if isinstance(optim, dict) else None


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_steps(steps: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps) - limit} more)" if len(steps) > limit else "")


# --- figures ------------------------------------------------------------------------------------


