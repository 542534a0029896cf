"""The pipeline side of a plan: each schedule's bubble and what each stage holds.

    pipeline_section(model, cfg, seq_len, layout, ...)   # the plan's "pipeline" JSON section
    format_pipeline(section, chosen)                     # its table

Bubbles and in-flight micro-batches come from parallel/schedule_sim.py, which plays torch's own schedule orders
with unit costs; the layer split and stage placement are the trainer's (parallel/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.config import ModelConfig
from parallel.pipeline import SCHEDULES, split_layers, stage_ids, virtual_stages
from parallel.schedule_sim import simulate
from tools.plan_activations import activation_memory


def stage_of_parameter(name: str, split: list[list[int]]) -> int:
    """The pipeline stage that holds parameter `name` (canonical names: "layers.7.…", embedding, norm, head)."""
    if name.startswith("embed_tokens"):
        return 0
    if name.startswith(("norm.", "lm_head")):
        return len(split) - 1
    layer = int(name.split(".")[1])
    return next(s for s, layers in enumerate(split) if layer in layers)


def pipeline_section(model: nn.Module, cfg: ModelConfig, seq_len: int, layout: Any, micro_batch: int,
                     micro_batches: int, policy: str, compute_bytes: int, state_bytes_per_param: float,
                     param_category: Callable[[str], str]) -> dict[str, Any]:
    """Per schedule (the chosen one first): bubble fraction and per-stage memory on one GPU of each pipeline rank
    — weights + gradients + optimizer state (`state_bytes_per_param` per parameter held), activations of the
    micro-batches in flight at the rank's peak, and the blocks' gathered weights kept between forward and backward
    when `reshard_after_forward` is false (the default under a pipeline; `true` frees them and gathers again for
    the backward)."""
    pp, dp = layout.pp, layout.gpus // layout.pp
    chosen = layout.pp_schedule
    acts = activation_memory(cfg, micro_batch, seq_len, policy, compute_bytes, layout.ep)
    out: dict[str, Any] = {"pp": pp, "data_parallel_per_stage": dp, "micro_batches_per_run": micro_batches,
                           "costs": "unit costs: forward 1, backward 2 (input 1 + weight 1); communication not "
                                    "modelled", "schedules": {}}
    for schedule in [chosen, *[s for s in SCHEDULES if s != chosen]]:
        v = virtual_stages(schedule, layout.pp_virtual if schedule == chosen else -1)
        if cfg.num_hidden_layers < pp * v or (schedule == "dualpipev" and micro_batches < 2 * pp):
            continue
        split = split_layers(cfg, pp * v, seq_len)

        def stage_acts(s: int, split: list[list[int]] = split) -> float:
            layers = sum(acts.moe_layer if cfg.is_moe_layer(i) else acts.dense_layer for i in split[s])
            return layers + (acts.outside if s == len(split) - 1 else 0)

        try:  # torch's schedules refuse some micro-batch counts (e.g. interleaved 1F1B's rounds)
            timeline = simulate(schedule, pp, v, micro_batches, stage_acts)
        except ValueError as e:
            if schedule == chosen:
                raise
            out["schedules"][schedule] = {"virtual_stages": v, "refused": str(e)}
            continue
        held = [0.0] * (pp * v)  # parameters per GPU, by stage
        gathered = [0.0] * (pp * v)  # block weights one GPU gathers for its stage (compute dtype)
        for name, p in model.named_parameters():
            s = stage_of_parameter(name, split)
            expert = param_category(name) == "routed_experts"
            held[s] += p.numel() / dp
            if name.startswith("layers."):
                gathered[s] += p.numel() / (layout.ep if expert else 1) * compute_bytes
        ranks = []
        for r in range(pp):
            stages = stage_ids(schedule, pp, v, r)
            state = sum(held[s] for s in stages) * state_bytes_per_param
            kept = sum(gathered[s] for s in stages)
            ranks.append({"stages": stages, "layers": [split[s] for s in stages], "state_bytes": state,
                          "activation_bytes": timeline.peak_bytes[r],
                          "in_flight_micro_batches": {str(k): n for k, n in timeline.peak_in_flight[r].items()},
                          "gathered_weights_bytes": kept,
                          "total_bytes_reshard_false": state + timeline.peak_bytes[r] + kept,
                          "total_bytes_reshard_true": state + timeline.peak_bytes[r]})
        out["schedules"][schedule] = {"virtual_stages": v, "bubble": timeline.bubble,
                                      "ideal_1f1b_bubble": (pp - 1) / (micro_batches * v + pp - 1),
                                      "ranks": ranks}
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_pipeline(section: dict[str, Any], chosen: str, w: int = 44) -> list[str]:
    """The pipeline table: bubble per schedule, then each pipeline rank's memory under the chosen one."""
    lines = [f"Pipeline: pp {section['pp']} x dp {section['data_parallel_per_stage']}, "
             f"{section['micro_batches_per_run']} micro-batches per run ({section['costs']})"]
    lines.append(f"  {'schedule':<{w - 2}}{'virtual':>10}{'bubble':>12}{'1f1b formula':>14}")
    for name, sched in section["schedules"].items():
        mark = " (chosen)" if name == chosen else ""
        if "refused" in sched:
            lines.append(f"  {name:<{w - 2}}{sched['virtual_stages']:>10}  refused by torch: {sched['refused']}")
            continue
        lines.append(f"  {name + mark:<{w - 2}}{sched['virtual_stages']:>10}{sched['bubble']:>12.1%}"
                     f"{sched['ideal_1f1b_bubble']:>14.1%}")
    ranks = section["schedules"][chosen]["ranks"]
    lines.append(f"  per pipeline rank ({chosen}): layers; weights+grads+optimizer; activations in flight; "
                 "gathered blocks (reshard_after_forward=false)")
    for r, rank in enumerate(ranks):
        layers = ",".join(f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else str(ls[0]) for ls in rank["layers"])
        flight = sum(rank["in_flight_micro_batches"].values())
        lines.append(f"    rank {r:<3} layers {layers:<14} {_gib(rank['state_bytes']):>11} "
                     f"{_gib(rank['activation_bytes']):>11} ({flight} mb) {_gib(rank['gathered_weights_bytes']):>11}"
                     f"  = {_gib(rank['total_bytes_reshard_false'])} (reshard true: "
                     f"{_gib(rank['total_bytes_reshard_true'])})")
    lines.append("  below: traffic and compute of one stage (1/pp of the layers, data-parallel group gpus/pp), weights "
                 "gathered once per step and kept (reshard_after_forward=false), step time / (1 - bubble); the fit is "
                 "the fullest pipeline rank's")
    lines.append("")
    return lines


def heaviest_pipeline_rank(model: nn.Module, cfg: ModelConfig, layout: Any, seq_len: int) -> Callable[[str], bool]:
    """A predicate on parameter names: those of the pipeline rank holding the most parameters (all without one)."""
    if layout.pp == 1:
        return lambda name: True
    v = virtual_stages(layout.pp_schedule, layout.pp_virtual)
    split = split_layers(cfg, layout.pp * v, seq_len)
    rank_of = {s: r for r in range(layout.pp) for s in stage_ids(layout.pp_schedule, layout.pp, v, r)}
    per_rank = [0] * layout.pp
    for name, p in model.named_parameters():
        per_rank[rank_of[stage_of_parameter(name, split)]] += p.numel()
    heaviest = max(range(layout.pp), key=per_rank.__getitem__)
    return lambda name: rank_of[stage_of_parameter(name, split)] == heaviest


def offload_section(fit: dict[str, Any], layout: Any, hw: Any) -> dict[str, Any]:
    """Per-GPU memory with and without `optim.offload: cpu`, and the host memory it takes per node; under offload the
    fit itself counts no sharded state on the GPU (FSDP2 copies each unit in for its all-gather)."""
    state = fit["parts"]["state"]
    on_gpu = fit["bytes"] - state
    if layout.offload == "cpu":
        fit["parts"]["state"] = 0.0
        fit["bytes"] = on_gpu
        fit["devices"] = {name: {"memory_bytes": d["memory_bytes"], "fits": on_gpu <= d["memory_bytes"]}
                          for name, d in fit["devices"].items()}
    return {"chosen": layout.offload, "state_bytes_per_gpu": state,
            "gpu_bytes": {"none": on_gpu + state, "cpu": on_gpu},
            "host_bytes_per_node_cpu": state * min(hw.gpus_per_node, layout.gpus),
            "note": "offloaded: weights, gradients and optimizer states (fp32 shards) live in host memory; each "
                    "step copies every unit in for its all-gather and the gradients out (over PCIe, not modelled "
                    "in the step time); AdamW steps on the host, Newton-Schulz on the GPU"}
