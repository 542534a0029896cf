"""The figures of the report, drawn on matplotlib's Agg canvas (no display, no global backend switch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.report.records import (
    _DPI,
    _FIGSIZE,
    _MAX_HEATMAP_COLUMNS,
    _finite,
    _has,
    _layer_keys,
    _nonfinite_steps,
    _num,
    _series,
    _spike_steps,
)


class MatplotlibMissing(RuntimeError):
    """The plots need matplotlib, which is in the `dev` extra rather than the training dependencies."""


def _figure(figsize: tuple[float, float] = _FIGSIZE, **kwargs: Any) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is a dev extra, not a training dependency
        raise MatplotlibMissing("the report needs matplotlib: pip install 'matplotlib>=3.7' "
                           "(the `report` extra: pip install -e '.[report]')") from e
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
    if any(_finite(r.get("loss_baseline")) for r in steps):  # NaN while the detector warms up
        xb, yb = _series(steps, "loss_baseline")
        ax.plot(xb, yb, color="gray", lw=1.0, ls="--", label="spike baseline (running median)")
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
        for i, (layer, key) in enumerate(layers.items()):
            color = _line_color(i, len(layers))
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
        top = max((float(v) for r in steps for k, v in r.items()
                   if (k == "max_logit" or k.startswith("attn/max_logit/")) and _finite(v)), default=math.nan)
        if math.isfinite(top) and 0 < top < tau / 4:  # drawing the line would flatten every curve to the floor
            ax.plot([], [], color="red", ls="--", lw=1.2, label=f"tau = {tau:g} (off scale: far above the data)")
        else:
            ax.axhline(tau, color="red", ls="--", lw=1.2, label=f"tau = {tau:g}")
    ax.set(title="Max attention logit per layer (before QK-Clip)", xlabel="step", ylabel="max pre-softmax logit")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, ncol=max(1, min(4, (len(layers) + 3) // 4)))
    return _save(fig, path)


def _line_color(i: int, n: int) -> Any:
    """Distinct colors for up to 10 lines, a dark-to-light ramp (no pale yellow) for more."""
    if n <= 10:
        return _colormap("tab10")(i)
    return _colormap("viridis")(0.9 * i / max(n - 1, 1))


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _load_matrix(steps: Sequence[dict[str, Any]], key: str,
                 max_columns: int) -> tuple[tuple[float, float], np.ndarray]:
    """((first, last) step edges, [experts x columns] load shares) of one layer on a uniform step grid.

    The trainer logs the shares only every `logging.expert_load_interval` steps (and at step 1), so the grid
    gives each logged step the cells nearest to it; when more steps were logged than `max_columns` (more
    than the panel has pixels), the steps falling into one cell are averaged. NaN marks a missing value."""
    cols = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), list) and r[key]]
    n_experts = max(len(v) for _, v in cols)
    mat = np.full((n_experts, len(cols)), np.nan)
    for j, (_, v) in enumerate(cols):
        try:
            mat[: len(v), j] = np.asarray(v, dtype=float)
        except (TypeError, ValueError):  # a stray non-number in the list: keep what parses
            mat[: len(v), j] = [float(x) if _finite(x) else np.nan for x in v]
    mat[~np.isfinite(mat)] = np.nan
    xs = np.asarray([s for s, _ in cols], dtype=float)
    lo, hi = xs[0] - 0.5, xs[-1] + 0.5
    n_cells = max(1, min(max_columns, int(round(hi - lo))))
    cell = np.clip(((xs - lo) / (hi - lo) * n_cells).astype(int), 0, n_cells - 1)
    sums = np.zeros((n_cells, n_experts))
    counts = np.zeros((n_cells, n_experts))
    np.add.at(sums, cell, np.nan_to_num(mat.T))
    np.add.at(counts, cell, np.isfinite(mat.T))
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(counts > 0, sums / counts, np.nan).T
    empty = np.bincount(cell, minlength=n_cells) == 0
    if empty.any():  # cells between two logged steps show the nearer one
        centers = lo + (np.arange(n_cells) + 0.5) * (hi - lo) / n_cells
        right = np.clip(np.searchsorted(xs, centers), 0, len(xs) - 1)
        left = np.clip(right - 1, 0, len(xs) - 1)
        nearest = np.where(np.abs(xs[left] - centers) <= np.abs(xs[right] - centers), left, right)
        grid[:, empty] = mat[:, nearest[empty]]
    return (lo, hi), grid


def plot_expert_load(steps: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One heatmap panel per MoE layer (x = step, y = expert, color = share of the layer's routed tokens)."""
    keys = {layer: key for layer, key in _layer_keys(steps, "moe/expert_load").items()
            if any(isinstance(r.get(key), list) and r[key] for r in steps)}
    if not keys:
        return None
    n = len(keys)
    ncols = 1 if n <= 3 else min(6, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    panel_w, panel_h = (10.0, 2.6) if ncols == 1 else (12.0 / ncols, max(1.6, 9.0 / nrows))
    fig = _figure((min(panel_w * ncols + 1.2, 16.0), min(panel_h * nrows + 0.9, 24.0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    max_columns = min(_MAX_HEATMAP_COLUMNS, int(panel_w * _DPI))
    mats = {layer: _load_matrix(steps, key, max_columns) for layer, key in keys.items()}
    n_experts = max(m.shape[0] for _, m in mats.values())
    finite = np.concatenate([m[np.isfinite(m)] for _, m in mats.values()])
    # The top of the scale ignores the hottest 0.1% of cells so one collapsed step cannot wash out the rest.
    vmax = max(float(np.percentile(finite, 99.9)) if finite.size else 0.0, 2.0 / n_experts)
    extend = "max" if finite.size and float(finite.max()) > vmax else "neither"
    cmap = _colormap("viridis").with_extremes(bad="lightgray")
    # Experts are discrete rows: draw them as blocks, unless there are more of them than pixels in a panel.
    interpolation = "nearest" if n_experts <= panel_h * _DPI * 0.8 else "antialiased"
    image = None
    for ax, (layer, ((lo, hi), mat)) in zip(list(axes.flat)[:n], mats.items(), strict=True):
        image = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, interpolation=interpolation,
                          vmin=0.0, vmax=vmax, origin="lower", extent=(lo, hi, -0.5, mat.shape[0] - 0.5))
        ax.set_title(f"layer {layer}", fontsize=9 if ncols > 1 else 10)
        if ncols == 1 or ax in axes[:, 0]:
            ax.set_ylabel("expert", fontsize=8 if ncols > 1 else 10)
        ax.tick_params(labelsize=7 if ncols > 1 else 9)
    for col in range(ncols):  # the lowest used panel of each column carries the step axis
        row = nrows - 1 if (nrows - 1) * ncols + col < n else nrows - 2
        axes[row, col].tick_params(labelbottom=True)
        axes[row, col].set_xlabel("step", fontsize=8 if ncols > 1 else 10)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.9, extend=extend,
                 label=f"load share (uniform = 1/{n_experts} = {1 / n_experts:.3f})")
    fig.suptitle("Expert load per MoE layer (share of routed token copies)")
    return _save(fig, path, tight=False)


def plot_load_imbalance(steps: Sequence[dict[str, Any]], path: Path) -> Path | None:
    layers = _layer_keys(steps, "moe/load_imbalance")
    if not layers:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (layer, key) in enumerate(layers.items()):
        x, y = _series(steps, key)
        ax.plot(x, y, lw=1.0, color=_line_color(i, len(layers)),
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
    ax.set_ylim(bottom=0)
    if right_key is not None:
        ax2.set_ylim(bottom=0)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    return _save(fig, path)


# --- summary ------------------------------------------------------------------------------------


