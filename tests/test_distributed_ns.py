"""Distributed Newton–Schulz: each matrix orthogonalized once, by its owner; results equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from optim.distributed_ns import NSStats, _rows_of, assign_owners, ns_flops, orthogonalize
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
