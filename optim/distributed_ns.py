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
        owners = assign_owners([tuple(updates[i].shape) for i in sharded], dist.get_world_size(pg))
        for i, result in zip(sharded, _gather_ns_scatter([updates[i] for i in sharded], owners, ns, pg, stats),
                             strict=True):
            out[i] = result
    return out  # type: ignore[return-value]


def _gather_ns_scatter(us: list[DTensor], owners: list[int], ns: NSFn, pg: dist.ProcessGroup,
                       stats: NSStats) -> list[DTensor]:
    """Gather each dim-0-sharded matrix to its owner, orthogonalize there, scatter the row shards back.

    Three phases so the owners work in parallel: all gathers are started at once, then every rank
    orthogonalizes the matrices it owns, then all scatters are started. (Gathering, computing and scattering
    one matrix at a time would make every rank wait for each owner in turn.) FSDP2 shards rows unevenly,
    so every shard is padded to ceil(rows / world) rows for the fixed-size collectives and trimmed after."""
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    padded, gathered, works = [], [], []
    for u, owner in zip(us, owners, strict=True):
        local = u.to_local()
        chunk = -(-u.shape[0] // world)
        pad = local.new_zeros((chunk, *u.shape[1:]))
        pad[: local.shape[0]] = local
        bucket = [torch.empty_like(pad) for _ in range(world)] if me == owner else None
        works.append(dist.gather(pad, bucket, dst=dist.get_global_rank(pg, owner), group=pg, async_op=True))
        padded.append(pad)
        gathered.append(bucket)
        nbytes = pad.numel() * pad.element_size()
        stats.bytes_moved += (2 * (world - 1) * nbytes) if me == owner else 2 * nbytes
        stats.total_flops += ns_flops(u.shape)
    for work in works:
        work.wait()

    pieces: list[list[torch.Tensor] | None] = []
    for u, owner, bucket in zip(us, owners, gathered, strict=True):
        if me != owner:
            pieces.append(None)
            continue
        assert bucket is not None
        rows = u.shape[0]
        result = ns(torch.cat([g[: _rows_of(rows, world, r)] for r, g in enumerate(bucket)]))
        mine, start = [], 0
        for r in range(world):
            n = _rows_of(rows, world, r)
            piece = result.new_zeros(bucket[0].shape)
            piece[:n] = result[start:start + n]
            mine.append(piece)
            start += n
        pieces.append(mine)
        stats.local_flops += ns_flops(u.shape)

    received, works = [], []
    for owner, pad, mine in zip(owners, padded, pieces, strict=True):
        buf = torch.empty_like(pad)
        works.append(dist.scatter(buf, mine, src=dist.get_global_rank(pg, owner), group=pg, async_op=True))
        received.append(buf)
    for work in works:
        work.wait()
    return [DTensor.from_local(buf[: u.to_local().shape[0]], u.device_mesh, u.placements, run_check=False,
                               shape=u.shape, stride=u.stride()) for u, buf in zip(us, received, strict=True)]


def _rows_of(rows: int, world: int, rank: int) -> int:
    """Rows FSDP2 / torch.chunk give `rank` when `rows` are split over `world` (ceil-sized chunks)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))
