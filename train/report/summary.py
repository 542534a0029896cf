"""The text summary and `build_report`: every plot the records allow, plus summary.txt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.report.plots import (
    MatplotlibMissing,
    plot_expert_load,
    plot_grad_norm,
    plot_load_imbalance,
    plot_loss,
    plot_max_logit,
    plot_throughput,
)
from train.report.records import (
    _LAYER_KEY,
    SUMMARY,
    _finite,
    _fmt_count,
    _fmt_steps,
    _has,
    _layer_keys,
    _load,
    _metrics_path,
    _nonfinite_steps,
    _num,
    _series,
    _spike_steps,
    _tau,
    load_run_config,
)


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
    return max(vals, key=lambda t: (t[0], -t[1])) if largest else min(vals)  # ties: the earliest step


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
    elif evals:
        add(f"last val loss: not finite (none of {len(evals)} evaluation(s) is finite)")
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
    optim = (cfg or {}).get("optim")
    if cfg is None:
        tau_txt = "tau unknown (no readable config.yaml)"
    elif not isinstance(optim, dict) or "qk_clip_tau" not in optim:
        tau_txt = "tau unknown (no optim.qk_clip_tau in config.yaml)"
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
        add(f"QK-Clip: {total} head rescalings in total over {n_active} step(s)" if total else
            "QK-Clip: never activated (0 heads clipped)")

    imb = _layer_keys(steps, "moe/load_imbalance")
    if imb:
        last_vals = {}
        for layer, key in imb.items():
            v = next((float(r[key]) for r in reversed(steps) if _finite(r.get(key))), None)
            w = _argbest(steps, key, largest=True)
            if v is not None and w is not None:
                last_vals[layer] = (v, w)
        shown = sorted(last_vals.items())
        if len(shown) > 8:
            head = f"worst 8 of {len(shown)} layers"
            shown = sorted(shown, key=lambda kv: -kv[1][0])[:8]
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
        add("skipped plots: " + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
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
        try:
            written = fn(target) if steps else None
        except MatplotlibMissing:
            raise
        except Exception as e:  # odd values in one plot's keys must not cost the rest of the report
            written, missing = None, f"failed: {type(e).__name__}: {e}"
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


