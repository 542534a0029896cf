"""Newton–Schulz ownership, planned without a process group: which rank orthogonalizes which matrix.

Given the layout of every Muon update (global shape, mesh, placements), `plan_ownership` finds for every matrix
(one expert's `[out, in]` counts as one) the group of ranks its pieces are split over and one owner in that
group, greedy by NS cost and the same on every rank. `optim/distributed_ns.py` runs the plan;
`tools/simulate.py` reports it at world sizes no test can start.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from optim.newton_schulz import NS_STEPS

Runs = tuple[tuple[int, int], ...]
"""Global indices of one tensor dim a shard holds, in the shard's order: half-open ``(start, stop)`` runs."""


def ns_flops(shape: torch.Size | tuple[int, ...], steps: int = NS_STEPS) -> int:
    """FLOPs of quintic Newton–Schulz on a [..., n, m] stack (n <= m after transposition): per step
    X Xᵀ (2 n² m), A·A (2 n³) and B·X (2 n² m)."""
    *batch, n, m = shape
    n, m = min(n, m), max(n, m)
    return math.prod(batch) * steps * (4 * n * n * m + 2 * n**3)


def assign_owners(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """Greedy longest-processing-time assignment of matrices to ranks ``0..world-1`` by NS FLOPs
    (deterministic): the one-group special case of :func:`plan_ownership`."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += ns_flops(shapes[i])
    return owners


def _rows_of(rows: int, world: int, rank: int) -> int:
    """Rows FSDP2 / torch.chunk give `rank` when `rows` are split over `world` (ceil-sized chunks)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))


# --- where the pieces are ----------------------------------------------------------------------------------


def _length(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _take(runs: Runs, lo: int, hi: int) -> Runs:
    """Positions [lo, hi) of the index sequence `runs` describes."""
    out, pos = [], 0
    for a, b in runs:
        s, e = max(lo, pos), min(hi, pos + b - a)
        if s < e:
            out.append((a + s - pos, a + e - pos))
        pos += b - a
    return tuple(out)


def _chunk(runs: Runs, n: int, k: int) -> Runs:
    """Chunk `k` of `n` as torch.chunk / DTensor's Shard cut it (ceil-sized, trailing chunks short or empty)."""
    size = -(-_length(runs) // n)
    return _take(runs, k * size, (k + 1) * size)


def _merge(runs: Runs) -> Runs:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _shard_dim(p: Placement, ndim: int) -> int | None:
    """The tensor dim `p` shards (normalized), or None for Replicate."""
    if isinstance(p, (Shard, _StridedShard)):
        return p.dim % ndim
    if isinstance(p, Partial):
        raise ValueError("distributed NS: an update with a Partial placement (unreduced gradient) cannot be "
                         "orthogonalized; reduce it first")
    return None


def dim_runs(size: int, dim: int, ndim: int, mesh_shape: Sequence[int], placements: Sequence[Placement],
             coord: Sequence[int]) -> Runs:
    """Global indices of tensor dim `dim` (of `size`) held at mesh coordinate `coord`, in local order, by
    DTensor's left-to-right rule (``_StridedShard(d, sf)``: split into `sf` pieces, chunk each, concatenate
    this coordinate's chunks — FSDP2's sharding on top of an earlier EP split)."""
    runs: Runs = ((0, size),)
    for i, p in enumerate(placements):
        if _shard_dim(p, ndim) != dim:
            continue
        if isinstance(p, _StridedShard):
            sf = int(p.split_factor)
            runs = tuple(r for j in range(sf) for r in _chunk(_chunk(runs, sf, j), mesh_shape[i], coord[i]))
        else:
            runs = _chunk(runs, mesh_shape[i], coord[i])
    return _merge(runs)


@dataclass(frozen=True)
class Layout:
    """How one update is laid out: its global shape, the mesh (global ranks, row-major, and its shape), its
    placements and element size. Hashable; no process group needed (see :func:`layout_of`)."""

    shape: tuple[int, ...]
    mesh: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    itemsize: int = 4


def layout_of(t: DTensor) -> Layout:
    mesh = t.device_mesh
    return Layout(tuple(t.shape), _mesh_ranks(mesh), tuple(mesh.mesh.shape), tuple(t.placements), t.element_size())


@functools.lru_cache(maxsize=64)
def _mesh_ranks(mesh: DeviceMesh) -> tuple[int, ...]:
    """The mesh's global ranks, row-major; read once per mesh (a host read of the mesh tensor)."""
    return tuple(int(r) for r in mesh.mesh.flatten().tolist())


@dataclass(frozen=True)
class MatrixOwnership:
    """One matrix of the plan."""

    tensor: int  # position of its update in the layouts
    index: int  # which matrix of that update: row-major index over its leading (expert) dims
    group: tuple[int, ...]  # global ranks its pieces are split over, in group-rank order
    owner: int  # owner's position in `group` (its group-relative rank when the group is a process group)
    owner_rank: int  # owner's global rank
    flops: int  # NS FLOPs
    numel: int  # elements of the matrix


@dataclass
class RankLoad:
    """What one rank does for NS in one call (from the plan)."""

    flops: int = 0  # NS FLOPs of the matrices it owns
    matrices: int = 0  # matrices it owns
    gather_bytes: int = 0  # received to assemble its matrices: what it owns minus what it already holds
    return_bytes: int = 0  # received back: its pieces of matrices others own
    held_bytes: int = 0  # bytes of update shards it holds (for comparison)


@dataclass(frozen=True)
class _TensorInfo:
    """Where the matrices of one layout are (shared by equal layouts: treat as read-only)."""

    matrix_dims: tuple[int, ...]  # mesh dims sharding rows / columns
    batch_dims: tuple[int, ...]  # mesh dims sharding leading dims
    pieces: tuple[tuple[Runs, Runs], ...]  # (row runs, col runs) per group position (row-major over matrix_dims)
    piece_numel: tuple[int, ...]  # elements of each position's piece
    groups: tuple[tuple[int, ...], ...]  # the distinct groups (global ranks in group order)
    held: tuple[tuple[int, ...], ...]  # per group: matrices its members hold pieces of, in local order
    rank_group: dict[int, tuple[int, int]]  # global rank -> (its group's index, its position in the group)

    def held_by(self, rank: int) -> tuple[int, ...]:
        return self.held[self.rank_group[rank][0]]


@dataclass
class OwnershipPlan:
    """Owners of every matrix of one ``orthogonalize`` call (:func:`plan_ownership`)."""

    layouts: tuple[Layout, ...]
    steps: int
    matrices: list[MatrixOwnership]
    infos: list[_TensorInfo] = field(repr=False)
    _owner: dict[tuple[int, int, int], int] = field(repr=False, default_factory=dict)

    @property
    def total_flops(self) -> int:
        return sum(m.flops for m in self.matrices)

    def owner_of(self, tensor: int, index: int, rank: int) -> int:
        """Global rank owning matrix `index` of update `tensor` in the group of global rank `rank`."""
        return self._owner[(tensor, index, self.infos[tensor].rank_group[rank][0])]

    def per_rank(self) -> dict[int, RankLoad]:
        """NS FLOPs, owned matrices and bytes (held, received to assemble, received back) per global rank of
        the meshes (a rank with nothing to do gets zeros)."""
        loads: dict[int, RankLoad] = {}
        shared: dict[int, int] = {}  # rank -> bytes it holds of matrices split over several ranks
        count: dict[tuple[int, int], int] = {}
        first: dict[int, _TensorInfo] = {}
        for lay, info in zip(self.layouts, self.infos, strict=True):
            count[(id(info), lay.itemsize)] = count.get((id(info), lay.itemsize), 0) + 1
            first[id(info)] = info
        for (key, size), n in count.items():
            info = first[key]
            for group, held in zip(info.groups, info.held, strict=True):
                for pos, r in enumerate(group):
                    nbytes = n * len(held) * info.piece_numel[pos] * size
                    loads.setdefault(r, RankLoad()).held_bytes += nbytes
                    if len(group) > 1:
                        shared[r] = shared.get(r, 0) + nbytes
        for r, nbytes in shared.items():
            loads[r].return_bytes += nbytes  # every piece of a shared matrix comes back, but the owner's own
        for m in self.matrices:
            info, size = self.infos[m.tensor], self.layouts[m.tensor].itemsize
            own = loads.setdefault(m.owner_rank, RankLoad())
            own.flops += m.flops
            own.matrices += 1
            if len(m.group) > 1:
                own.gather_bytes += (m.numel - info.piece_numel[m.owner]) * size
                own.return_bytes -= info.piece_numel[m.owner] * size
        return loads


@functools.lru_cache(maxsize=256)
def _tensor_info(lay: Layout) -> _TensorInfo:
    ndim = len(lay.shape)
    if ndim < 2:
        raise ValueError(f"distributed NS needs matrices, got an update of shape {lay.shape}")
    kinds = [_shard_dim(p, ndim) for p in lay.placements]
    matrix_dims = tuple(i for i, d in enumerate(kinds) if d is not None and d >= ndim - 2)
    batch_dims = tuple(i for i, d in enumerate(kinds) if d is not None and d < ndim - 2)
    mshape = lay.mesh_shape
    lead = lay.shape[:-2]
    strides = [math.prod(lead[d + 1:]) for d in range(len(lead))]

    def coord_of(sub: Sequence[int], dims: tuple[int, ...]) -> list[int]:
        c = [0] * len(mshape)
        for i, v in zip(dims, sub, strict=True):
            c[i] = v
        return c

    pieces = []
    for sub in itertools.product(*(range(mshape[i]) for i in matrix_dims)):
        c = coord_of(sub, matrix_dims)
        pieces.append(tuple(dim_runs(lay.shape[d], d, ndim, mshape, lay.placements, c) for d in (ndim - 2, ndim - 1)))
    piece_numel = tuple(_length(r) * _length(c) for r, c in pieces)

    held_by_batch: dict[tuple[int, ...], tuple[int, ...]] = {}
    for sub in itertools.product(*(range(mshape[i]) for i in batch_dims)):
        c = coord_of(sub, batch_dims)
        per_dim = [[i for a, b in dim_runs(lead[d], d, ndim, mshape, lay.placements, c) for i in range(a, b)]
                   for d in range(len(lead))]
        held_by_batch[sub] = tuple(sum(g * s for g, s in zip(idx, strides, strict=True))
                                   for idx in itertools.product(*per_dim))

    groups: list[tuple[int, ...]] = []
    held: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}  # coordinates off the matrix dims -> group index
    rank_group: dict[int, tuple[int, int]] = {}
    for flat, r in enumerate(lay.mesh):
        coord = _unravel(flat, mshape)
        rest = tuple(v for i, v in enumerate(coord) if i not in matrix_dims)
        if rest not in index:
            members = []
            for sub in itertools.product(*(range(mshape[i]) for i in matrix_dims)):
                cc = list(coord)
                for i, v in zip(matrix_dims, sub, strict=True):
                    cc[i] = v
                members.append(lay.mesh[_ravel(cc, mshape)])
            index[rest] = len(groups)
            groups.append(tuple(members))
            held.append(held_by_batch[tuple(coord[i] for i in batch_dims)])
        pos = _ravel([coord[i] for i in matrix_dims], [mshape[i] for i in matrix_dims])
        rank_group[r] = (index[rest], pos)
    return _TensorInfo(matrix_dims, batch_dims, tuple(pieces), piece_numel, tuple(groups), tuple(held), rank_group)


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _ravel(coord: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for c, s in zip(coord, shape, strict=True):
        flat = flat * s + c
    return flat


def plan_ownership(layouts: Sequence[Layout], steps: int = NS_STEPS) -> OwnershipPlan:
    """Owner of every matrix of `layouts` (pure: the same on every rank, and callable without a process group).

    Each matrix (one per leading index of each update, per replica group) is owned by one member of the group
    its pieces are split over. Matrices of one-rank groups are assigned first; the rest go largest NS cost
    first (ties: update order, then matrix index) to the group member with the least NS FLOPs so far (ties:
    the lower global rank), loads counted across all groups. Returns an :class:`OwnershipPlan`: ``matrices``
    (a :class:`MatrixOwnership` each: group, owner's group position and global rank, FLOPs), ``per_rank()``
    (FLOPs and bytes per rank), ``total_flops``.
    """
    layouts = tuple(layouts)
    infos = [_tensor_info(lay) for lay in layouts]
    gid: dict[tuple[int, ...], int] = {}  # equal groups of different updates share one load heap
    items = []  # (flops, tensor, matrix, group index in the tensor's info, global group id)
    for t, (lay, info) in enumerate(zip(layouts, infos, strict=True)):
        flops = ns_flops(lay.shape[-2:], steps)
        for gi, (group, held) in enumerate(zip(info.groups, info.held, strict=True)):
            g = gid.setdefault(group, len(gid))
            items.extend((flops, t, b, gi, g) for b in sorted(held))
    members = {g: group for group, g in gid.items()}
    load: dict[int, int] = {}
    owner: dict[tuple[int, int, int], int] = {}
    heaps: dict[int, list[tuple[int, int]]] = {}
    forced = [it for it in items if len(members[it[4]]) == 1]
    rest = sorted((it for it in items if len(members[it[4]]) > 1), key=lambda it: (-it[0], it[1], it[2], it[3]))
    for flops, t, b, gi, g in forced:
        r = members[g][0]
        owner[(t, b, gi)] = r
        load[r] = load.get(r, 0) + flops
    for flops, t, b, gi, g in rest:
        heap = heaps.get(g)
        if heap is None:
            heap = heaps[g] = [(load.get(r, 0), r) for r in members[g]]
            heapq.heapify(heap)
        while True:  # keys are loads when pushed; a rank loaded since (by another group) goes back in
            stored, r = heapq.heappop(heap)
            if stored == load.get(r, 0):
                break
            heapq.heappush(heap, (load.get(r, 0), r))
        owner[(t, b, gi)] = r
        load[r] = stored + flops
        heapq.heappush(heap, (load[r], r))
    matrices = []
    for flops, t, b, gi, _ in items:
        info, r = infos[t], owner[(t, b, gi)]
        matrices.append(MatrixOwnership(t, b, info.groups[gi], info.rank_group[r][1], r, flops,
                                        math.prod(layouts[t].shape[-2:])))
    return OwnershipPlan(layouts, steps, matrices, infos, owner)


@functools.lru_cache(maxsize=8)
def _cached_plan(layouts: tuple[Layout, ...], steps: int) -> OwnershipPlan:
    return plan_ownership(layouts, steps)


