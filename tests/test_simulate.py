"""A training step at world 2048, ep 64, played by one rank (tools/simulate.py): the real model build, expert
parallelism, FSDP2 with the bf16 policy, forward/backward, the reductions and Muon's distributed Newton–Schulz with
its post-step hooks, at the presets' real layer shapes, on a process group whose collectives return at once.

Depth is cut to the first MoE layer and the vocabulary to 4096 so that a test takes half a minute; the
Newton–Schulz ownership is planned over the full depth from the optimizer's own code."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tools.plan import main as plan_main
from tools.simulate import main
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # half a minute per preset on 2 cores, 5 GB of memory

SMALL_VOCAB = ["model.vocab_size=4096", "model.bos_token_id=0", "model.eos_token_id=1"]


# Each simulation is one fresh process (one process plays one rank of one world). They are mostly single-threaded
# Python (model build, sharding, ownership planning), so the module's four run two at a time, in the background
# from the moment the session knows it will run them (`start_simulations`, called by tests/conftest.py after
# collection) at a lower priority (nice 10), so they fill the CPU the tests before them leave idle; each test then
# waits for its own report.
_RUNS: dict[tuple, tuple[str, ...]] = {
    ("k2-1t", 2, 0): ("--ep", "64"),
    ("deepseek-v3-671b", 4, 1337): ("--ep", "64"),
    ("k2-1t", 32, 2047): ("--ep", "16", "--pp", "16", "parallel.pp_schedule=interleaved_1f1b"),
    ("deepseek-v3-671b", 32, 130): ("--ep", "64", "--pp", "16", "parallel.pp_schedule=dualpipev"),
}
_FUTURES: dict[tuple, Future] = {}


def _run(key: tuple) -> subprocess.CompletedProcess:
    preset, layers, rank = key
    flags = [a for a in _RUNS[key] if "=" not in a]
    overrides = [a for a in _RUNS[key] if "=" in a]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The timeout is generous: at nice 10 a simulation may wait behind the tests while they keep both cores busy.
    return subprocess.run([sys.executable, "-m", "tools.simulate", "--config", f"configs/{preset}.yaml", "--gpus",
                           "2048", "--rank", str(rank), "--layers", str(layers), "--json", *flags, *SMALL_VOCAB,
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
                          preexec_fn=lambda: os.nice(10))  # noqa: PLW1509


def start_simulations() -> None:
    """Start the four simulations in the background, two at a time (once per session)."""
    if not _FUTURES:
        pool = ThreadPoolExecutor(max_workers=2)
        _FUTURES.update({key: pool.submit(_run, key) for key in _RUNS})
        pool.shutdown(wait=False)


def _simulate(preset: str, layers: int, rank: int) -> dict:
    """The command's JSON report for one of `_RUNS`."""
    start_simulations()  # (a no-op when tests/conftest.py started them after collection)
    done = _FUTURES[(preset, layers, rank)].result()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# The first MoE layer is layer 1 in K2 and layer 3 in DeepSeek-V3: simulate up to it.
@pytest.mark.parametrize("preset,layers,rank", [("k2-1t", 2, 0), ("deepseek-v3-671b", 4, 1337)])
def test_world_2048_step(preset: str, layers: int, rank: int) -> None:
    full_cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [])
    sim = _simulate(preset, layers, rank)
    m = full_cfg.model
    e_local = m.n_routed_experts // 64
    params = sim["params"]

    # Placements: dense weights row-sharded over all 2048 ranks; an expert stack is split over the ep group by
    # experts and over its 32-rank dp_mod_ep group by each matrix's rows (fewer local experts than ranks to share
    # them): dim 1 of down_proj [E, H, I], dim 2 of gate_up_proj [E, 2, I, H].
    stacks = {n: p for n, p in params.items() if ".experts." in n}
    assert {n.rsplit(".", 1)[1] for n in stacks} == {"gate_up_proj", "down_proj"}
    assert all(p["placements"] == [f"S({len(p['shape']) - 2})", "S(0)"] for p in stacks.values())
    for p in stacks.values():
        assert p["local_shape"][0] == e_local and p["local_shape"][-2] == math.ceil(p["shape"][-2] / 32)
    dense = [p for n, p in params.items() if n not in stacks and len(p["shape"]) == 2]
    assert dense and all(p["placements"] == ["S(0)"] for p in dense)

    # Collectives issued by the code: FSDP over 2048 (dense) and 32 (experts), the EP all-to-all over 64, the
    # gradient reduce-scatter once, the step's reductions, and Newton–Schulz's bucketed all-to-alls.
    calls = {(c["phase"], c["op"], c["group_size"]): c for c in sim["collectives"]}
    assert calls[("forward", "all_gather", 2048)]["calls"] >= 2 and ("forward", "all_gather", 32) in calls
    assert calls[("forward", "all_to_all", 64)]["calls"] == 3  # split sizes, dispatch, combine: one MoE layer
    assert calls[("backward", "all_to_all", 64)]["calls"] == 2  # selective checkpointing does not re-send
    assert calls[("backward", "reduce_scatter", 32)]["calls"] == 1
    assert {k[2] for k in calls if k[0] == "optimizer"} <= {2048, 32}
    ns, me = sim["newton_schulz"], sim["newton_schulz"]["this_rank"]
    optimizer_calls = sum(c["calls"] for k, c in calls.items() if k[0] == "optimizer")
    # bucketed, not one per matrix: per key (experts' group, dense group) assemble and return, and where a group has
    # teams two per step of their Gram sums and two for the norms
    assert optimizer_calls == me["collectives"] <= 2 * (2 + 2 * (ns["ns_steps_counted"] + 1))

    # Every matrix is orthogonalized exactly once across the world, by one owner or one team of distinct ranks.
    owners = ns["owners"]  # [parameter, matrix index, global ranks of its team (one: its owner)]
    expected = sum(math.prod(params[name]["shape"][:-2]) for name in {o[0] for o in owners})
    assert len(owners) == ns["matrices"] == expected == len({(o[0], o[1]) for o in owners})
    assert all(0 <= r < 2048 for o in owners for r in o[2]) and all(len(set(o[2])) == len(o[2]) for o in owners)
    # an expert's owner is in the 32-rank group that holds it: the ranks of its expert-parallel coordinate (a
    # stack's matrices are numbered over its leading dims, [E] or [E, 2])
    per_expert = {o[0]: math.prod(params[o[0]]["shape"][1:-2]) for o in owners}
    assert all(r % 64 == o[1] // per_expert[o[0]] // e_local for o in owners if ".experts." in o[0] for r in o[2])
    assert me["run_flops"] == me["planned_flops"]  # this rank did what the plan says
    assert me["owned_matrices"] == sum(1 for o in owners if rank in o[2])

    # No rank holds a whole expert stack during the optimizer step; NS inputs are single matrices.
    stack_bytes = max(math.prod(p["shape"]) * 4 for p in stacks.values())
    biggest_matrix = max(math.prod(p["shape"][-2:]) * 4 for p in params.values() if len(p["shape"]) >= 2)
    assert me["largest_tensor_bytes_in_step"] <= 2 * biggest_matrix < stack_bytes / 10
    assert len(me["largest_ns_input"]) == (2 if me["owned_matrices"] else 0)  # (4 layers leave some ranks idle)

    # Bytes received to assemble what it owns: within 1.5x of the minimum (what it owns minus what it holds).
    assert me["bytes_received_to_assemble"] <= 1.5 * me["min_bytes_to_assemble"]

    # NS FLOPs per rank over the full depth, from the same ownership code: within 10% of total / world, though one
    # of DeepSeek-V3's dense FFN matrices costs more than a rank's share (22.6 TFLOP against a 15.8 TFLOP mean): its
    # long side is split over a team
    full = ns["full_depth"]
    assert full["layers"] == m.num_hidden_layers
    _assert_balanced(full, 2048)
    if preset == "deepseek-v3-671b":
        assert full["largest_matrix_flops"] > full["per_rank_flops_mean"] and full["team_matrices"] > 0
        # its teams (dense matrices; whole experts need none) stay within 3 nodes of 8 GPUs (60 of the 131 span a
        # node more than their size needs: their Gram sums, <= 1.9 GB a step per rank, cross the network)
        assert 1 <= full["team_nodes_max"] <= 3

    # Per-rank state from the code's own objects: fp32 shards, a gradient for each, Muon / AdamW state.
    assert sim["grad_bytes"] == sim["param_bytes"]
    assert sim["param_bytes"] <= sim["optimizer_state_bytes"] <= 2 * sim["param_bytes"]


def test_team_nodes_counts_nodes_of_consecutive_ranks() -> None:
    from tools.simulate import team_nodes

    assert team_nodes([(0, 7), (6, 9), (8, 9, 10), tuple(range(4, 20))], per_node=8) == {
        "team_nodes_max": 3, "teams_spanning_extra_nodes": 2}  # (6, 9) and 4..19 (16 ranks, 3 nodes, 2 needed)
    assert team_nodes([]) == {"team_nodes_max": 0, "teams_spanning_extra_nodes": 0}


def _assert_balanced(full: dict, ranks: int) -> None:
    mean = full["total_flops"] / ranks
    assert full["owner_ranks"] == ranks and full["per_rank_flops_mean"] == pytest.approx(mean)
    assert 0.9 * mean <= full["per_rank_flops_min"] <= full["per_rank_flops_max"] <= 1.1 * mean


# The published layouts: K2 pp 16 (interleaved 1F1B, 2 stages per rank) x ep 16; DeepSeek-V3 pp 16 (DualPipeV) x
# ep 64. 32 layers: two per stage, as the full depth gives each rank about four.
@pytest.mark.parametrize("preset,ep,schedule,rank,stages", [("k2-1t", 16, "interleaved_1f1b", 2047, [15, 31]),
                                                             ("deepseek-v3-671b", 64, "dualpipev", 130, [1, 30])])
def test_world_2048_pipeline_step(preset: str, ep: int, schedule: str, rank: int, stages: list[int]) -> None:
    from parallel.pipeline import split_layers

    sim = _simulate(preset, 32, rank)
    assert f"parallel.pp_schedule={schedule}" in _RUNS[(preset, 32, rank)]
    assert sim["pp"] == 16
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [*SMALL_VOCAB, "model.num_hidden_layers=32"]).model
    split = split_layers(cfg, 32, 32)
    mine = sorted(i for s in stages for i in split[s])
    layers = {int(n.split(".")[1]) for n in sim["params"] if n.startswith("layers.")}
    assert sorted(layers) == mine  # only its stages' layers were built
    assert ("lm_head.weight" in sim["params"]) == (31 in stages)
    assert ("embed_tokens.weight" in sim["params"]) == (0 in stages)
    # FSDP and Newton–Schulz inside the stage's 128 data-parallel ranks, the all-to-all inside ep, activations
    # point-to-point; only the gradient-norm all-reduce spans the world
    calls = {(c["phase"], c["op"], c["group_size"]): c for c in sim["collectives"]}
    assert {g for (_, op, g) in calls if op in ("all_gather", "reduce_scatter")} <= {128, 128 // ep}
    assert {g for (_, op, g) in calls if op == "all_to_all"} <= {ep, 128}
    assert [g for (_, op, g) in calls if g == 2048] == [2048] and ("reduce", "all_reduce", 2048) in calls
    assert {op for (_, op, _) in calls} >= {"p2p send", "p2p recv"}
    stage_ranks = set(range(rank // 128 * 128, rank // 128 * 128 + 128))
    assert {r for o in sim["newton_schulz"]["owners"] for r in o[2]} <= stage_ranks
    # balanced within 10% over the stage's full depth: K2's 12 TFLOP output projections land on top of every rank's
    # 36 whole experts, so they are split over teams (whole, the busiest rank would do 1.6x the mean)
    _assert_balanced(sim["newton_schulz"]["full_depth"], 128)
    # Where the teams are (`team_nodes`: nodes of 8 consecutive ranks, as torchrun numbers them): K2's are each one
    # node's 8 ranks; DeepSeek-V3's stay within 3 nodes, as without a pipeline (the planner picks the least-loaded
    # members, not the nearest: docs/architecture.md)
    full = sim["newton_schulz"]["full_depth"]
    assert full["team_matrices"] > 0
    if preset == "k2-1t":
        assert full["team_nodes_max"] == 1 and full["teams_spanning_extra_nodes"] == 0
    else:
        assert 1 <= full["team_nodes_max"] <= 3


def test_planner_simulate_mode_prints_the_report(capsys: pytest.CaptureFixture) -> None:
    """`python -m tools.plan --simulate` is the same command (in-process here: one small world, then left)."""
    assert plan_main(["--simulate", "--config", str(ROOT / "configs" / "tiny.yaml"), "--gpus", "8", "--ep", "2"]) == 0
    assert not torch.distributed.is_initialized()
    out = capsys.readouterr().out
    assert "world 8, ep 2" in out and "all_to_all" in out and "reduce_scatter" in out
    assert "each orthogonalized once" in out


def test_command_refuses_a_layout_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(ROOT / "configs" / "k2-1t.yaml"), "--gpus", "2048", "--ep", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel.ep") and "\n" not in err


def test_full_depth_ownership_from_the_simulated_layers_equals_parallelizing_the_full_depth() -> None:
    """The full-depth Newton–Schulz plan the simulator derives from the shortened model's layouts is the plan of
    the full-depth model parallelized on the same mesh (what it stands in for, to spare FSDP2's world-2048
    sharding of every layer)."""
    from parallel import ParallelDims, build_mesh
    from tools.simulate import _meta_model, full_depth_ownership, ownership, simulate

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_hidden_layers=6", "model.first_k_dense_replace=2"])
    sim = simulate(cfg, world=8, ep=2, rank=3, layers=3, keep=True)  # layers 0-1 dense, 2 MoE; 3-5 MoE not built
    try:
        dims = ParallelDims.from_config(dataclasses.replace(cfg.parallel, ep=2, dp_shard=-1), 8,
                                        cfg.model.n_routed_experts)
        parallelized = ownership(_meta_model(cfg.model, build_mesh(dims, "cpu"), cfg, None), 5)
        derived = full_depth_ownership(sim.model, cfg.model, 5)
        assert derived is not None and derived.matrices == parallelized.matrices
        assert len(derived.matrices) > len(ownership(sim.model, 5).matrices)  # the unbuilt layers are in it
        assert sim.newton_schulz["full_depth"]["matrices"] == len(parallelized.matrices)
    finally:
        torch.distributed.destroy_process_group()
