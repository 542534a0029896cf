"""The planner's human-readable table (`python -m tools.plan` without --json): what tools/plan.py computed,
laid out in sections; the layout, pipeline and fit sections come from plan_layout.py and plan_pipeline.py."""

from __future__ import annotations

from typing import Any

from tools.plan_layout import format_layout
from tools.plan_pipeline import format_pipeline

# Parameter categories, in table order. "norms" (RMSNorm gains) keeps the breakdown summing to the total.
CATEGORIES: tuple[str, ...] = (
    "embedding", "attention", "dense_ffn", "router", "shared_experts", "routed_experts", "norms", "lm_head",
)
FLOP_LABELS: dict[str, str] = {
    "attention_proj": "attention projections (q/kv lora, kv_b, o)",
    "attention_core": "attention scores + values (q.k, p.v)",
    "dense_ffn": "dense FFN",
    "router": "router",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "lm_head": "LM head",
}


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: dict[str, Any]) -> str:
    """The human-readable table."""
    p, f, m, lay = plan["params"], plan["flops_per_token"], plan["memory"], plan["layout"]
    s = plan["seq_len"]
    w = 44
    lines = [f"Chogori plan: {plan['config'] or 'model'}   seq_len {s}", ""]

    lines.append(f"{'Parameters':<{w}}{'total':>22}{'activated / token':>22}")
    for cat, n in p["breakdown"].items():
        if n or cat in CATEGORIES:
            lines.append(f"  {cat.replace('_', ' '):<{w - 2}}{n:>22,}{p['activated_breakdown'][cat]:>22,}")
    lines.append(f"  {'total':<{w - 2}}{p['total']:>22,}{p['activated']:>22,}")
    lines.append(f"  {'':<{w - 2}}{_human(p['total']):>22}{_human(p['activated']):>22}")
    lines.append("")

    lines.append(f"{'FLOPs per token (2 per multiply-add)':<{w}}{'forward':>22}{'fwd + bwd':>22}")
    for part, n in f["forward_breakdown"].items():
        lines.append(f"  {FLOP_LABELS[part]:<{w - 2}}{n:>22,}{3 * n:>22,}")
    lines.append(f"  {'total':<{w - 2}}{f['forward']:>22,}{f['training']:>22,}")
    lines.append(f"  {'':<{w - 2}}{_human(f['forward']):>22}{_human(f['training']):>22}")
    lines.append(f"  attention is causal: query i sees i keys, (S+1)/2 = {(s + 1) / 2:g} on average; "
                 "training = 3 x forward")
    tr = f["training"]
    lines.append("  cross-check, training FLOPs per token:")
    for label, v in (("all S keys (no causal discount)", f["training_noncausal"]),
                     ("6 * N_activated", f["approx_6N"]),
                     ("6 * N_act(matmul) + 6*L*h*(dqk+dv)*S", f["approx_6N_plus_attention"])):
        lines.append(f"    {label:<{w - 4}}{'':>22}{v:>22,}  ({v / tr:.3f}x exact)")
    lines.append("")

    opt = lay["optimizer"]
    gpus = f"{lay['gpus']} GPU" + ("s" if lay["gpus"] > 1 else "")
    lines.append(f"Memory per GPU: {gpus}, ep {lay['ep']} ({m['experts_per_rank']} experts per "
                 f"rank, expert fsdp {m['expert_fsdp']}), dense fsdp {lay['gpus'] // lay['pp']}, {opt}"
                 + (f", pp {lay['pp']} ({lay['pp_schedule']}; the fullest pipeline rank)" if lay["pp"] > 1 else ""))
    lines.append(f"  {'parameters held per GPU':<{w - 2}}{m['params_per_gpu']:>22,.0f}"
                 f"{_human(m['params_per_gpu']):>22}")
    by = m["bytes_per_gpu"]
    rows = [(f"weights ({lay['param_dtype']} master)", by["weights"]),
            (f"gradients ({lay['grad_dtype']})", by["grads"]),
            (f"optimizer ({opt}, {lay['optim_dtype']} states)", by["optimizer"]),
            ("total (weights + grads + optimizer)", by["total"])]
    for label, v in rows:
        lines.append(f"  {label:<{w - 2}}{_bytes(v):>22}")
    lines.append(f"  {'not in total: largest FSDP unit gathered':<{w - 2}}"
                 f"{_bytes(m['largest_unit_gathered_bytes']):>22}"
                 f"  ({m['largest_unit']}, {lay['compute_dtype']}, transient)")
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in m["assumptions"]]
    lines.append("")
    if "pipeline" in plan:
        lines += format_pipeline(plan["pipeline"], lay["pp_schedule"], w)
    lines += format_layout(plan, w)
    return "\n".join(lines)
