"""Distributed Newton–Schulz: each matrix orthogonalized once, by its owner; results equal one process; the
ownership plan (a pure function) at K2 scale."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from optim import ns_plan
from optim.distributed_ns import (
    Layout,
    NSStats,
    _rows_of,
    assign_owners,
    dim_runs,
    layout_of,
    ns_block_flops,
    ns_flops,
    orthogonalize,
    plan_ownership,
)
from optim.newton_schulz import zeropower_via_newtonschulz5
from parallel.mesh import ParallelDims, build_mesh, dp_mesh
from tests.dist_harness import run_ranks

# uneven row counts (7 rows on 4 ranks leaves a rank empty), tall/wide/square, and an expert stack
SHAPES = [(7, 5), (16, 8), (3, 10), (12, 12), (30, 6), (5, 40)]
EXPERTS = (8, 6, 4)


def reference_ns(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Independent float64 quintic NS (the coefficients Muon uses), batched over leading dims."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x.double()
    tall = y.shape[-2] > y.shape[-1]
    if tall:
        y = y.transpose(-2, -1)
    y = y / (y.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        m = y @ y.transpose(-2, -1)
        y = a * y + (b * m + c * m @ m) @ y
    if tall:
        y = y.transpose(-2, -1)
    return y.to(x.dtype)


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES] + [torch.randn(EXPERTS, generator=g)]


def _worker(rank: int, world: int, out_path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = _inputs()
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    for t in sharded[:-1]:  # the padding arithmetic assumes FSDP's torch.chunk split; check it holds
        assert t.to_local().shape[0] == _rows_of(t.shape[0], world, rank)
    stats = NSStats()
    result = orthogonalize(sharded, reference_ns, stats=stats)
    assert all(isinstance(r, DTensor) and r.placements == s.placements for r, s in zip(result, sharded, strict=True))
    gathered = [r.full_tensor() for r in result]
    flops = torch.tensor([float(stats.local_flops)])
    all_flops = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(all_flops, flops)
    if rank == 0:
        torch.save({"results": gathered, "flops": [f.item() for f in all_flops], "total": stats.total_flops}, out_path)


@pytest.mark.slow  # a gloo world: 4-8 s on 2 cores
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_ns_equals_single_process_and_splits_the_work(tmp_path: Path, world: int) -> None:
    run_ranks(_worker, world, str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt")
    for got, x in zip(out["results"], _inputs(), strict=True):
        torch.testing.assert_close(got, reference_ns(x), rtol=0, atol=0)  # same math, same rank-local inputs
    total = sum(ns_flops(s) for s in SHAPES) + ns_flops(EXPERTS)
    assert out["total"] == total
    # each dense matrix once, on one owner; the expert stack on every rank, each its own experts
    assert sum(out["flops"]) == total
    biggest = max(ns_flops(s) for s in SHAPES)
    assert max(out["flops"]) <= total / world + biggest  # greedy LPT bound: ~1/N of the work per rank


def test_single_process_plain_tensors_pass_through() -> None:
    xs = _inputs()
    stats = NSStats()
    for got, x in zip(orthogonalize(xs, reference_ns, stats=stats), xs, strict=True):
        torch.testing.assert_close(got, reference_ns(x), rtol=0, atol=0)
    assert stats.local_flops == stats.total_flops and stats.bytes_moved == 0


def test_owner_assignment_balances_flops() -> None:
    shapes = [(64, 64)] * 4 + [(32, 32)] * 8 + [(128, 16)]
    owners = assign_owners(shapes, 4)
    loads = [sum(ns_flops(s) for s, o in zip(shapes, owners, strict=True) if o == r) for r in range(4)]
    assert max(loads) <= sum(loads) / 4 + max(ns_flops(s) for s in shapes)
    # The best split there is: one 64x64 and two 32x32 per rank, the small matrix on top of one of them.
    even = ns_flops((64, 64)) + 2 * ns_flops((32, 32))
    assert sorted(loads) == [even, even, even, even + ns_flops((128, 16))]


# --- any placement on the (dp_mod_ep, ep) mesh -------------------------------------------------------------

# (shape, placements on the 2x2 mesh (dp_mod_ep, ep)): every way a Muon update can be split
MESH_CASES = [
    ((2, 16, 8), (Shard(1), Shard(0))),  # expert-FSDP with 1 local expert < dp_mod_ep: rows split
    ((2, 8, 16), (Shard(1), Shard(0))),
    ((8, 6, 10), (_StridedShard(0, split_factor=2), Shard(0))),  # expert-FSDP on EP with whole experts
    ((2, 10, 7), (Shard(2), Shard(0))),  # columns split
    ((3, 9, 5), (Shard(1), Shard(1))),  # rows split over both mesh dims (the world group)
    ((4, 7, 6), (Replicate(), Shard(1))),  # rows split over ep, replicated over dp_mod_ep
    ((2, 5, 3, 4), (Shard(2), Shard(1))),  # two leading dims
]
DENSE = [(7, 5), (3, 10)]  # Shard(0) over the flattened "dp" mesh, as FSDP2 shards dense weights


def _mesh_inputs(copies: int) -> list[tuple[torch.Tensor, tuple | None]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(copies):  # copies: more matrices (more layers), the same keys
        out += [(torch.randn(s, generator=g), p) for s, p in MESH_CASES]
        out += [(torch.randn(s, generator=g), None) for s in DENSE]
        out.append((torch.randn((5, 7), generator=g, dtype=torch.float64), None))  # a second dtype
    return out


def _local_indices(x: torch.Tensor, d: DTensor) -> tuple[torch.Tensor, ...]:
    """Index tensors selecting this rank's shard of `x` (the global tensor of `d`), by `dim_runs`."""
    coord = d.device_mesh.get_coordinate()
    idx = [torch.tensor([i for a, b in dim_runs(x.shape[k], k, x.ndim, d.device_mesh.shape, d.placements, coord)
                         for i in range(a, b)], dtype=torch.long) for k in range(x.ndim)]
    return torch.meshgrid(*idx, indexing="ij")


def _mesh_worker(rank: int, world: int, out_path: str) -> None:
    mesh = build_mesh(ParallelDims(world, world, 2), "cpu")
    report = {}
    for copies in (1, 3):
        inputs = _mesh_inputs(copies)
        sharded = [distribute_tensor(x, dp_mesh(mesh), [Shard(0)]) if p is None
                   else distribute_tensor(x, mesh["dp_mod_ep", "ep"], p)
                   for x, p in inputs]
        for (x, _), d in zip(inputs, sharded, strict=True):  # dim_runs is DTensor's own split
            assert torch.equal(d.to_local(), x[_local_indices(x, d)])
        stats = NSStats()
        result = orthogonalize(sharded, reference_ns, stats=stats)
        for (x, _), d, r in zip(inputs, sharded, result, strict=True):
            assert r.placements == d.placements and r.shape == d.shape
            # compared shard by shard: full_tensor() is wrong for uneven nested splits of one dim (torch 2.13)
            torch.testing.assert_close(r.to_local(), reference_ns(x)[_local_indices(x, d)], rtol=0, atol=1e-6)
        plan = plan_ownership([layout_of(d) for d in sharded], split=False)  # reference_ns: whole matrices
        mine = plan.per_rank()[rank]
        assert (mine.flops, mine.gather_bytes) == (stats.local_flops, stats.bytes_received_gather)
        assert mine.gather_bytes + mine.return_bytes == stats.bytes_received
        report[copies] = dict(vars(stats))
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        torch.save(reports, out_path)


@pytest.mark.slow  # a gloo world: 4-8 s on 2 cores
def test_every_placement_on_the_expert_mesh(tmp_path: Path) -> None:
    """World 4 on (dp_mod_ep=2, ep=2): each matrix assembled on one owner of its group and orthogonalized once,
    results as in one process, a fixed number of collectives whatever the number of matrices."""
    run_ranks(_mesh_worker, 4, str(tmp_path / "out.pt"))
    reports = torch.load(tmp_path / "out.pt")
    collectives = {}
    for copies in (1, 3):
        stats = [r[copies] for r in reports]
        assert sum(s["local_flops"] for s in stats) == stats[0]["total_flops"]  # each matrix once
        for s in stats:
            assert s["bytes_received_gather"] == s["min_bytes_gather"]  # owns minus holds, no padding
            # NS sees the experts a rank holds whole, or the ones it owns: never a whole stack
            lead = s["largest_ns_input"][:-2]
            assert not lead or lead[0] < 8
        collectives[copies] = [s["collectives"] for s in stats]
    # keys (mesh group, dtype): rows over dp_mod_ep, rows over ep, rows over both, dense fp32, dense fp64
    assert collectives[1] == collectives[3] == [10] * 4


# --- the plan at K2 scale, without a process group ---------------------------------------------------------

K2 = dict(world=2048, ep=64, experts=384, hidden=7168, moe_inter=2048, inter=18432, layers=61, dense_layers=1)


def _k2_layouts() -> tuple[list[Layout], list[str]]:
    """K2's Muon matrices as FSDP2 + EP shard them at world 2048, ep 64: 6 experts per rank < 32 ranks per
    expert group, so stacks are (Shard(1), Shard(0)) on (dp_mod_ep=32, ep=64); dense Shard(0) on "dp"."""
    w, ep, e, h = K2["world"], K2["ep"], K2["experts"], K2["hidden"]
    ranks = tuple(range(w))
    dense = lambda s: Layout(s, ranks, (w,), (Shard(0),))  # noqa: E731
    stack = lambda s: Layout(s, ranks, (w // ep, ep), (Shard(1), Shard(0)))  # noqa: E731
    layouts, kinds = [], []
    for layer in range(K2["layers"]):
        attn = [(1536, h), (64 * 192, 1536), (576, h), (64 * 256, 512), (h, 64 * 128)]  # MLA, 64 heads
        layouts += [dense(s) for s in attn]
        kinds += ["dense"] * len(attn)
        if layer < K2["dense_layers"]:
            i = K2["inter"]
            layouts += [dense((i, h)), dense((i, h)), dense((h, i))]
            kinds += ["dense"] * 3
        else:
            m = K2["moe_inter"]
            layouts += [dense((e, h)), dense((m, h)), dense((m, h)), dense((h, m))]  # router, shared expert
            layouts += [stack((e, m, h)), stack((e, m, h)), stack((e, h, m))]
            kinds += ["dense"] * 4 + ["experts"] * 3
    return layouts, kinds


def test_plan_ownership_at_k2_scale() -> None:
    layouts, kinds = _k2_layouts()
    plan = plan_ownership(layouts)
    w, ep, e = K2["world"], K2["ep"], K2["experts"]
    n_local, dp_mod_ep = e // ep, w // ep
    seen = set()
    for m in plan.matrices:
        assert (m.tensor, m.index, m.group) not in seen  # each matrix exactly once
        seen.add((m.tensor, m.index, m.group))
        assert m.group[m.owner] == m.owner_rank
        if kinds[m.tensor] == "experts":  # the dp_mod_ep group of the ep coordinate holding the expert
            assert m.group == tuple(d * ep + m.index // n_local for d in range(dp_mod_ep))
        else:
            assert len(m.group) == w
    stacks = sum(k == "experts" for k in kinds)
    assert len(plan.matrices) == stacks * e + kinds.count("dense")
    loads = plan.per_rank()
    assert sorted(loads) == list(range(w))
    assert sum(r.flops for r in loads.values()) == plan.total_flops
    mean = plan.total_flops / w
    assert max(r.flops for r in loads.values()) <= 1.10 * mean  # over the full depth
    assert min(r.flops for r in loads.values()) >= 0.90 * mean
    stack_bytes = e * K2["moe_inter"] * K2["hidden"] * 4
    for r in loads.values():
        # received to assemble = what it owns minus what it holds (the minimum); never a whole expert stack
        assert r.gather_bytes < stack_bytes and r.return_bytes <= r.held_bytes


def test_runs_on_a_fake_process_group_as_one_rank_of_64() -> None:
    """What a simulated world does: one process plays rank 13 of 64 (ep 8, so expert stacks are (Shard(1),
    Shard(0)) on (8, 8)) on torch's fake process group. The collectives return at once (values are garbage),
    but what the rank sends, receives and computes equals the plan's figures for it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, ep, rank = 64, 8, 13
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = build_mesh(ParallelDims(world, world, ep), "cpu")
        updates = []
        for _ in range(3):  # a layer: an expert stack [16, 64, 32] (2 experts per rank, rows over 8) + a dense
            updates.append(DTensor.from_local(torch.zeros(2, 8, 32), mesh["dp_mod_ep", "ep"], (Shard(1), Shard(0)),
                                              run_check=False, shape=(16, 64, 32), stride=(64 * 32, 32, 1)))
            updates.append(DTensor.from_local(torch.zeros(1, 48), dp_mesh(mesh), (Shard(0),), run_check=False,
                                              shape=(64, 48), stride=(48, 1)))
        stats = NSStats()
        out = orthogonalize(updates, lambda x: x.clone(), stats=stats)
        assert [o.to_local().shape for o in out] == [u.to_local().shape for u in updates]
        # (any other NS function than the project's gets whole matrices: no teams)
        load = plan_ownership([layout_of(u) for u in updates], split=False).per_rank()[rank]
        assert stats.collectives == 4  # two keys: the dp_mod_ep group, the dp group
        assert (stats.local_flops, stats.bytes_received_gather) == (load.flops, load.gather_bytes)
        assert stats.bytes_received == load.gather_bytes + load.return_bytes
    finally:
        dist.destroy_process_group()


# --- teams: a matrix too costly for one rank's share, split over several ----------------------------------------

# One wide and one tall matrix that cost most of the work, a square one, and small ones (uneven rows on 4 ranks)
TEAM_SHAPES = [(40, 96), (96, 40), (64, 64), (8, 8), (6, 10), (12, 5), (4, 4)]


SMALL_BLOCK = 8  # these matrices are small: the production floor (ns_plan.MIN_BLOCK, 1024) would keep them whole


def _team_worker(rank: int, world: int, out_path: str) -> None:
    ns_plan.MIN_BLOCK = SMALL_BLOCK
    mesh = build_mesh(ParallelDims(world, world, 2), "cpu")
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(s, generator=g) for s in TEAM_SHAPES]
    stack = torch.randn(2, 48, 24, generator=g)  # expert stack, rows over dp_mod_ep: (Shard(1), Shard(0))
    sharded = [distribute_tensor(x, dp_mesh(mesh), [Shard(0)]) for x in full]
    sharded.append(distribute_tensor(stack, mesh["dp_mod_ep", "ep"], (Shard(1), Shard(0))))
    report = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ns = functools.partial(zeropower_via_newtonschulz5, steps=5, dtype=dtype)
        stats = NSStats()
        result = orthogonalize(sharded, ns, stats=stats)
        for x, d, r in zip([*full, stack], sharded, result, strict=True):
            assert r.placements == d.placements
            idx = _local_indices(x, d)
            exact = zeropower_via_newtonschulz5(x, steps=5, dtype=torch.float32)[idx]  # one process, whole matrix
            if dtype == torch.float32:
                torch.testing.assert_close(r.to_local(), exact, rtol=0, atol=1e-5)
            elif exact.numel():  # bf16 rounds differently in blocks: no farther from fp32 than one process's (x1.5)
                one = zeropower_via_newtonschulz5(x, steps=5, dtype=dtype)[idx]
                assert (r.to_local() - exact).abs().max() <= 1.5 * (one - exact).abs().max() + 1e-6
        # (the teams' Gram sums travel in NS's compute dtype)
        plan = plan_ownership([layout_of(d) for d in sharded], gram_itemsize=torch.empty(0, dtype=dtype).itemsize)
        mine = plan.per_rank()[rank]
        assert (mine.flops, mine.gather_bytes) == (stats.local_flops, stats.bytes_received_gather)
        assert stats.bytes_received_gather == stats.min_bytes_gather
        assert mine.gather_bytes + mine.return_bytes + mine.team_bytes == stats.bytes_received
        report[name] = (stats.local_flops, stats.collectives, stats.total_flops)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        torch.save({"reports": reports, "layouts": [layout_of(d) for d in sharded]}, out_path)


@pytest.mark.slow  # a gloo world: 4-8 s on 2 cores
def test_teams_split_costly_matrices_and_equal_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """World 4: the two large matrices cost more than a balanced share, so each is split over a team along its long
    side (columns of the wide one, rows of the tall one); every rank gets the single-process result (fp32 within
    1e-5; bf16 no farther from fp32 than one process's bf16), its NS FLOPs and bytes are the plan's, and the teams'
    Gram sums add a fixed number of collectives."""
    run_ranks(_team_worker, 4, str(tmp_path / "out.pt"))
    monkeypatch.setattr(ns_plan, "MIN_BLOCK", SMALL_BLOCK)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    reports, layouts = out["reports"], out["layouts"]
    plan = plan_ownership(layouts)
    teams = {layouts[m.tensor].shape[-2:]: m for m in plan.matrices if len(m.team) > 1}
    assert set(teams) >= {(40, 96), (96, 40), (48, 24)}  # (the experts too: their rows lie on two ranks)
    for shape, m in teams.items():
        assert m.long_dim == (0 if shape[0] > shape[1] else 1) and len(set(m.team)) == len(m.team)
        assert [lo for lo, _ in m.blocks] == [0, *[hi for _, hi in m.blocks[:-1]]] and m.blocks[-1][1] == max(shape)
        assert sum(m.member_flops) == m.flops == ns_block_flops(shape, max(shape))
        assert min(hi - lo for lo, hi in m.blocks) >= SMALL_BLOCK
    whole = plan_ownership(layouts, split=False).per_rank()
    loads = [r.flops for r in plan.per_rank().values()]
    assert max(r.flops for r in whole.values()) > 1.05 * sum(r.flops for r in whole.values()) / 4  # why it splits
    assert max(loads) <= 1.05 * sum(loads) / 4
    for name in ("fp32", "bf16"):
        assert sum(r[name][0] for r in reports) == reports[0][name][2] == plan.total_flops  # each matrix once
        # per key (dense; experts): assemble, return, and two for each team sum (the norm, then 5 steps)
        assert {r[name][1] for r in reports} == {2 * (2 + 2 * 6)}
