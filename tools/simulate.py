"""One training step of a real layout, played by one rank of a simulated world: `python -m tools.simulate`.

The code that runs is the training code — `Transformer`, `parallelize` (expert parallelism, the configured
activation checkpointing, FSDP2 with the bf16 policy), `build_optimizer` (Muon with distributed Newton–Schulz),
the gradient-norm and statistics reductions, the post-step hooks — at the preset's real layer shapes, on a process
group that has no peers (tools/sim_pg.py): each collective returns at once and is recorded. Parameters are
materialised only for the simulated rank. So the bytes, placements, collectives and Newton–Schulz ownership it
reports are the code's own; the values it computes are not meaningful (gathers return zeros) and routing is
forced balanced, the only routing the simulation can make consistent across the ranks it does not run.

    python -m tools.simulate --config configs/k2-1t.yaml --gpus 2048 --ep 64 [--layers 3] [--rank 0]
    python -m tools.simulate --config configs/k2-1t.yaml --gpus 2048 --pp 16 --ep 16   # the published K2 layout

Under a pipeline (`--pp`) the rank builds only its stages (parallel/pipeline.py's split and stage views, FSDP2 on
each view), runs one micro-batch forward and backward through each of them (a received activation or gradient
stands in for its neighbour's), and counts the point-to-point traffic at the stage boundaries from their shapes
(`p2p` rows): the simulated group has no peer to exchange with, so torch's schedule itself is not run. Gradient
clipping still reduces over the world (every stage's norm); statistics over the stage's data-parallel ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import Transformer
from models.config import ConfigError
from models.dtensor import local as local_of
from models.init import canonical_name
from models.moe import forced_balanced_routing
from optim import build_optimizer
from optim.distributed_ns import NSStats, orthogonalize
from optim.ns_plan import OwnershipPlan, layout_of, ns_flops, plan_ownership
from optim.param_groups import split_params
from parallel import (
    ParallelDims,
    PipelinePlan,
    StageModule,
    all_reduce_max,
    all_reduce_sum,
    build_mesh,
    clip_grad_norm_,
    dp_mesh,
    parallelize,
    plan_pipeline,
)
from tools.plan_comms import Hardware
from tools.sim_pg import LEDGER, init_simulated_world
from train.config import ExperimentConfig, load_config
from train.step_hooks import register_post_step_hooks

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default, torch.ops.aten._grouped_mm.default}


class _ShapeOnlyGemms(TorchDispatchMode):
    """GEMMs return zeros of the shape and dtype the real kernel would give (computed on the meta device), without
    the arithmetic: the values of a simulated step mean nothing, and at K2 shapes the arithmetic (on a CPU, in
    bf16) would take most of its time. Every other op, every collective and every byte count is unchanged."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
            out = func(*meta, **(kwargs or {}))
            return torch.zeros(out.shape, dtype=out.dtype, device=args[0].device)
        return func(*args, **(kwargs or {}))


def _nbytes(t: torch.Tensor) -> int:
    local = local_of(t)
    return local.numel() * local.element_size()


@dataclasses.dataclass
class Simulation:
    """What one simulated step produced (all per simulated rank)."""

    world: int
    ep: int
    rank: int
    pp: int
    layers: int
    tokens: int
    params: dict[str, dict[str, Any]]  # name -> placements, global and local shape
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    collectives: list[dict[str, Any]]  # Ledger.summary(): per (phase, op, group size)
    newton_schulz: dict[str, Any]  # ownership (the optimizer's own plan) and this rank's measured figures
    seconds: float
    phase_seconds: dict[str, float]  # wall time of set-up, forward, backward, reduce, optimizer on this CPU
    peak_rss_gb: float
    model: Transformer | None = None
    optimizer: torch.optim.Optimizer | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("model")
        out.pop("optimizer")
        return out


class _LargestTensor(TorchDispatchMode):
    """The largest tensor any op produced while active (bytes): no rank may build a whole expert stack."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                t = getattr(t, "_local_tensor", t)  # a DTensor's own shard, not its global size
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def _muon_params(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """The parameters Muon orthogonalizes, in the optimizer's order."""
    return split_params(model)["matrix"]


def ownership(model: Transformer, steps: int) -> OwnershipPlan:
    """The Newton–Schulz owner of every matrix Muon orthogonalizes in `model`: the optimizer's own plan
    (optim/distributed_ns.py), from the parameters' layouts; no process group is used."""
    return plan_ownership([layout_of(p) for _, p in _muon_params(model)], steps)


def full_depth_ownership(model: Transformer, full_cfg: Any, steps: int) -> OwnershipPlan | None:
    """The ownership plan of the full-depth model from the layouts of the simulated (shortened, unpipelined) one:
    `parallelize` lays out every block of a kind (dense FFN or MoE) alike, so layer i of the full model has the
    layouts of the simulated layer of its kind. None if the simulated model lacks a kind the full one has. (At
    world 2048 this spares FSDP2's sharding of 61 meta layers, most of a K2 simulation's minute; the tests check
    it against parallelizing the full depth.)"""
    sim = {canonical_name(n): p for n, p in _muon_params(model)}
    built = sorted({int(n.split(".")[1]) for n in sim if n.startswith("layers.")})
    kind_of = {i: i >= full_cfg.first_k_dense_replace for i in range(full_cfg.num_hidden_layers)}
    representative = {}
    for i in built:
        representative.setdefault(kind_of[i], i)
    with torch.device("meta"):
        full = Transformer(full_cfg)
    layouts = []
    for name, _ in _muon_params(full):
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if kind_of[int(index)] not in representative:
                return None
            name = f"layers.{representative[kind_of[int(index)]]}.{rest}"
        layouts.append(layout_of(sim[name]))
    return plan_ownership(layouts, steps)


def team_nodes(teams: list[tuple[int, ...]], per_node: int = Hardware.gpus_per_node) -> dict[str, int]:
    """How many nodes of `per_node` consecutive ranks (as torchrun and Slurm number them) the teams span: the most
    for one team, and how many teams span more nodes than their size needs (their Gram sums cross nodes that a
    node-local team would not)."""
    spans = [(len({r // per_node for r in t}), -(-len(t) // per_node)) for t in teams]
    return {"team_nodes_max": max((n for n, _ in spans), default=0),
            "teams_spanning_extra_nodes": sum(n > need for n, need in spans)}


def _meta_model(model_cfg: Any, mesh: Any, cfg: ExperimentConfig, plan: PipelinePlan | None) -> Transformer:
    """The full-depth model (this pipeline rank's stages of it), parallelized on `mesh` on the meta device
    (layouts only, no memory)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    parallelize(model, mesh, activation_checkpointing=cfg.parallel.activation_checkpointing,
                param_dtype=torch.bfloat16, pipeline=plan)
    return model


def _plan(cfg: ExperimentConfig, model_cfg: Any, mesh: Any, pp: int, seq_len: int) -> PipelinePlan | None:
    if pp == 1:
        return None
    p = cfg.parallel
    return plan_pipeline(model_cfg, seq_len, pp, p.pp_schedule, p.pp_virtual_stages, mesh["pp"].get_local_rank())


def _stage_step(stages: list[StageModule], ids: torch.Tensor, dtype: torch.dtype) -> None:
    """One micro-batch forward through each of this rank's stages, then backward; what a neighbour would send
    (activations, gradients) is a zero tensor, and its size is recorded as the boundary's point-to-point traffic."""
    outputs = []
    for stage in stages:
        x = ids
        if not stage.is_first:
            x = torch.zeros(*ids.shape, stage.rotary.cfg.hidden_size, dtype=dtype, requires_grad=True)
            LEDGER.add("p2p recv", 2, _nbytes(x), _nbytes(x))
        out = stage(x)
        if not stage.is_last:
            LEDGER.add("p2p send", 2, _nbytes(out), 0)
        outputs.append(out)
    LEDGER.phase = "backward"
    for stage, out in zip(reversed(stages), reversed(outputs), strict=True):
        if stage.is_last:
            F.cross_entropy(out.float().flatten(0, 1), ids.flatten()).backward()
        else:
            LEDGER.add("p2p recv", 2, _nbytes(out), _nbytes(out))
            out.backward(torch.zeros_like(out))
        if not stage.is_first:
            LEDGER.add("p2p send", 2, ids.numel() * stage.rotary.cfg.hidden_size * out.element_size(), 0)


def simulate(cfg: ExperimentConfig, world: int, ep: int, rank: int = 0, layers: int | None = None,
             seq_len: int = 32, micro_batch: int = 1, ns_steps: int = 0, keep: bool = False,
             pp: int | None = None) -> Simulation:
    """Run one step of `cfg` as rank `rank` of `world` with `ep`-way expert parallelism (see the module docstring).
    One simulated world per process: torch caches meshes by layout, so a second call in the same process with
    another rank would see the first one's coordinates (the command and the tests run each in a fresh process).

    `layers` shortens the model (default: the config's depth); the ownership over the full depth is planned too.
    `ns_steps=0` (the default) runs the optimizer's distributed Newton–Schulz with shape-only GEMMs: ownership,
    packing, the all-to-alls, the teams' Gram sums and the scatter back run as in training, the products' arithmetic
    does not (minutes of CPU per K2 matrix, on meaningless values); FLOPs are counted for the config's iterations.
    `ns_steps=N` runs N real iterations. `pp` (default: the config's `parallel.pp`): pipeline stages (module
    docstring)."""
    t0 = time.perf_counter()
    pp = cfg.parallel.pp if pp is None else pp
    model_cfg = cfg.model if layers is None else dataclasses.replace(cfg.model, num_hidden_layers=layers)
    dims = ParallelDims.from_config(dataclasses.replace(cfg.parallel, ep=ep, dp_shard=-1, pp=pp), world,
                                    model_cfg.n_routed_experts)
    init_simulated_world(rank, world)
    mesh = build_mesh(dims, "cpu")
    plan = _plan(cfg, model_cfg, mesh, pp, seq_len)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    stages = parallelize(model, mesh, activation_checkpointing=cfg.parallel.activation_checkpointing,
                         param_dtype=torch.bfloat16, pipeline=plan)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.train.seed)
    optim_cfg = {**dataclasses.asdict(cfg.optim), "ns_steps": ns_steps or cfg.optim.ns_steps}
    optimizer = build_optimizer(model, optim_cfg)
    register_post_step_hooks(optimizer, model, cfg.optim.qk_clip_tau)
    ns_stats = NSStats()
    distributed = optimizer.orthogonalize is orthogonalize
    if distributed:  # the same function, with this rank's figures recorded (and, by default, no GEMM arithmetic)
        def recording(updates: list[torch.Tensor], ns: Callable) -> list[torch.Tensor]:
            with _ShapeOnlyGemms() if ns_steps == 0 else contextlib.nullcontext():
                return orthogonalize(updates, ns, stats=ns_stats)
        optimizer.orthogonalize = recording
    model.train()

    ids = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    model.reset_stats()
    with forced_balanced_routing(model), _ShapeOnlyGemms():
        LEDGER.phase = "forward"
        marks = {"setup": time.perf_counter() - t0}
        if stages is not None:
            _stage_step(stages, ids, torch.bfloat16)
        else:
            out = model(ids)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten()) + out.balance_loss
            LEDGER.phase = "backward"
            marks["forward"] = time.perf_counter() - t0
            loss.backward()
    marks["backward"] = time.perf_counter() - t0
    LEDGER.phase = "reduce"  # what the trainer reduces per step: the gradient norm and the statistics buckets
    clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    stats = model.stats_buckets()
    group = dp_mesh(mesh).get_group()
    stats.sum, stats.max = all_reduce_sum(stats.sum, group), all_reduce_max(stats.max, group)
    model.load_stats(stats)
    LEDGER.phase = "optimizer"
    marks["reduce"] = time.perf_counter() - t0
    with _LargestTensor() as largest:
        optimizer.step()  # Muon's distributed Newton–Schulz, then the router-bias and QK-Clip hooks
    marks["optimizer"] = time.perf_counter() - t0
    grad_bytes = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    LEDGER.phase = "done"

    params = {name: {"placements": [str(pl) for pl in getattr(p, "placements", [])], "shape": list(p.shape),
                     "local_shape": list(local_of(p).shape)} for name, p in model.named_parameters()}
    state_bytes = sum(_nbytes(t) for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    steps = cfg.optim.ns_steps
    here = ownership(model, steps)
    full = here if layers is None else (full_depth_ownership(model, cfg.model, steps) if pp == 1 else None)
    if full is None:  # a pipeline rank's stages at full depth are other layers: parallelize them (on meta)
        full = ownership(_meta_model(cfg.model, mesh, cfg, _plan(cfg, cfg.model, mesh, pp, seq_len)), steps)
    loads = full.per_rank()
    owners = dp_mesh(mesh).mesh.flatten().tolist()  # NS runs over the stage's ranks (all, without a pipeline)
    flops = [loads[r].flops if r in loads else 0 for r in owners]
    mine = here.per_rank().get(rank)
    names = [name for name, _ in _muon_params(model)]  # the plan's tensor order
    ns = {
        "ns_steps_counted": steps, "ns_steps_run": ns_steps,
        "matrices": len(here.matrices), "total_flops": here.total_flops,
        "team_matrices": sum(len(m.team) > 1 for m in here.matrices),
        "this_rank": {
            "owned_matrices": mine.matrices if mine else 0, "planned_flops": mine.flops if mine else 0,
            "run_flops": ns_stats.local_flops, "bytes_received_to_assemble": ns_stats.bytes_received_gather,
            "min_bytes_to_assemble": ns_stats.min_bytes_gather, "bytes_received": ns_stats.bytes_received,
            "collectives": ns_stats.collectives, "largest_ns_input": list(ns_stats.largest_ns_input),
            "largest_tensor_bytes_in_step": largest.bytes,
        },
        "full_depth": {"layers": cfg.model.num_hidden_layers, "matrices": len(full.matrices),
                       "total_flops": full.total_flops, "per_rank_flops_min": min(flops),
                       "per_rank_flops_max": max(flops), "per_rank_flops_mean": sum(flops) / len(owners),
                       "owner_ranks": len(owners), "team_matrices": sum(len(m.team) > 1 for m in full.matrices),
                       "team_bytes_max": max((x.team_bytes for x in loads.values()), default=0),
                       **team_nodes([m.team for m in full.matrices if len(m.team) > 1]),
                       # of one matrix orthogonalized whole (a team's block form costs more in all)
                       "largest_matrix_flops": max(ns_flops(lay.shape[-2:], steps) for lay in full.layouts)},
        "owners": [[names[m.tensor], m.index, list(m.team)] for m in here.matrices],  # one rank, or a team
    } if distributed else {}
    sim = Simulation(
        world=world, ep=ep, rank=rank, pp=pp, layers=model_cfg.num_hidden_layers, tokens=micro_batch * seq_len,
        params=params, param_bytes=sum(_nbytes(p) for p in model.parameters()), grad_bytes=grad_bytes,
        optimizer_state_bytes=state_bytes, collectives=LEDGER.summary(), newton_schulz=ns,
        seconds=time.perf_counter() - t0,
        phase_seconds={k: v - prev for (k, v), prev in zip(marks.items(), [0.0, *marks.values()], strict=False)},
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    if keep:
        sim.model, sim.optimizer = model, optimizer
    else:
        torch.distributed.destroy_process_group()  # leave no simulated world behind for the caller's own code
    return sim


def _gb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def render(sim: Simulation, config: str) -> str:
    pp = f", pp {sim.pp}" if sim.pp > 1 else ""
    lines = [f"Chogori simulated step: {config}   world {sim.world}{pp}, ep {sim.ep}, as rank {sim.rank}   "
             f"({sim.layers} layers, {sim.tokens} tokens per micro-batch; collectives returned at once)", ""]
    lines.append(f"  parameters (fp32 shards)   {_gb(sim.param_bytes):>14}")
    lines.append(f"  gradients                  {_gb(sim.grad_bytes):>14}")
    lines.append(f"  optimizer state            {_gb(sim.optimizer_state_bytes):>14}")
    lines += ["", f"  {'phase':<10} {'collective':<15} {'group':>6} {'calls':>6} {'buffers':>14} {'received':>14}"]
    for row in sim.collectives:
        lines.append(f"  {row['phase']:<10} {row['op']:<15} {row['group_size']:>6} {row['calls']:>6} "
                     f"{_gb(row['buffer_bytes']):>14} {_gb(row['recv_bytes']):>14}")
    ns = sim.newton_schulz
    if ns:
        me, full = ns["this_rank"], ns["full_depth"]
        lines += ["", f"  Newton–Schulz ({ns['ns_steps_counted']} iterations counted, {ns['ns_steps_run']} run): "
                      f"{ns['matrices']:,} matrices, each orthogonalized once: by one rank, or "
                      f"{ns['team_matrices']} by a team splitting its long side",
                  f"    this rank owns {me['owned_matrices']} ({me['planned_flops'] / 1e12:.3f} TFLOP); received "
                  f"{_gb(me['bytes_received_to_assemble'])} to assemble them "
                  f"(minimum {_gb(me['min_bytes_to_assemble'])}), "
                  f"{_gb(me['bytes_received'])} in all, in {me['collectives']} collectives",
                  f"    largest NS input {me['largest_ns_input']}; largest tensor made in the optimizer step "
                  f"{_gb(me['largest_tensor_bytes_in_step'])}",
                  f"    full depth ({full['layers']} layers{' of this pipeline rank' if sim.pp > 1 else ''}, "
                  f"{full['matrices']:,} matrices over {full['owner_ranks']} ranks, "
                  f"{full['total_flops'] / 1e15:.2f} PFLOP): per rank {full['per_rank_flops_min'] / 1e12:.3f} - "
                  f"{full['per_rank_flops_max'] / 1e12:.3f} TFLOP, mean {full['per_rank_flops_mean'] / 1e12:.3f} "
                  f"(largest single matrix, whole: {full['largest_matrix_flops'] / 1e12:.3f}); {full['team_matrices']} "
                  f"matrices split over teams, whose Gram sums a rank receives at most "
                  f"{_gb(full['team_bytes_max'])} of; a team spans at most {full['team_nodes_max']} nodes of "
                  f"{Hardware.gpus_per_node} GPUs ({full['teams_spanning_extra_nodes']} span more than their size "
                  "needs)"]
    by_placement: dict[str, int] = defaultdict(int)
    for p in sim.params.values():
        by_placement[" x ".join(p["placements"]) or "plain"] += 1
    lines += ["", "  parameter placements: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_placement.items()))]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in sim.phase_seconds.items())
    lines.append(f"  simulated in {sim.seconds:.1f} s ({phases}), peak resident memory {sim.peak_rss_gb:.1f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True, help="world size to simulate")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: the config's)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the config's)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="shorten the model (default: full depth)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--ns-steps", type=int, default=0,
                        help="Newton–Schulz iterations to really run (default 0: the distribution only)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(Path(args.config), args.overrides)
        ep = args.ep if args.ep is not None else cfg.parallel.ep
        sim = simulate(cfg, args.gpus, ep, rank=args.rank, layers=args.layers, seq_len=args.seq_len,
                       ns_steps=args.ns_steps, pp=args.pp)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(sim.to_json(), indent=1) if args.json else render(sim, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
