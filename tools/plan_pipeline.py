"""The pipeline side of a plan: each schedule's bubble and what each stage holds, from the schedules' own orders.

    simulate(schedule, pp, virtual, micro_batches) -> Timeline   # bubble, makespan, in-flight micro-batches
    pipeline_section(model, cfg, seq_len, layout, batch, ...)   # the plan's "pipeline" JSON section

The order of work on every pipeline rank is torch's own (`torch.distributed.pipelining`: the multi-stage
schedules compute each rank's list of actions; 1F1B and GPipe are written out here, since torch's visualiser
mislabels their ranks). `simulate` plays those lists against each other with unit costs — forward 1, full
backward 2, input-gradient backward 1, weight-gradient backward 1 (a backward is two matmuls per forward
matmul) — each action starting when its rank is free and its inputs exist (the previous stage's forward; the
next stage's backward). Communication is not modelled: point-to-point sends of one micro-batch's hidden states
are small next to a stage's compute, and DualPipeV's overlapped forward+backward pairs count as their sum
(overlap hides communication, not compute).

The bubble is the idle fraction of rank-time: 1 - busy / (ranks x makespan). Activations held for backward are
counted from a micro-batch's forward on a stage to the backward that consumes them (the weight-gradient half for
zero-bubble schedules: an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from models.config import ModelConfig
from parallel.pipeline import SCHEDULES, split_layers, stage_ids, virtual_stages
from tools.plan_activations import activation_memory

COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
_TORCH_NAMES = {"interleaved_1f1b": "Interleaved1F1B", "interleaved_zb": "InterleavedZeroBubble",
                "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}


def _single_stage_order(schedule: str, pp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    if schedule == "gpipe":
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    warmup = min(pp - 1 - rank, m)  # 1F1B: forwards in flight before the first backward
    order = [("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", rank, warmup + i), ("B", rank, i)]
    return order + [("B", rank, i) for i in range(m - warmup, m)]


def schedule_actions(schedule: str, pp: int, virtual: int, m: int) -> list[list[tuple[str, int, int]]]:
    """Per pipeline rank, the ordered (kind F|B|I|W, stage, micro-batch) actions `schedule` runs."""
    v = virtual_stages(schedule, virtual)
    if SCHEDULES[schedule][2] == 1:
        return [_single_stage_order(schedule, pp, m, r) for r in range(pp)]
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    ops = get_schedule_ops(_TORCH_NAMES[schedule], pp, m, num_stages_per_rank=v)
    out = []
    for rank_ops in ops:
        actions = []
        for a in rank_ops:
            if a is None:
                continue
            for sub in (a.sub_actions or (a,)) if hasattr(a, "sub_actions") else (a,):
                kind = str(sub.computation_type.value)
                if kind in COSTS:
                    actions.append((kind, sub.stage_index, sub.microbatch_index))
        out.append(actions)
    return out


@dataclass
class Timeline:
    makespan: float
    busy: list[float]  # per rank
    peak_in_flight: list[dict[int, int]]  # per rank: {stage: micro-batches whose activations it held at its peak}
    peak_bytes: list[float]  # per rank, with the stage sizes given to `simulate`

    @property
    def bubble(self) -> float:
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: str, pp: int, virtual: int, m: int,
             stage_bytes: Callable[[int], float] | None = None) -> Timeline:
    """Play `schedule`'s per-rank orders with unit costs (module docstring); `stage_bytes(stage)`: activation bytes
    one micro-batch leaves on that stage (for the peak per rank; default 1, i.e. count micro-batches)."""
    v = virtual_stages(schedule, virtual)
    n_stages = pp * v
    actions = schedule_actions(schedule, pp, v, m)
    done: dict[tuple[str, int, int], float] = {}
    clock, busy = [0.0] * pp, [0.0] * pp
    pos = [0] * pp
    held: list[dict[int, int]] = [dict() for _ in range(pp)]
    peak_in_flight: list[dict[int, int]] = [dict() for _ in range(pp)]
    size = stage_bytes or (lambda s: 1.0)
    held_bytes, peak_bytes = [0.0] * pp, [0.0] * pp

    def deps(kind: str, s: int, i: int) -> list[tuple[str, int, int]]:
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind == "W":
            return [("I", s, i)]
        # the gradient of a stage's output exists once the next stage's input-gradient part ran (a full backward
        # "B" counts as its "I" too: DualPipeV mixes both)
        grad_from = [] if s == n_stages - 1 else [("I", s + 1, i)]
        return [("F", s, i), *grad_from]

    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(actions[r]):
                kind, s, i = actions[r][pos[r]]
                need = deps(kind, s, i)
                if any(d not in done for d in need):
                    break
                start = max([clock[r], *(done[d] for d in need)])
                end = start + COSTS[kind]
                done[(kind, s, i)] = end
                if kind == "B":
                    done[("I", s, i)] = end
                clock[r], busy[r] = end, busy[r] + COSTS[kind]
                pos[r] += 1
                remaining -= 1
                progressed = True
                if kind == "F":
                    held[r][s] = held[r].get(s, 0) + 1
                    held_bytes[r] += size(s)
                    if held_bytes[r] > peak_bytes[r]:
                        peak_bytes[r] = held_bytes[r]
                        peak_in_flight[r] = dict(held[r])
                elif kind in ("B", "W"):
                    held[r][s] -= 1
                    held_bytes[r] -= size(s)
        if not progressed:
            raise RuntimeError(f"{schedule}: the simulated ranks wait on each other (pp={pp}, v={v}, m={m})")
    return Timeline(makespan=max(clock), busy=busy, peak_in_flight=peak_in_flight, peak_bytes=peak_bytes)


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
