"""Orthogonalize sharded updates so that each matrix is orthogonalized once, by one owner rank, without
gathering whole tensors anywhere.

Muon needs the whole matrix for Newton–Schulz, but FSDP2 (and expert parallelism) hold each rank's piece of
it. Every Muon update is a DTensor ``[*lead, n, m]``: a matrix, or a stack of ``prod(lead)`` independent
matrices (routed experts ``[E, out, in]``). Its placements say, per mesh dim, which tensor dim that mesh dim
shards; we sort the mesh dims into three kinds:

* **batch** mesh dims shard a leading dim (EP's ``Shard(0)`` over "ep"; FSDP's ``Shard(0)`` /
  ``_StridedShard(0)`` over "dp_mod_ep" when every rank has whole experts): they decide *which* matrices a
  rank holds pieces of;
* **matrix** mesh dims shard the rows or columns (dense FSDP's ``Shard(0)`` over "dp"; expert-FSDP's
  ``Shard(1)`` over "dp_mod_ep" when there are fewer local experts than ranks): the pieces of one matrix lie
  on the ranks that differ only in these coordinates — the matrix's **group** (for a row-sharded expert
  stack: the dp_mod_ep sub-group of this ep coordinate; for a dense matrix: all of "dp");
* anything else is ``Replicate``: each replica group does its own copy of the work (no layout Chogori builds
  has one). ``Partial`` is refused.

**Owners.** :func:`plan_ownership` is a pure function of the layouts (shapes, mesh ranks, placements; no
process group) that gives every matrix one owner inside its group. Matrices whose group is a single rank
(locally whole experts) are that rank's; the others are assigned greedily, largest NS cost first, each to
the member of its group with the least NS FLOPs so far, counting across groups (a rank's dense and expert
work share one load). Ties go to the lower global rank, so every rank computes the same plan; it is cached
per layout list. A simulator calls the same function for a world of any size.

**Communication.** Two phases, each one ``all_to_all_single`` (uneven splits, element counts known from the
plan on both sides, so nothing else is exchanged) per *key* — (mesh, matrix mesh dims, dtype) — whatever the
number of matrices: a Chogori step issues 2 (dense only, or experts whole per rank) or 4 (plus row-split
experts) collectives per NS-settings bucket. The process group of a key is the mesh's group along its single
matrix mesh dim (the dp_mod_ep sub-group of this rank's ep coordinate; the "dp" group for dense matrices);
several matrix mesh dims, which no layout here produces, use the world group with zero splits to
non-members. Within a phase both sides walk the matrices in the same order (update order, then matrix
index), so the pieces of one pair of ranks are simply concatenated.

1. *assemble*: every rank sends each piece it holds of a matrix it does not own to that matrix's owner (its
   rows / columns of the matrix, flattened); an owner receives exactly "what it owns minus what it already
   holds", with no padding.
2. every owner places the pieces into its matrices (one ``[k, n, m]`` buffer per stack, one ``[n, m]`` per
   plain matrix, so NS runs with the same batched / unbatched kernels as in one process) and orthogonalizes
   them: at most the experts of one stack it owns at a time, never a whole stack it does not hold.
3. *return*: every owner sends each other group member the rows / columns of the result that member holds;
   a rank receives exactly its pieces of the matrices it holds but does not own.

(Each rank also sends itself one dummy element per collective so that no buffer is empty: torch's fake
process group, on which a simulated world runs this same code, refuses an empty input.) At K2 scale (world
2048, ep 64: 6 experts per rank, expert groups of 32 ranks holding 1/32 of the rows each), a rank owns about
34 of the 1,080 expert matrices its group holds over the full depth, receives ~2.0 GB in fp32 to assemble them
and ~2.0 GB of its rows back, instead of 22.5 GB per projection for a gathered stack; NS FLOPs per rank are
within 2% of the mean (``tests/test_distributed_ns.py`` checks 10% from :func:`plan_ownership`).

Tensors whose matrices are all whole on every rank (group of one rank) skip both phases: NS runs on the
local shard as it is. Plain tensors (one process, or replicated) are orthogonalized locally. No path calls
``full_tensor()``. The send buffers of phase 1 are a packed copy of this rank's shards of the call's updates
(phase 3's, of its owned results): memory of the order of the local update shards. :class:`NSStats` reports
per call the NS FLOPs (this rank's and the total), bytes sent / received (phase 1 alone too, beside its
minimum) and the number of collectives; :meth:`OwnershipPlan.per_rank` gives the same figures for every rank
from the plan alone.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from optim.newton_schulz import NS_STEPS

NSFn = Callable[[torch.Tensor], torch.Tensor]
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


# --- the optimizer hook --------------------------------------------------------------------------------------


@dataclass
class NSStats:
    """What this rank did in the last call (for tests and benchmarks)."""

    local_flops: int = 0  # NS FLOPs this rank spent
    total_flops: int = 0  # NS FLOPs of all matrices (each counted once)
    bytes_moved: int = 0  # bytes this rank sent + received
    bytes_sent: int = 0
    bytes_received: int = 0  # both phases
    bytes_received_gather: int = 0  # phase 1 only: to assemble the matrices it owns
    min_bytes_gather: int = 0  # the least phase 1 can receive: what it owns minus what it already holds
    collectives: int = 0  # collectives issued
    largest_ns_input: tuple[int, ...] = ()  # shape of the largest tensor handed to NS

    def reset(self) -> None:
        for f, v in NSStats().__dict__.items():
            setattr(self, f, v)


def _ns_steps(ns: NSFn) -> int:
    kw = getattr(ns, "keywords", None)
    return int(kw["steps"]) if isinstance(kw, dict) and "steps" in kw else NS_STEPS


def _note_input(stats: NSStats, x: torch.Tensor) -> None:
    if x.numel() > math.prod(stats.largest_ns_input or (0,)):
        stats.largest_ns_input = tuple(x.shape)


def _place(full: torch.Tensor, piece: torch.Tensor, rows: Runs, cols: Runs) -> None:
    """Write a [len(rows), len(cols)] piece into the whole matrix `full` at its global indices."""
    r0 = 0
    for ra, rb in rows:
        c0 = 0
        for ca, cb in cols:
            full[ra:rb, ca:cb] = piece[r0:r0 + rb - ra, c0:c0 + cb - ca]
            c0 += cb - ca
        r0 += rb - ra


def _extract(full: torch.Tensor, rows: Runs, cols: Runs) -> torch.Tensor:
    """The [len(rows), len(cols)] piece of `full` at those global indices."""
    if len(rows) == 1 and len(cols) == 1:
        (ra, rb), (ca, cb) = rows[0], cols[0]
        return full[ra:rb, ca:cb]
    return torch.cat([torch.cat([full[ra:rb, ca:cb] for ca, cb in cols], 1) for ra, rb in rows], 0) \
        if rows and cols else full.new_empty(_length(rows), _length(cols))


def orthogonalize(updates: list[torch.Tensor], ns: NSFn, stats: NSStats | None = None) -> list[torch.Tensor]:
    """NS-orthogonalize each update (a matrix, or a stack of matrices on the leading dims) and return tensors
    laid out like the inputs: plain tensors stay plain, DTensors keep their mesh and placements.

    Every rank must call it with the same list of layouts (Muon does: the same parameters, the same order).
    See the module docstring for the scheme; ``stats`` (reset first) receives this rank's figures."""
    stats = stats if stats is not None else NSStats()
    stats.reset()
    steps = _ns_steps(ns)
    out: list[torch.Tensor | None] = [None] * len(updates)
    dts = [i for i, u in enumerate(updates) if isinstance(u, DTensor)]
    for i, u in enumerate(updates):
        if not isinstance(u, DTensor):
            _note_input(stats, u)
            out[i] = ns(u)
            stats.local_flops += ns_flops(u.shape, steps)
            stats.total_flops += ns_flops(u.shape, steps)
    if not dts:
        return out  # type: ignore[return-value]

    us: list[DTensor] = [updates[i] for i in dts]  # type: ignore[misc]
    plan = _cached_plan(tuple(layout_of(u) for u in us), steps)
    stats.total_flops += plan.total_flops
    me = dist.get_rank()
    locals_ = [u.to_local() for u in us]
    results: list[torch.Tensor | None] = [None] * len(us)

    # Tensors whose matrices are whole everywhere: NS on the local shard, no communication.
    keys: dict[tuple, list[int]] = {}  # comm key -> tensors, in call order
    for t, (u, lay, info) in enumerate(zip(us, plan.layouts, plan.infos, strict=True)):
        if math.prod(lay.mesh_shape[i] for i in info.matrix_dims) == 1:
            if locals_[t].numel():
                _note_input(stats, locals_[t])
                results[t] = ns(locals_[t])
                stats.local_flops += ns_flops(locals_[t].shape, steps)
            else:
                results[t] = torch.empty_like(locals_[t])
        else:
            keys.setdefault((lay.mesh, lay.mesh_shape, info.matrix_dims, u.dtype), []).append(t)

    for tensors in keys.values():
        _exchange(tensors, us, locals_, results, plan, me, ns, steps, stats)

    for t, (i, u) in enumerate(zip(dts, us, strict=True)):
        out[i] = DTensor.from_local(results[t], u.device_mesh, u.placements, run_check=False, shape=u.shape,
                                    stride=u.stride())
    stats.bytes_moved = stats.bytes_sent + stats.bytes_received
    return out  # type: ignore[return-value]


def _exchange(tensors: list[int], us: list[DTensor], locals_: list[torch.Tensor], results: list[torch.Tensor | None],
              plan: OwnershipPlan, me: int, ns: NSFn, steps: int, stats: NSStats) -> None:
    """Phases 1–3 of the module docstring for the updates `tensors` of one key (same mesh, matrix mesh dims and
    dtype): one all_to_all_single to assemble, NS on the owned matrices, one all_to_all_single back. Both sides
    of every exchange walk the same (tensor, matrix) order, so the element counts are all they need."""
    first = us[tensors[0]]
    mdims = plan.infos[tensors[0]].matrix_dims
    pg = first.device_mesh.get_group(mdims[0]) if len(mdims) == 1 else dist.group.WORLD
    size = dist.get_world_size(pg)
    pg_ranks: dict[int, int] = {}

    def pg_rank(r: int) -> int:
        if r not in pg_ranks:
            pg_ranks[r] = dist.get_group_rank(pg, r)
        return pg_ranks[r]

    itemsize = first.element_size()
    # Phase 1: my pieces of matrices owned elsewhere go to their owners; pieces of mine come from the others.
    send: list[list[torch.Tensor]] = [[] for _ in range(size)]
    recv_sizes = [0] * size
    owned: dict[int, list[int]] = {}  # tensor -> matrices I own, ascending
    held_elsewhere: list[tuple[int, int, int]] = []  # (tensor, local slot, owner), in exchange order
    for t in tensors:
        info = plan.infos[t]
        gi, mypos = info.rank_group[me]
        group = info.groups[gi]
        local3 = _stack(locals_[t])
        for slot, b in sorted(enumerate(info.held[gi]), key=lambda sb: sb[1]):
            o = plan.owner_of(t, b, me)
            if o == me:
                owned.setdefault(t, []).append(b)
                for pos, r in enumerate(group):
                    if r != me:
                        recv_sizes[pg_rank(r)] += info.piece_numel[pos]
                stats.min_bytes_gather += (math.prod(us[t].shape[-2:]) - info.piece_numel[mypos]) * itemsize
            else:
                send[pg_rank(o)].append(local3[slot].reshape(-1))
                held_elsewhere.append((t, slot, o))
    received = _all_to_all(send, recv_sizes, first, pg, stats)
    stats.bytes_received_gather += sum(recv_sizes) * itemsize

    # Phase 2: assemble (one buffer per tensor: [k, n, m] for a stack, [n, m] for a matrix) and orthogonalize.
    cursor = [0] * size
    outputs: dict[int, torch.Tensor] = {}  # tensor -> NS results of its owned matrices [k, n, m]
    for t, mats in owned.items():
        info, shape = plan.infos[t], us[t].shape
        gi, _ = info.rank_group[me]
        buf = locals_[t].new_empty((len(mats), *shape[-2:]))
        local3 = _stack(locals_[t])
        slot_of = {b: s for s, b in enumerate(info.held[gi])}
        for k, b in enumerate(mats):
            for pos, r in enumerate(info.groups[gi]):
                rows, cols = info.pieces[pos]
                if r == me:
                    piece = local3[slot_of[b]]
                else:
                    src, n = pg_rank(r), info.piece_numel[pos]
                    piece = received[src][cursor[src]:cursor[src] + n].view(_length(rows), _length(cols))
                    cursor[src] += n
                _place(buf[k], piece, rows, cols)
        x = buf if len(shape) > 2 else buf[0]  # a plain matrix stays 2-D: NS's unbatched kernels, as in 1 process
        _note_input(stats, x)
        y = ns(x)
        stats.local_flops += ns_flops(x.shape, steps)
        outputs[t] = y if len(shape) > 2 else y.unsqueeze(0)

    # Phase 3: owners send each member its piece of the result; I keep mine and receive the rest.
    send = [[] for _ in range(size)]
    for t, mats in owned.items():
        info = plan.infos[t]
        gi, _ = info.rank_group[me]
        for k in range(len(mats)):
            for pos, r in enumerate(info.groups[gi]):
                if r != me:
                    send[pg_rank(r)].append(_extract(outputs[t][k], *info.pieces[pos]).reshape(-1).to(first.dtype))
    back_sizes = [0] * size
    for t, _, o in held_elsewhere:
        info = plan.infos[t]
        back_sizes[pg_rank(o)] += info.piece_numel[info.rank_group[me][1]]
    back = _all_to_all(send, back_sizes, first, pg, stats)

    for t in tensors:
        results[t] = torch.empty_like(locals_[t])
    for t, mats in owned.items():
        info = plan.infos[t]
        gi, mypos = info.rank_group[me]
        slot_of = {b: s for s, b in enumerate(info.held[gi])}
        out3 = _stack(results[t])  # type: ignore[arg-type]
        for k, b in enumerate(mats):
            out3[slot_of[b]].copy_(_extract(outputs[t][k], *info.pieces[mypos]))
    cursor = [0] * size
    for t, slot, o in held_elsewhere:
        n = plan.infos[t].piece_numel[plan.infos[t].rank_group[me][1]]
        dst = _stack(results[t])[slot]  # type: ignore[arg-type]
        src = pg_rank(o)
        dst.copy_(back[src][cursor[src]:cursor[src] + n].view(dst.shape))
        cursor[src] += n


def _stack(x: torch.Tensor) -> torch.Tensor:
    """`x` [*lead, n, m] as a [prod(lead), n, m] view."""
    return x.view(math.prod(x.shape[:-2]), *x.shape[-2:])


def _all_to_all(send: list[list[torch.Tensor]], recv_sizes: list[int], like: DTensor, pg: dist.ProcessGroup,
                stats: NSStats) -> list[torch.Tensor]:
    """One all_to_all_single of the packed `send` lists (element counts as splits); returns what came from each
    group rank. Each rank also sends itself one dummy element so that no buffer is ever empty: torch's fake
    process group (what a simulated world runs on) refuses an empty input beside a non-empty output."""
    me = dist.get_rank(pg)
    send[me] = [like.to_local().new_zeros(1)]  # nothing else goes to oneself
    send_sizes = [sum(p.numel() for p in ps) for ps in send]
    sizes = list(recv_sizes)
    sizes[me] += 1
    inp = torch.cat([p for ps in send for p in ps])
    out = inp.new_empty(sum(sizes))
    dist.all_to_all_single(out, inp, output_split_sizes=sizes, input_split_sizes=send_sizes, group=pg)
    stats.collectives += 1
    stats.bytes_sent += (inp.numel() - 1) * inp.element_size()
    stats.bytes_received += (out.numel() - 1) * out.element_size()
    chunks = list(torch.split(out, sizes))
    chunks[me] = chunks[me][1:]
    return chunks
