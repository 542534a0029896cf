"""Offline report of a run: PNG plots and a text summary from the run directory's `metrics.jsonl`.

    python -m train.report RUN_DIR [--out DIR]

Reads only local files (`metrics.jsonl`, `config.yaml`), needs no network and never imports wandb. Plots are
drawn with matplotlib's Agg canvas (no display, no global backend switch). Every plot degrades gracefully:
when the records lack its keys (an older run, a dense model, a crash after one line), it is skipped and the
summary says why. See docs/report.md for how to read each figure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
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
_MAX_HEATMAP_COLUMNS = 1000  # longer runs are averaged into this many step bins per panel


# --- reading ------------------------------------------------------------------------------------


def _decode(value: Any) -> Any:
    """The JSONL writes non-finite floats as strings ("nan", "inf", "-inf"): turn them back into floats."""
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
                records.append({k: _decode(v) for k, v in rec.items()})
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

    Non-finite values written as strings come back as floats; unparsable lines (a crash mid-write) are skipped;
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
    return any(_num(rec.get(key)) is not None for rec in steps)


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


def _figure(figsize: tuple[float, float] = _FIGSIZE, **kwargs: Any) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is a dev extra, not a training dependency
        raise RuntimeError("the report needs matplotlib: pip install 'matplotlib>=3.7' "
                           "(or pip install -e '.[dev]')") from e
    fig = Figure(figsize=figsize, dpi=_DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, *, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _points_at(x: np.ndarray, y: np.ndarray, wanted: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) points of a series at the `wanted` steps where y is finite (for markers on a line)."""
    keep = np.isin(x.astype(int), list(wanted)) & np.isfinite(y)
    return x[keep], y[keep]


def _log_scale_fits(y: np.ndarray) -> bool:
    """Log-y when every finite value is positive and they span more than a factor of 20."""
    y = y[np.isfinite(y)]
    return y.size > 1 and bool((y > 0).all()) and float(y.max() / y.min()) > 20.0


def _mark_nonfinite(ax: Any, bad: Sequence[int], label: str = "non-finite (update skipped)") -> None:
    """Red crosses along the top edge of the axes at the given steps (their y value is not plottable)."""
    if not bad:
        return
    trans = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    ax.scatter(bad, [0.97] * len(bad), transform=trans, marker="x", color="red", s=40, zorder=5, label=label,
               clip_on=False)


def plot_loss(steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    x, y = _series(steps, "loss")
    ax.plot(x, y, color="tab:blue", lw=1.2, label="train loss (lm + balance)")
    if _has(steps, "lm_loss"):
        xl, yl = _series(steps, "lm_loss")
        ax.plot(xl, yl, color="tab:green", lw=1.0, alpha=0.8, label="lm loss")
    if _has(steps, "loss_baseline"):
        xb, yb = _series(steps, "loss_baseline")
        ax.plot(xb, yb, color="gray", lw=1.0, ls="--", label="spike baseline (running mean)")
    ev = [(r["step"], _num(r.get("val_loss"))) for r in evals if _num(r.get("val_loss")) is not None]
    if ev:
        ax.plot([s for s, _ in ev], [v if math.isfinite(v) else math.nan for _, v in ev], "o-", color="tab:orange",
                ms=5, lw=1.0, label="val loss")
    spikes = set(_spike_steps(steps))
    if spikes:
        ax.scatter(*_points_at(x, y, spikes), marker="v", color="red", s=60, zorder=6,
                   label=f"loss spike ({len(spikes)})")
    _mark_nonfinite(ax, _nonfinite_steps(steps))
    if _log_scale_fits(np.concatenate([y, np.asarray([v for _, v in ev], dtype=float)])):
        ax.set_yscale("log")
    ax.set(title="Loss", xlabel="step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_grad_norm(steps: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    x, y = _series(steps, "grad_norm")
    ax.plot(x, y, color="tab:purple", lw=1.0, label="grad norm (before clipping)")
    _mark_nonfinite(ax, _nonfinite_steps(steps))
    if _log_scale_fits(y):
        ax.set_yscale("log")
    ax.set(title="Gradient norm", xlabel="step", ylabel="global L2 norm")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_max_logit(steps: Sequence[dict[str, Any]], tau: float | None, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    layers = _layer_keys(steps, "attn/max_logit")
    clipped_layers = _layer_keys(steps, "qk_clip/heads_clipped")
    if layers:
        cmap = _colormap("viridis")
        for i, (layer, key) in enumerate(layers.items()):
            color = cmap(i / max(len(layers) - 1, 1))
            x, y = _series(steps, key)
            ax.plot(x, y, lw=1.0, color=color, label=f"layer {layer}" if len(layers) <= 12 else None)
            if layer in clipped_layers:  # where QK-Clip rescaled heads of this layer
                ck = clipped_layers[layer]
                hit = {r["step"] for r in steps if (_num(r.get(ck)) or 0) > 0}
                ax.scatter(*_points_at(x, y, hit), marker="o", facecolor="none", edgecolor="red", s=30, zorder=5)
    else:  # an older run with only the overall maximum
        x, y = _series(steps, "max_logit")
        ax.plot(x, y, lw=1.0, color="tab:blue", label="max over layers")
    active = [r["step"] for r in steps if (_num(r.get("qk_clip/heads_clipped")) or 0) > 0]
    if active:
        trans = ax.get_xaxis_transform()
        ax.scatter(active, [0.02] * len(active), transform=trans, marker="|", color="red", s=80, zorder=5,
                   label=f"QK-Clip active ({len(active)} steps)")
    if tau is not None:
        ax.axhline(tau, color="red", ls="--", lw=1.2, label=f"tau = {tau:g}")
    ax.set(title="Max attention logit per layer (before QK-Clip)", xlabel="step", ylabel="max pre-softmax logit")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, ncol=max(1, min(4, (len(layers) + 3) // 4)))
    return _save(fig, path)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _load_matrix(steps: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, [experts x steps] load shares) of one layer, NaN where a step has no load; binned when long."""
    cols = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), list) and r[key]]
    if not cols:
        return None
    n_experts = max(len(v) for _, v in cols)
    mat = np.full((n_experts, len(cols)), np.nan)
    for j, (_, v) in enumerate(cols):
        mat[: len(v), j] = [float(x) if _finite(x) else np.nan for x in v]
    xs = np.asarray([s for s, _ in cols], dtype=float)
    if len(cols) > _MAX_HEATMAP_COLUMNS:  # average consecutive steps so the image stays readable and small
        edges = np.linspace(0, len(cols), _MAX_HEATMAP_COLUMNS + 1).astype(int)
        with np.errstate(all="ignore"):
            mat = np.stack([np.nanmean(mat[:, a:b], axis=1) for a, b in pairwise(edges)], axis=1)
        xs = np.asarray([xs[a:b].mean() for a, b in pairwise(edges)])
    return xs, mat


def plot_expert_load(steps: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One heatmap panel per MoE layer (x = step, y = expert, color = share of the layer's routed tokens)."""
    mats = {}
    for layer, key in _layer_keys(steps, "moe/expert_load").items():
        m = _load_matrix(steps, key)
        if m is not None:
            mats[layer] = m
    if not mats:
        return None
    n = len(mats)
    ncols = 1 if n <= 3 else min(6, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    panel_w, panel_h = (10.0, 2.6) if ncols == 1 else (12.0 / ncols, max(1.6, 9.0 / nrows))
    fig = _figure((min(panel_w * ncols + 1.2, 16.0), min(panel_h * nrows + 0.9, 24.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    n_experts = max(m.shape[0] for _, m in mats.values())
    finite = np.concatenate([m[np.isfinite(m)] for _, m in mats.values()])
    vmax = max(float(finite.max()) if finite.size else 0.0, 2.0 / n_experts)
    cmap = _colormap("viridis").with_extremes(bad="lightgray")
    image = None
    for ax, (layer, (xs, mat)) in zip(list(axes.flat)[:n], mats.items(), strict=True):
        half = (xs[1] - xs[0]) / 2 if xs.size > 1 else 0.5
        image = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", interpolation="nearest", cmap=cmap,
                          vmin=0.0, vmax=vmax, origin="lower",
                          extent=(xs[0] - half, xs[-1] + half, -0.5, mat.shape[0] - 0.5))
        ax.set_title(f"layer {layer}", fontsize=9 if ncols > 1 else 10)
        if ncols == 1 or ax in axes[:, 0]:
            ax.set_ylabel("expert", fontsize=8 if ncols > 1 else 10)
        ax.tick_params(labelsize=7 if ncols > 1 else 9)
    for ax in axes[-1, :]:
        ax.set_xlabel("step", fontsize=8 if ncols > 1 else 10)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.9, label=f"load share (uniform = 1/{n_experts} = {1 / n_experts:.3f})")
    fig.suptitle("Expert load per MoE layer (share of routed token copies)")
    return _save(fig, path, tight=False)


def plot_load_imbalance(steps: Sequence[dict[str, Any]], path: Path) -> Path | None:
    layers = _layer_keys(steps, "moe/load_imbalance")
    if not layers:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    cmap = _colormap("viridis")
    for i, (layer, key) in enumerate(layers.items()):
        x, y = _series(steps, key)
        ax.plot(x, y, lw=1.0, color=cmap(i / max(len(layers) - 1, 1)),
                label=f"layer {layer}" if len(layers) <= 12 else None)
    ax.axhline(1.0, color="gray", ls=":", lw=1.0, label="perfect balance")
    ax.set(title="MoE load imbalance (max / mean expert load)", xlabel="step", ylabel="max / mean")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=max(1, min(4, (len(layers) + 3) // 4)))
    return _save(fig, path)


def plot_throughput(steps: Sequence[dict[str, Any]], path: Path) -> Path | None:
    if not _has(steps, "tokens_per_s"):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    x, y = _series(steps, "tokens_per_s")
    lines = ax.plot(x, y, color="tab:blue", lw=1.0, label="tokens/s")
    ax.set(title="Throughput", xlabel="step", ylabel="tokens / s")
    ax.grid(alpha=0.3)
    right_key = "mfu" if _has(steps, "mfu") else "tflops" if _has(steps, "tflops") else None
    if right_key is not None:
        ax2 = ax.twinx()
        x2, y2 = _series(steps, right_key)
        if right_key == "mfu":
            y2 = y2 * 100.0
        lines += ax2.plot(x2, y2, color="tab:red", lw=1.0, alpha=0.8,
                          label="MFU (%)" if right_key == "mfu" else "TFLOP/s per device")
        ax2.set_ylabel("MFU (%)" if right_key == "mfu" else "TFLOP/s per device")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    return _save(fig, path)


# --- summary ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What `render` produced: the files written, the plots skipped (name -> reason) and the summary text."""

    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    summary: str = ""


def _argbest(steps: Sequence[dict[str, Any]], key: str, *, largest: bool) -> tuple[float, int] | None:
    vals = [(float(r[key]), r["step"]) for r in steps if _finite(r.get(key))]
    if not vals:
        return None
    return max(vals) if largest else min(vals, key=lambda t: (t[0], t[1]))


def summarize(steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], cfg: dict[str, Any] | None,
              skipped: dict[str, str] | None = None, bad_lines: int = 0) -> str:
    """A short plain-text summary of a run (what `summary.txt` holds)."""
    lines: list[str] = []
    add = lines.append
    train = (cfg or {}).get("train") if isinstance((cfg or {}).get("train"), dict) else {}
    planned = _num(train.get("steps")) if train else None
    if not steps:
        add("steps: none logged yet (no training step records in metrics.jsonl)")
    else:
        first, last = steps[0]["step"], steps[-1]["step"]
        of = f" of {planned:.0f} planned" if planned else ""
        add(f"steps: {len(steps)} logged (steps {first}..{last}){of}")
        tokens = _num(steps[-1].get("tokens_seen"))
        if tokens is not None:
            add(f"tokens seen: {_fmt_count(tokens)} ({tokens:.0f})")

    x, y = _series(steps, "loss")
    fin = np.isfinite(y)
    if fin.any():
        i_min = int(np.nanargmin(np.where(fin, y, np.nan)))
        add(f"loss: first {y[fin][0]:.4f} (step {x[fin][0]:.0f}), last {y[fin][-1]:.4f} (step {x[fin][-1]:.0f}), "
            f"min {y[i_min]:.4f} (step {x[i_min]:.0f})")
    ev = [r for r in evals if _finite(r.get("val_loss"))]
    if ev:
        ppl = _num(ev[-1].get("val_ppl"))
        add(f"last val loss: {float(ev[-1]['val_loss']):.4f} at step {ev[-1]['step']}"
            + (f" (ppl {ppl:.2f})" if ppl is not None and math.isfinite(ppl) else "")
            + f"; {len(ev)} evaluations")
    else:
        add("last val loss: none (no validation records)")

    if any("spike" in r for r in steps):
        sp = _spike_steps(steps)
        counter = next((int(r["spikes"]) for r in reversed(steps) if _finite(r.get("spikes"))), None)
        extra = f" (detector's running count: {counter})" if counter is not None and counter != len(sp) else ""
        add(f"loss spikes: {len(sp)}" + (f" at steps {_fmt_steps(sp)}" if sp else "") + extra)
    else:
        add("loss spikes: n/a (the records have no 'spike' key: the run predates the spike detector)")

    g = _argbest(steps, "grad_norm", largest=True)
    if g is not None:
        add(f"max grad norm: {g[0]:.4g} at step {g[1]}")

    tau = _tau(cfg)
    layer_keys = _layer_keys(steps, "attn/max_logit")
    best: tuple[float, int, str] | None = None
    for key in [*layer_keys.values(), "max_logit"]:
        b = _argbest(steps, key, largest=True)
        if b is not None and (best is None or b[0] > best[0]):
            where = f"layer {_LAYER_KEY.match(key).group('layer')}" if key != "max_logit" else "all layers"
            best = (b[0], b[1], where)
    if cfg is None:
        tau_txt = "tau unknown (no readable config.yaml)"
    elif tau is None:
        tau_txt = "tau null (QK-Clip disabled)"
    else:
        tau_txt = f"tau {tau:g}"
    if best is not None:
        above = ""
        if tau is not None:
            n_above = sum(1 for r in steps if _finite(r.get("max_logit")) and float(r["max_logit"]) > tau)
            above = f", above tau at {n_above} step(s)"
        add(f"max attention logit: {best[0]:.2f} at step {best[1]} ({best[2]}) vs {tau_txt}{above}")
    else:
        add(f"max attention logit: n/a (not in the records); {tau_txt}")
    if _has(steps, "qk_clip/heads_clipped"):
        total = sum(int(_num(r.get("qk_clip/heads_clipped")) or 0) for r in steps)
        n_active = sum(1 for r in steps if (_num(r.get("qk_clip/heads_clipped")) or 0) > 0)
        add(f"QK-Clip: {total} head rescalings in total over {n_active} step(s)")

    imb = _layer_keys(steps, "moe/load_imbalance")
    if imb:
        last_vals = {}
        for layer, key in imb.items():
            v = next((float(r[key]) for r in reversed(steps) if _finite(r.get(key))), None)
            w = _argbest(steps, key, largest=True)
            if v is not None and w is not None:
                last_vals[layer] = (v, w)
        shown = sorted(last_vals.items(), key=lambda kv: -kv[1][0])
        if len(shown) > 8:
            head = f"worst 8 of {len(shown)} layers"
            shown = shown[:8]
        else:
            head = "per layer"
        parts = [f"layer {layer} {v:.2f} (run max {w[0]:.2f} @ step {w[1]})" for layer, (v, w) in shown]
        add(f"load imbalance max/mean at the last step, {head}: " + "; ".join(parts))
    if _has(steps, "moe/dropped_tokens"):
        dropped = sum(int(r["moe/dropped_tokens"]) for r in steps if _finite(r.get("moe/dropped_tokens")))
        add(f"dropped tokens (capacity): {dropped} in total")

    _, tps = _series(steps, "tokens_per_s")
    tps = tps[1:] if tps.size > 1 else tps  # step 1 pays for warm-up / compilation
    tps = tps[np.isfinite(tps)]
    if tps.size:
        add(f"mean tokens/s: {tps.mean():,.0f}" + (" (excluding the first step)" if len(steps) > 1 else ""))
    _, tfl = _series(steps, "tflops")
    tfl = tfl[np.isfinite(tfl)]
    if tfl.size:
        add(f"mean TFLOP/s per device: {tfl.mean():.2f}")
    _, mfu = _series(steps, "mfu")
    mfu = mfu[np.isfinite(mfu)]
    if mfu.size:
        add(f"MFU: mean {mfu.mean() * 100:.1f}%, last {mfu[-1] * 100:.1f}%")
    elif any("mfu" in r for r in steps):
        add("MFU: n/a (peak FLOP/s of this device unknown)")
    mem = _argbest(steps, "peak_mem_gb", largest=True)
    if mem is not None:
        add(f"peak memory: {mem[0]:.2f} GB")

    bad = _nonfinite_steps(steps)
    counter = next((int(r["nonfinite_steps"]) for r in reversed(steps) if _finite(r.get("nonfinite_steps"))), None)
    txt = f"non-finite steps: {len(bad)}" + (f" at steps {_fmt_steps(bad)}" if bad else "")
    if counter is not None and counter != len(bad):
        txt += f" (trainer's counter: {counter})"
    add(txt)
    if bad_lines:
        add(f"unparsable lines skipped: {bad_lines} (e.g. a line cut short by a crash)")
    if skipped:
        add("skipped plots: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    return "\n".join(lines) + "\n"


# --- rendering ----------------------------------------------------------------------------------


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Render every plot the records allow and write summary.txt; the returned Report says what was skipped."""
    steps, evals, bad_lines = _load(run_dir)
    base = _metrics_path(run_dir).parent
    out = Path(out_dir) if out_dir is not None else base / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_run_config(base)
    report = Report()

    def attempt(name: str, fn: Any, missing: str) -> None:
        target = out / name
        written = fn(target) if steps else None
        if written is None:
            report.skipped[name] = missing if steps else "no training step records"
            target.unlink(missing_ok=True)  # do not leave a stale plot of an earlier render behind
        else:
            report.files.append(written)

    def needs(keys_present: bool, fn: Any) -> Any:
        return lambda p: fn(p) if keys_present else None

    tau = _tau(cfg)
    attempt("loss.png", needs(_has(steps, "loss"), lambda p: plot_loss(steps, evals, p)),
            "no 'loss' key in the records")
    attempt("grad_norm.png", needs(_has(steps, "grad_norm"), lambda p: plot_grad_norm(steps, p)),
            "no 'grad_norm' key in the records")
    has_logit = _has(steps, "max_logit") or bool(_layer_keys(steps, "attn/max_logit"))
    attempt("max_logit.png", needs(has_logit, lambda p: plot_max_logit(steps, tau, p)),
            "no max-logit keys in the records")
    attempt("expert_load.png", lambda p: plot_expert_load(steps, p),
            "no 'moe/expert_load/layer*' lists in the records (an older run or a dense model)")
    attempt("load_imbalance.png", lambda p: plot_load_imbalance(steps, p),
            "no 'moe/load_imbalance/layer*' keys in the records")
    attempt("throughput.png", lambda p: plot_throughput(steps, p), "no 'tokens_per_s' key in the records")

    report.summary = summarize(steps, evals, cfg, report.skipped, bad_lines)
    summary_path = out / SUMMARY
    summary_path.write_text(report.summary)
    report.files.append(summary_path)
    return report


def render(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the report's PNGs and summary.txt into `out_dir` (default `<run_dir>/report/`); returns the paths."""
    return build_report(run_dir, out_dir).files


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
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary, end="")
    print("wrote:")
    for p in report.files:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
