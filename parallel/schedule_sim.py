"""The order of work of torch's pipeline schedules, played with unit costs: each schedule's bubble and the
micro-batches each pipeline rank holds. The planner (tools/plan_pipeline.py) and bench/pipeline.py read it.

    simulate(schedule, pp, virtual, micro_batches) -> Timeline   # bubble, makespan, in-flight micro-batches

The order of work on every pipeline rank is torch's own (`torch.distributed.pipelining`: the multi-stage
schedules compute each rank's list of actions; 1F1B and GPipe are written out here, since torch's visualiser
mislabels their ranks). `simulate` plays those lists against each other with unit costs — forward 1, full
backward 2, input-gradient backward 1, weight-gradient backward 1 (a backward is two matmuls per forward
matmul) — each action starting when its rank is free and its inputs exist (the previous stage's forward; the
next stage's backward). Communication is not modelled, and DualPipeV's overlapped forward+backward pairs count
as their sum (overlap hides communication, not compute).

The bubble is the idle fraction of rank-time: 1 - busy / (ranks x makespan). Activations held for backward are
counted from a micro-batch's forward on a stage to the backward that consumes them (the weight-gradient half for
zero-bubble schedules: an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallel.dims import SCHEDULES, virtual_stages

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
