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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from optim.newton_schulz import NS_STEPS
from optim.ns_plan import (  # noqa: F401  (re-exported: the optimizer's plan is part of this module's API)
    Layout,
    MatrixOwnership,
    OwnershipPlan,
    RankLoad,
    Runs,
    _cached_plan,
    _length,
    _rows_of,
    assign_owners,
    dim_runs,
    layout_of,
    ns_flops,
    plan_ownership,
)

NSFn = Callable[[torch.Tensor], torch.Tensor]

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
    pg = first.device_mesh.get_group(mdims[0]) if len(mdims) == 1 else _group_of(first.device_mesh)
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


def _group_of(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of exactly the ranks of a multi-dimensional `mesh`: a flattened mesh already made over
    the same ranks (parallel/mesh.py makes "dp"; making one here would be a collective that only some ranks
    reach), else WORLD when the mesh spans it. Not WORLD under a pipeline: each stage exchanges on its own."""
    ranks = mesh.mesh.flatten().tolist()
    root = mesh._get_root_mesh()
    for flat in getattr(root, "_flatten_mapping", {}).values():
        if flat.mesh.flatten().tolist() == ranks:
            return flat.get_group()
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    raise RuntimeError(f"no process group spans the mesh {mesh}: flatten its dims once when building the mesh")


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
