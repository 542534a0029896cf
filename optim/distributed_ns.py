"""Orthogonalize sharded matrices so that each one is orthogonalized by exactly one rank.

Muon needs the whole matrix for Newton–Schulz, but FSDP2 holds each rank's row slice of it. The naive
scheme (every rank all-gathers and orthogonalizes every matrix) repeats the NS work world-size times and
receives every matrix on every rank. Here each matrix gets one *owner* rank (owners balanced by NS FLOPs,
greedily, the same on every rank): the shards are gathered to the owner, the owner orthogonalizes, and the
result is scattered back as shards. Routed-expert stacks whose shards hold whole experts (sharded only on
the expert dim) are orthogonalized where they are, batched, with no communication at all.

The communication is plain `dist.gather` / `dist.scatter` on the mesh's process group, per matrix, in the
same order on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

NSFn = Callable[[torch.Tensor], torch.Tensor]


def ns_flops(shape: torch.Size | tuple[int, ...], steps: int = 5) -> int:
    """FLOPs of quintic Newton–Schulz on a [..., n, m] stack (n <= m after transposition): per step
    X Xᵀ (2 n² m), A·A (2 n³) and B·X (2 n² m)."""
    *batch, n, m = shape
    n, m = min(n, m), max(n, m)
    count = 1
    for b in batch:
        count *= b
    return count * steps * (4 * n * n * m + 2 * n**3)


def _locally_whole(t: DTensor) -> bool:
    """True when every local shard holds whole matrices: a [E, n, m] stack sharded only on dim 0."""
    return t.dim() == 3 and all(not isinstance(p, Shard) or p.dim == 0 for p in t.placements)


def assign_owners(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """Greedy longest-processing-time assignment of matrices to ranks by NS FLOPs (deterministic)."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += ns_flops(shapes[i])
    return owners


@dataclass
class NSStats:
    """What this rank did in the last call (for tests and benchmarks)."""

    local_flops: int = 0  # NS FLOPs this rank spent
    total_flops: int = 0  # NS FLOPs of all matrices (each counted once)
    bytes_moved: int = 0  # bytes this rank sent + received for gathers and scatters


def orthogonalize(updates: list[torch.Tensor], ns: NSFn, group: dist.ProcessGroup | None = None,
                  stats: NSStats | None = None) -> list[torch.Tensor]:
    """NS-orthogonalize each update (a matrix, or a stack of matrices on the leading dims) and return
    tensors laid out like the inputs: plain tensors stay plain, DTensors keep their placements.

    Supported shardings: plain tensors (one process, or replicated: orthogonalized locally); DTensors
    sharded only on dim 0 over a 1-D mesh (FSDP2's default); expert stacks sharded only on the expert dim
    (locally whole, any mesh). Anything else is gathered with `full_tensor()` as a fallback.
    """
    stats = stats if stats is not None else NSStats()
    stats.local_flops = stats.total_flops = stats.bytes_moved = 0
    out: list[torch.Tensor | None] = [None] * len(updates)

    sharded: list[int] = []
    for i, u in enumerate(updates):
        if not isinstance(u, DTensor):
            out[i] = ns(u)
            stats.local_flops += ns_flops(u.shape)
            stats.total_flops += ns_flops(u.shape)
        elif _locally_whole(u):
            local = u.to_local()
            out[i] = DTensor.from_local(ns(local), u.device_mesh, u.placements, run_check=False, shape=u.shape,
                                        stride=u.stride())
            stats.local_flops += ns_flops(local.shape)
            stats.total_flops += ns_flops(u.shape)
        elif u.device_mesh.ndim == 1 and list(u.placements) == [Shard(0)]:
            sharded.append(i)
        else:  # unusual layout: correct but not communication-efficient
            full = u.full_tensor()
            replicated = [Replicate()] * u.device_mesh.ndim
            out[i] = DTensor.from_local(ns(full), u.device_mesh, replicated, run_check=False).redistribute(
                u.device_mesh, u.placements)
            stats.local_flops += ns_flops(u.shape)
            stats.total_flops += ns_flops(u.shape)

    if sharded:
        mesh = updates[sharded[0]].device_mesh
        pg = group or mesh.get_group()
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        owners = assign_owners([tuple(updates[i].shape) for i in sharded], world)
        for i, owner in zip(sharded, owners, strict=True):
            out[i] = _gather_ns_scatter(updates[i], ns, pg, world, me, owner, stats)
    return out  # type: ignore[return-value]


def _gather_ns_scatter(u: DTensor, ns: NSFn, pg: dist.ProcessGroup, world: int, me: int, owner: int,
                       stats: NSStats) -> DTensor:
    """Gather a dim-0-sharded matrix to `owner`, orthogonalize there, scatter the row shards back.

    FSDP2 shards rows unevenly (the last ranks may hold fewer or none), so every shard is padded to
    ceil(rows / world) rows for the fixed-size gather/scatter and trimmed afterwards."""
    rows = u.shape[0]
    chunk = -(-rows // world)
    local = u.to_local()
    padded = local.new_zeros((chunk, *u.shape[1:]))
    padded[: local.shape[0]] = local
    owner_global = dist.get_global_rank(pg, owner)
    gathered = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
    dist.gather(padded, gathered, dst=owner_global, group=pg)
    scattered = torch.empty_like(padded)
    pieces = None
    if me == owner:
        assert gathered is not None
        full = torch.cat([g[: _rows_of(rows, world, r)] for r, g in enumerate(gathered)])
        result = ns(full)
        pieces = []
        start = 0
        for r in range(world):
            n = _rows_of(rows, world, r)
            piece = result.new_zeros((chunk, *u.shape[1:]))
            piece[:n] = result[start:start + n]
            pieces.append(piece)
            start += n
        stats.local_flops += ns_flops(u.shape)
    dist.scatter(scattered, pieces, src=owner_global, group=pg)
    stats.total_flops += ns_flops(u.shape)
    nbytes = padded.numel() * padded.element_size()
    stats.bytes_moved += (2 * (world - 1) * nbytes) if me == owner else 2 * nbytes
    mine = scattered[: local.shape[0]]
    return DTensor.from_local(mine, u.device_mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())


def _rows_of(rows: int, world: int, rank: int) -> int:
    """Rows FSDP2 / torch.chunk give `rank` when `rows` are split over `world` (ceil-sized chunks)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))
