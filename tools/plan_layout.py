"""The layout half of the plan: activation memory per recompute policy, all-to-all and FSDP traffic, Newton-Schulz
FLOPs, a step-time estimate on H100 / H200 and whether the run fits in their memory (tools/plan.py's sections
after the parameter / FLOP / state-memory counts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from models.config import ModelConfig
from models.flops import flops_per_token
from tools.plan_activations import POLICIES, activation_memory
from tools.plan_comms import CommInputs, Hardware, estimate


@dataclass(frozen=True)
class Batch:
    """The batch side of a run: sequences per forward per rank, per step in all, recompute policy, sync."""

    micro_batch: int = 1
    global_batch: int | None = None  # None: one micro-batch per rank per step
    activation_checkpointing: str = "selective"
    grad_sync: str = "step"
    ns_steps: int = 5
    note: str = ""  # how the batch was chosen, when not as given


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> int:
    """Quintic Newton-Schulz FLOPs of a [..., n, m] stack (n <= m after transposition): per step X Xᵀ (2n²m),
    A·A (2n³), B·X (2n²m) — the count optim/distributed_ns.py balances owners by (tests check they agree)."""
    *batch, n, m = shape
    n, m = min(n, m), max(n, m)
    count = 1
    for b in batch:
        count *= b
    return count * steps * (4 * n * n * m + 2 * n**3)


def _split(model: nn.Module, param_category, is_muon_matrix, optimizer: str) -> dict[str, int]:  # noqa: ANN001
    """Parameter counts the traffic model needs, and Muon's matrices' NS FLOPs (one pass)."""
    dense = experts = root = muon = 0
    shapes: list[tuple[int, ...]] = []
    for name, p in model.named_parameters():
        n = p.numel()
        if param_category(name) == "routed_experts":
            experts += n
        else:
            dense += n
            if not name.startswith("layers."):
                root += n
        if optimizer == "muon" and is_muon_matrix(name, p):
            muon += n
            shapes.append(tuple(p.shape))
    return {"dense": dense, "experts": experts, "root": root, "muon": muon, "shapes": shapes}


def layout_sections(model: nn.Module, cfg: ModelConfig, seq_len: int, layout: Any, batch: Batch,
                    hw: Hardware, profile: list[list[float]] | None, profile_source: str,
                    param_category, is_muon_matrix, state_bytes: float, gathered_bytes: float,
                    pipeline: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ANN001
    """The JSON sections "batch", "activations", "communication", "step_time", "fit" of a plan.

    Under a pipeline (`layout.pp` > 1) the traffic and compute are one stage's: a rank holds 1/pp of the layers
    (the split balances forward FLOPs), its data-parallel group is gpus / pp, the step time is stretched by
    the chosen schedule's bubble, the weights are gathered once per step (reshard_after_forward=false, torch's
    stages keeping them to the last backward), and the fit is that of the fullest pipeline rank (`pipeline`:
    the plan's pipeline section)."""
    chosen = pipeline["schedules"][layout.pp_schedule] if pipeline else None
    bubble = chosen["bubble"] if chosen else 0.0
    c = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}[layout.compute_dtype]
    pp = getattr(layout, "pp", 1)
    dp = layout.gpus // pp
    gb = batch.global_batch or dp * batch.micro_batch
    micro = gb // dp // batch.micro_batch
    tokens = batch.micro_batch * seq_len

    acts = {}
    for policy in POLICIES:
        a = activation_memory(cfg, batch.micro_batch, seq_len, policy, c, layout.ep)
        acts[policy] = {"bytes": a.total, "dense_layer": a.dense_layer, "moe_layer": a.moe_layer,
                        "outside_blocks": a.outside, "recompute_block_transient": a.recompute_block,
                        "parts": a.parts}

    counts = _split(model, param_category, is_muon_matrix, layout.optimizer)
    ns_total = sum(ns_flops(s, batch.ns_steps) for s in counts["shapes"])
    inp = CommInputs(
        gpus=dp, ep=layout.ep, tokens_per_micro=tokens, micro_batches=micro, hidden=cfg.hidden_size,
        top_k=cfg.num_experts_per_tok, num_experts=cfg.n_routed_experts, moe_layers=cfg.num_moe_layers / pp,
        compute_bytes=c, policy=batch.activation_checkpointing, grad_sync=batch.grad_sync,
        dense_params=counts["dense"] / pp, expert_params=counts["experts"] / pp, root_params=counts["root"] / pp,
        flops_per_token=flops_per_token(cfg, seq_len) / pp,
        forward_flops_per_token=flops_per_token(cfg, seq_len, training=False) / pp,
        ns_flops_total=ns_total / pp, muon_params=counts["muon"] / pp, gather_once=pp > 1)
    est = estimate(inp, hw, profile)
    if pp > 1:  # a data-parallel rank's tokens pass through pp GPUs; the bubble idles each of them
        for case in est["step_time"].values():
            case["pipeline_bubble"] = bubble
            for key in ("overlapped_seconds", "serial_seconds"):
                case[key] /= 1.0 - bubble
            case["tokens_per_s_per_gpu"] *= (1.0 - bubble) / pp
            case["mfu"] *= 1.0 - bubble
    est["all_to_all"]["skewed"]["profile"] = profile_source

    held = acts[batch.activation_checkpointing]
    # Gradient accumulation without a reduce-scatter per micro-batch: FSDP2 keeps each gathered weight's
    # unsharded gradient (in the fp32 reduce dtype) from one micro-batch to the next.
    accum = 0.0
    if batch.grad_sync == "step" and micro > 1 and layout.gpus > 1:
        accum = (counts["dense"] + counts["experts"] / layout.ep) * 4 / pp
    parts = {"state": state_bytes, "activations": held["bytes"],
             "recompute_transient": held["recompute_block_transient"], "largest_gather": gathered_bytes,
             "unsharded_grad_accumulation": accum}
    if chosen:  # the fullest pipeline rank: its state, activations in flight, gathered blocks
        rank = max(chosen["ranks"], key=lambda r: r["total_bytes_reshard_false"])
        parts.update(state=rank["state_bytes"], activations=rank["activation_bytes"],
                     largest_gather=rank["gathered_weights_bytes"])
    need = sum(parts.values())
    fit = {"bytes": need, "parts": parts,
           "devices": {name: {"memory_bytes": mem, "fits": need <= mem} for name, mem in hw.memory.items()}}
    return {
        "batch": {**asdict(batch), "global_batch": gb, "micro_batches_per_rank": micro,
                  "tokens_per_micro_batch": tokens},
        "activations": {"definition": "bytes the forward of one micro-batch (model + loss) leaves for the backward "
                                      "on one rank, parameters excluded; balanced routing",
                        "compute_dtype": layout.compute_dtype, "policy": batch.activation_checkpointing,
                        **acts},
        "communication": {k: est[k] for k in ("all_to_all", "fsdp")},
        "compute": est["compute"], "newton_schulz": est["newton_schulz"],
        "step_time": est["step_time"],
        "hardware": {**asdict(hw), "assumptions": hw.assumptions()},
        "fit": fit,
    }


# --- text -------------------------------------------------------------------------------------------------
def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _secs(s: float) -> str:
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_layout(plan: dict[str, Any], w: int = 44) -> list[str]:
    """Text lines of the layout sections."""
    bt, act, com, lay = plan["batch"], plan["activations"], plan["communication"], plan["layout"]
    lines = [f"Batch: micro-batch {bt['micro_batch']} x {plan['seq_len']} = {bt['tokens_per_micro_batch']:,} tokens"
             f" per rank; global batch {bt['global_batch']:,} -> {bt['micro_batches_per_rank']} micro-batch(es) "
             f"per rank per step; grad sync per {bt['grad_sync'].replace('_', '-')}"]
    if bt["note"]:
        lines.append(f"  note: {bt['note']}")
    lines.append("")

    lines.append(f"{'Activation memory per micro-batch':<{w}}{'per GPU':>22}{'dense / MoE layer':>24}")
    for policy in POLICIES:
        a = act[policy]
        mark = " *" if policy == act["policy"] else ""
        lines.append(f"  {policy + mark:<{w - 2}}{_bytes(a['bytes']):>22}"
                     f"{_bytes(a['dense_layer']):>12} /{_bytes(a['moe_layer']):>11}")
    lines.append(f"  * the config's parallel.activation_checkpointing; {act['compute_dtype']} activations, "
                 "balanced routing")
    lines.append("  = bytes the forward (model + loss) leaves for the backward, parameters excluded; counted from "
                 "the config, matches a measured CPU forward (tests)")
    ac = act[act["policy"]]
    if ac["recompute_block_transient"]:
        lines.append(f"  in backward, one block recomputed on top: {_bytes(ac['recompute_block_transient'])}"
                     " (transient)")
    lines.append(f"  outside the blocks (loss log-softmax fp32, final norm, LM head input): "
                 f"{_bytes(ac['outside_blocks'])}")
    lines.append("")

    a2a = com["all_to_all"]
    lines.append(f"{'All-to-all per step (EP ' + str(lay['ep']) + ')':<{w}}{'per GPU':>22}")
    if lay["ep"] > 1:
        bal, sk = a2a["balanced"], a2a["skewed"]
        lines += [
            f"  {'all-to-all calls':<{w - 2}}{a2a['phases_per_step']:>22,}"
            f"  ({'4' if act['policy'] != 'full' else '6'} per MoE layer and micro-batch: dispatch + combine in "
            f"the forward{'' if act['policy'] != 'full' else ', again in the recompute'}, and in the backward)",
            f"  {'through the collective, balanced':<{w - 2}}"
            f"{_bytes(bal['bytes_through_collective']):>22}  (own chunk included)",
            f"  {'on the wire, balanced':<{w - 2}}{_bytes(bal['bytes_on_wire']):>22}"
            f"  (NVLink {_bytes(bal['nvlink_bytes'])}, network {_bytes(bal['network_bytes'])})",
            f"  {'busiest rank on the wire, skewed load':<{w - 2}}{_bytes(sk['busiest_rank_bytes_on_wire']):>22}"
            f"  ({sk['busiest_factor_mean']:.2f}x balanced, worst sample {sk['busiest_factor_worst']:.2f}x)",
            f"  skewed load: {sk['profile']} ({sk['profile_samples']} layer-step samples)",
            f"  one forward, per micro-batch, through the collective: "
            f"{_bytes(a2a['forward_bytes_through_collective_per_micro_batch'])} "
            "(= parallel.expert_parallel.dispatch_bytes, balanced routing)",
        ]
    else:
        lines.append("  none (ep 1: every rank holds all experts)")
    fs = com["fsdp"]
    lines.append("")
    lines.append(f"{'FSDP per step':<{w}}{'per GPU':>22}")
    lines.append(f"  {'all-gather (compute dtype), sent = received':<{w - 2}}{_bytes(fs['all_gather_bytes']):>22}")
    lines.append(f"  {'reduce-scatter (fp32), x' + str(fs['reduce_scatters_per_step']):<{w - 2}}"
                 f"{_bytes(fs['reduce_scatter_bytes']):>22}")
    lines.append(f"  groups: dense {fs['dense_group']} ranks, experts {fs['expert_group']} ranks "
                 f"at {fs['bandwidth_bytes_s'] / 1e9:g} GB/s")
    lines.append("")

    cp, ns, st = plan["compute"], plan["newton_schulz"], plan["step_time"]
    hw = plan["hardware"]
    lines.append(f"{'Step time, H100 / H200 (same figures)':<{w}}{'balanced':>22}{'skewed':>14}")
    rows = [
        (f"compute ({_flops(cp['model_flops'])}"
         + (f" + {_flops(cp['recompute_flops'])[:-6]} re-run" if cp["recompute_flops"] else " model") + ")",
         cp["seconds"], cp["seconds"]),
        ("EP all-to-all (NVLink / network)", com["all_to_all"]["balanced"]["seconds"],
         com["all_to_all"]["skewed"]["seconds"]),
        ("FSDP all-gather + reduce-scatter", fs["seconds"], fs["seconds"]),
        (f"Newton-Schulz ({_flops(ns['flops_per_rank'])} per GPU)", ns["seconds"], ns["seconds"]),
    ]
    for label, b, s in rows:
        lines.append(f"  {label:<{w - 2}}{_secs(b):>22}{_secs(s):>14}")
    for key, label in (("overlapped_seconds", "step, FSDP overlapped with compute"),
                       ("serial_seconds", "step, nothing overlapped")):
        lines.append(f"  {label:<{w - 2}}{_secs(st['balanced'][key]):>22}{_secs(st['skewed'][key]):>14}")
    for key, label, fmt in (("tokens_per_s_per_gpu", "tokens/s per GPU (overlapped)", "{:,.0f}"),
                            ("mfu", "MFU (overlapped)", "{:.1%}")):
        lines.append(f"  {label:<{w - 2}}{fmt.format(st['balanced'][key]):>22}{fmt.format(st['skewed'][key]):>14}")
    achieved = f"{hw['peak_flops'] / 1e12:g} TFLOP/s x {hw['mfu']:.0%}"
    lines.append(f"  figures used: compute and Newton-Schulz at {achieved}; all-to-all at NVLink "
                 f"{hw['nvlink_bytes_s'] / 1e9:g} GB/s (node-local peers) and {hw['network_bytes_s'] / 1e9:g} GB/s "
                 f"(the rest); FSDP and NS gathers at {fs['bandwidth_bytes_s'] / 1e9:g} GB/s")
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in hw["assumptions"]]
    lines.append("")

    fit = plan["fit"]
    p = fit["parts"]
    lines.append(f"{'Fit per GPU (' + act['policy'] + ' recompute)':<{w}}{'bytes':>22}")
    piped = "pipeline" in plan
    for label, key in (("state (weights, grads, optimizer)", "state"),
                       ("activations, " + ("micro-batches in flight" if piped else "one micro-batch"), "activations"),
                       ("one block recomputed in backward", "recompute_transient"),
                       ("blocks kept gathered (pipeline stage)" if piped else "largest FSDP unit gathered",
                        "largest_gather"),
                       ("unsharded fp32 grads, grad accumulation", "unsharded_grad_accumulation")):
        if p[key]:
            lines.append(f"  {label:<{w - 2}}{_bytes(p[key]):>22}")
    lines.append(f"  {'total':<{w - 2}}{_bytes(fit['bytes']):>22}")
    lines.append("  " + "; ".join(f"{name} {d['memory_bytes'] / 1e9:g} GB: {'fits' if d['fits'] else 'does NOT fit'}"
                                  for name, d in fit["devices"].items())
                 + " (no allowance for CUDA context, NCCL buffers, fragmentation)")
    off = plan.get("offload")
    if off:
        lines.append(f"  optim.offload: none {_bytes(off['gpu_bytes']['none'])} per GPU; cpu "
                     f"{_bytes(off['gpu_bytes']['cpu'])} per GPU and {_bytes(off['host_bytes_per_node_cpu'])} of host "
                     f"memory per node (chosen: {off['chosen']})")
    return lines
