"""Newton–Schulz ownership, planned without a process group: which rank orthogonalizes which matrix.

Given the layout of every Muon update (global shape, mesh, placements), `plan_ownership` finds for every matrix
(one expert's `[out, in]` counts as one) the group of ranks its pieces are split over and its **team** in that
group: one owner, or — for a matrix too costly for one rank's share — several members, each orthogonalizing a block
of its long side (see :func:`plan_ownership`), greedy by NS cost and the same on every rank.
`optim/distributed_ns.py` runs the plan; `tools/simulate.py` reports it at world sizes no test can start.
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


def ns_block_flops(shape: torch.Size | tuple[int, ...], long: int, steps: int = NS_STEPS) -> int:
    """FLOPs of a team member's Newton–Schulz on a block of ``long`` entries of the long side of an [n, m] matrix
    (optim/newton_schulz.py :func:`~optim.newton_schulz.block_step`): per step its part of X Xᵀ (2 n² long) and two
    products with the whole Gram matrix (4 n² long). No A² (2 n³): a block cannot split it."""
    n = min(shape[-2:])
    return steps * 6 * n * n * long


BALANCE_SLACK = 0.05
"""Whole-matrix owners are kept when the busiest rank has at most this much more NS work than the mean."""
BLOCK_SHARE = 1 / 16
"""Otherwise every matrix costing more than this share of a rank's mean load is split into the fewest long-side
blocks that cost at most this much each (so greedy assignment can even the load out to about this share), and no
narrower than :data:`MIN_BLOCK`. At world 2048 (tests/test_simulate.py) this keeps every rank within 7% of the mean
for K2 and DeepSeek-V3, with and without pipeline parallelism; teams have up to 18 members."""
MIN_BLOCK = 1024
"""Fewest long-side entries of a block. A member's block of ``m_j`` columns costs ``6 n² m_j`` FLOPs per step
against about ``2 n²`` Gram elements it receives (``8 n²`` bytes in fp32, ``4 n²`` in bf16): at least 768 FLOPs
per byte at 1024 in fp32, about what an H100 does in bf16 at 40% MFU per byte of NVLink (~900), so the exchange
does not outweigh the work it spreads. (Without the floor, DeepSeek-V3's dense-FFN teams under PP16 had 34 members
and 4 GB of fp32 Gram traffic per busiest rank instead of 18 and 2 GB, for 1% better balance.)"""


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


def chunk_bounds(size: int, k: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the `k` chunks torch.chunk cuts `size` into (ceil-sized; trailing chunks short or
    empty)."""
    c = -(-size // k)
    return [(min(size, j * c), min(size, (j + 1) * c)) for j in range(k)]


def team_received(n: int, k: int, j: int, steps: int, gram_itemsize: int) -> int:
    """Bytes member `j` of a `k`-member team receives to sum the team's partial Gram matrices (``n x n``, in NS's
    compute dtype: `gram_itemsize` bytes) at each of `steps` steps and the squared norm (fp32) once: a
    reduce-scatter of row chunks, then an all-gather."""
    if k == 1:
        return 0
    lo, hi = chunk_bounds(n, k)[j]
    norm = (k - 1) if j == 0 else 1  # the one element lies in chunk 0
    return steps * ((k - 1) * (hi - lo) * n + (n - (hi - lo)) * n) * gram_itemsize + norm * 4


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
    """One matrix of the plan and its team: one owner (``team == (owner_rank,)``, one block: the whole matrix), or
    several members, member ``j`` orthogonalizing ``blocks[j]`` of the long side (``long_dim``: 0 rows, 1
    columns; the columns of a square matrix) with the whole Gram matrix summed over the team at every step."""

    tensor: int  # position of its update in the layouts
    index: int  # which matrix of that update: row-major index over its leading (expert) dims
    group: tuple[int, ...]  # global ranks its pieces are split over, in group-rank order
    owner: int  # the first member's position in `group` (its group-relative rank when the group is a process group)
    owner_rank: int  # the first member's global rank
    flops: int  # NS FLOPs, the whole team's
    numel: int  # elements of the matrix
    team: tuple[int, ...] = ()  # global ranks of the members, in block order
    blocks: tuple[tuple[int, int], ...] = ()  # each member's [start, stop) of the long side
    member_flops: tuple[int, ...] = ()
    long_dim: int = 1

    def block_piece(self, piece: tuple[Runs, Runs], j: int) -> tuple[tuple[Runs, Runs], tuple[Runs, Runs]]:
        """The part of a group member's piece (its (row runs, column runs) of the matrix) inside block `j`: its
        positions in the piece and its indices in the block, per dim (both (rows, columns))."""
        lo, hi = self.blocks[j]
        out_pos, out_idx = [], []
        for d, runs in enumerate(piece):
            if d != self.long_dim:
                out_pos.append(((0, _length(runs)),))
                out_idx.append(runs)
                continue
            pos_runs, idx_runs, at = [], [], 0
            for a, b in runs:
                s, e = max(a, lo), min(b, hi)
                if s < e:
                    pos_runs.append((at + s - a, at + e - a))
                    idx_runs.append((s - lo, e - lo))
                at += b - a
            out_pos.append(tuple(pos_runs))
            out_idx.append(tuple(idx_runs))
        return (out_pos[0], out_pos[1]), (out_idx[0], out_idx[1])

    def block_shape(self, j: int, shape: Sequence[int]) -> tuple[int, int]:
        lo, hi = self.blocks[j]
        return (hi - lo, shape[-1]) if self.long_dim == 0 else (shape[-2], hi - lo)


@dataclass
class RankLoad:
    """What one rank does for NS in one call (from the plan)."""

    flops: int = 0  # NS FLOPs of the matrices and blocks it owns
    matrices: int = 0  # matrices it owns or is a team member of
    gather_bytes: int = 0  # received to assemble its matrices / blocks: what it owns minus what it already holds
    return_bytes: int = 0  # received back: its pieces of matrices others own
    held_bytes: int = 0  # bytes of update shards it holds (for comparison)
    team_bytes: int = 0  # received to sum Gram matrices (and norms) over its teams


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
    _entries: dict[tuple[int, int, int], MatrixOwnership] = field(repr=False, default_factory=dict)
    gram_itemsize: int | None = None  # bytes per Gram element a team exchanges (None: the update's element size)

    @property
    def total_flops(self) -> int:
        return sum(m.flops for m in self.matrices)

    def matrix(self, tensor: int, index: int, rank: int) -> MatrixOwnership:
        """The plan entry of matrix `index` of update `tensor` in the group of global rank `rank`."""
        return self._entries[(tensor, index, self.infos[tensor].rank_group[rank][0])]

    @functools.cached_property
    def split(self) -> frozenset[tuple[int, tuple[int, ...]]]:
        """(tensor, group) of every matrix orthogonalized by a team of several members."""
        return frozenset((m.tensor, m.group) for m in self.matrices if len(m.team) > 1)

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
            shape = self.layouts[m.tensor].shape
            n = min(shape[-2:])
            for j, r in enumerate(m.team):
                own = loads.setdefault(r, RankLoad())
                own.flops += m.member_flops[j]
                own.matrices += 1
                if len(m.group) > 1:
                    pos = info.rank_group[r][1]
                    if len(m.team) == 1:
                        mine = info.piece_numel[pos]
                    else:
                        (rows, cols), _ = m.block_piece(info.pieces[pos], j)
                        mine = _length(rows) * _length(cols)
                    own.gather_bytes += (math.prod(m.block_shape(j, shape)) - mine) * size
                    own.return_bytes -= mine * size
                own.team_bytes += team_received(n, len(m.team), j, self.steps, self.gram_itemsize or size)
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


def plan_ownership(layouts: Sequence[Layout], steps: int = NS_STEPS, split: bool = True,
                   gram_itemsize: int | None = None) -> OwnershipPlan:
    """The team of every matrix of `layouts` (pure: the same on every rank, and callable without a process group).

    Each matrix (one per leading index of each update, per replica group) is orthogonalized by a team inside the
    group its pieces are split over. Matrices of one-rank groups are that rank's. The rest go largest NS cost
    first (ties: update order, then matrix index) to the group member with the least NS FLOPs so far (ties: the
    lower global rank), loads counted across all groups. If that leaves the busiest rank more than
    :data:`BALANCE_SLACK` above the mean and `split` is set, the plan is made again with every shared matrix that
    costs more than :data:`BLOCK_SHARE` of the mean split into the fewest long-side blocks that cost at most that
    each, the blocks of one matrix going to distinct least-loaded members (a team). A single matrix can cost more
    than a rank's share (DeepSeek-V3's dense FFN matrices, 22.6 TFLOP against a 15.8 TFLOP mean at world 2048),
    and whole matrices stacked on uniform fixed loads cannot be evened out (K2 under pipeline parallelism: every
    rank's 36 whole experts, then 12 TFLOP output projections on top of some): only blocks balance those.

    Returns an :class:`OwnershipPlan`: ``matrices`` (a :class:`MatrixOwnership` each: group, team, blocks,
    FLOPs), ``per_rank()`` (FLOPs and bytes per rank; teams' Gram sums counted at `gram_itemsize` bytes per element,
    NS's compute dtype, default each update's element size), ``total_flops``.
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
    teams, load = _assign(items, members, layouts, steps, None)
    ranks = {r for group in members.values() for r in group}
    mean = sum(it[0] for it in items) / max(1, len(ranks))
    if split and steps > 0 and max(load.values(), default=0) > (1 + BALANCE_SLACK) * mean:
        teams, load = _assign(items, members, layouts, steps, BLOCK_SHARE * mean)
    entries: dict[tuple[int, int, int], MatrixOwnership] = {}  # (tensor, matrix, group index) -> its entry
    for _, t, b, gi, _ in items:
        info, shape = infos[t], layouts[t].shape
        team, blocks, member_flops = teams[(t, b, gi)]
        entries[(t, b, gi)] = MatrixOwnership(t, b, info.groups[gi], info.rank_group[team[0]][1], team[0],
                                              sum(member_flops), math.prod(shape[-2:]), team, blocks, member_flops,
                                              0 if shape[-2] > shape[-1] else 1)
    return OwnershipPlan(layouts, steps, list(entries.values()), infos, entries, gram_itemsize)


def _assign(items: list[tuple], members: dict[int, tuple[int, ...]], layouts: tuple[Layout, ...], steps: int,
            block_cost: float | None) -> tuple[dict, dict[int, int]]:
    """Greedy assignment of :func:`plan_ownership`: ``(t, b, gi) -> (team, blocks, member FLOPs)`` and the load
    per rank. ``block_cost``: split shared matrices costing more into blocks of at most this cost (None: never)."""
    load: dict[int, int] = {}
    teams: dict[tuple[int, int, int], tuple] = {}
    heaps: dict[int, list[tuple[int, int]]] = {}
    rest = []  # (cost of one block, tensor, matrix, group index, group id, blocks, FLOPs per block)
    for flops, t, b, gi, g in items:
        shape = layouts[t].shape[-2:]
        long = max(shape)
        if len(members[g]) == 1:
            r = members[g][0]
            teams[(t, b, gi)] = ((r,), ((0, long),), (flops,))
            load[r] = load.get(r, 0) + flops
            continue
        k = 1
        if block_cost is not None and flops > block_cost:
            k = min(len(members[g]), max(1, long // MIN_BLOCK),
                    math.ceil(ns_block_flops(shape, long, steps) / block_cost))
        blocks = ((0, long),) if k == 1 else tuple(chunk_bounds(long, k))
        costs = (flops,) if k == 1 else tuple(ns_block_flops(shape, hi - lo, steps) for lo, hi in blocks)
        rest.append((max(costs), t, b, gi, g, blocks, costs))
    rest.sort(key=lambda it: (-it[0], it[1], it[2], it[3]))
    for _, t, b, gi, g, blocks, costs in rest:
        heap = heaps.get(g)
        if heap is None:
            heap = heaps[g] = [(load.get(r, 0), r) for r in members[g]]
            heapq.heapify(heap)
        team = []
        while len(team) < len(blocks):  # the least-loaded members; keys are loads when pushed, so a rank
            stored, r = heapq.heappop(heap)  # loaded since (by another group) goes back in with its new load
            if stored == load.get(r, 0):
                team.append(r)
            else:
                heapq.heappush(heap, (load.get(r, 0), r))
        for r, c in zip(team, costs, strict=True):
            load[r] = load.get(r, 0) + c
            heapq.heappush(heap, (load[r], r))
        teams[(t, b, gi)] = (tuple(team), blocks, costs)
    return teams, load


@functools.lru_cache(maxsize=8)
def _cached_plan(layouts: tuple[Layout, ...], steps: int, split: bool = True,
                 gram_itemsize: int | None = None) -> OwnershipPlan:
    return plan_ownership(layouts, steps, split, gram_itemsize)


