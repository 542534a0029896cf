"""Orthogonalize sharded updates so that each matrix is orthogonalized once, by one owner rank or a team of
ranks, without gathering whole tensors anywhere.

Muon needs the whole matrix for Newton–Schulz (or, split over a team, its whole Gram matrix), but FSDP2 (and
expert parallelism) hold each rank's piece of it. Every Muon update is a DTensor ``[*lead, n, m]``: a matrix, or
a stack of ``prod(lead)`` independent matrices (routed experts ``[E, out, in]``). Its placements say, per mesh
dim, which tensor dim that mesh dim shards; we sort the mesh dims into three kinds:

* **batch** mesh dims shard a leading dim (EP's ``Shard(0)`` over "ep"; FSDP's ``Shard(0)`` /
  ``_StridedShard(0)`` over "dp_mod_ep" when every rank has whole experts): they decide *which* matrices a
  rank holds pieces of;
* **matrix** mesh dims shard the rows or columns (dense FSDP's ``Shard(0)`` over "dp"; expert-FSDP's
  ``Shard(1)`` over "dp_mod_ep" when there are fewer local experts than ranks): the pieces of one matrix lie
  on the ranks that differ only in these coordinates — the matrix's **group** (for a row-sharded expert
  stack: the dp_mod_ep sub-group of this ep coordinate; for a dense matrix: all of "dp");
* anything else is ``Replicate``: each replica group does its own copy of the work (no layout Chogori builds
  has one). ``Partial`` is refused.

**Owners and teams.** :func:`plan_ownership` is a pure function of the layouts (shapes, mesh ranks, placements; no
process group) that gives every matrix a team inside its group: usually one owner, which assembles the whole
matrix. Matrices whose group is a single rank (locally whole experts) are that rank's; the others are assigned
greedily, largest NS cost first, each to the member of its group with the least NS FLOPs so far, counting across
groups (a rank's dense and expert work share one load). Ties go to the lower global rank, so every rank computes
the same plan; it is cached per layout list. When that leaves the busiest rank more than 5% above the mean, the
matrices that cost more than 1/16 of the mean are split into blocks of their long side (at least 1024 wide), one
per member of a team of distinct ranks (at world 2048: DeepSeek-V3's 22.6 TFLOP dense-FFN matrices against a
15.8 TFLOP mean, and K2's output projections on top of the whole experts every rank holds under pipeline
parallelism). A simulator calls the same function for a world of any size.

**Communication.** Two phases, each one ``all_to_all_single`` (uneven splits, element counts known from the
plan on both sides, so nothing else is exchanged) per *key* — (mesh, matrix mesh dims, dtype) — whatever the
number of matrices. The process group of a key is the mesh's group along its single matrix mesh dim (the
dp_mod_ep sub-group of this rank's ep coordinate; the "dp" group for dense matrices); several matrix mesh dims,
which no layout here produces, use the world group with zero splits to non-members. Within a phase both sides walk
the matrices in the same order (update order, matrix index, block), so the pieces of one pair of ranks are simply
concatenated. A whole matrix is the one block of a one-member team, so one code path serves both.

1. *assemble*: every rank sends each piece it holds of a block it does not own — the part of its rows / columns
   inside the block — to that block's owner; an owner receives exactly "what it owns minus what it already
   holds", with no padding.
2. every owner places the pieces into its blocks (whole matrices of one tensor in one ``[k, n, m]`` stack, so
   NS runs with the same batched / unbatched kernels as in one process) and orthogonalizes them: whole matrices
   by ``ns``; the blocks of all teams in step, each member normalizing by the team's summed norm and, at every
   step, summing the partial Gram matrices ``X_j X_jᵀ`` over its team (:func:`_team_sum`: a reduce-scatter then
   an all-gather of row chunks, two ``all_to_all_single`` per step for all teams of the group) before
   :func:`~optim.newton_schulz.block_step` updates its columns: the whole matrix's iteration, split.
3. *return*: every owner sends each other group member the part of its block that member holds; a rank
   receives exactly its pieces of the matrices it holds but does not own.

A step issues 2 collectives per key, plus ``2 (steps + 1)`` in a group with teams. (Each rank also sends itself
one dummy element per collective so that no buffer is empty: torch's fake process group, on which a simulated
world runs this same code, refuses an empty input.) At K2 scale (world 2048, ep 64: 6 experts per rank, expert
groups of 32 ranks holding 1/32 of the rows each), a rank owns about 34 of the 1,080 expert matrices its group
holds over the full depth, receives ~2.0 GB in fp32 to assemble them and ~2.0 GB of its rows back, instead of
22.5 GB per projection for a gathered stack; NS FLOPs per rank are within 2% of the mean without teams. With
teams (DeepSeek-V3, and both presets under pipeline parallelism) every rank is within 7% of the mean and a team
member receives about ``2 n²`` Gram elements per step in NS's compute dtype: up to ~1.9 GB per step in fp32 for
the busiest rank, half that in bf16, NS's dtype on GPU (``tests/test_simulate.py`` checks 10% for all four
layouts).

Tensors whose matrices are all whole on every rank (group of one rank) skip both phases: NS runs on the
local shard as it is. Plain tensors (one process, or replicated) are orthogonalized locally. No path calls
``full_tensor()``. The send buffers of phase 1 are a packed copy of this rank's shards of the call's updates
(phase 3's, of its owned results): memory of the order of the local update shards. :class:`NSStats` reports
per call the NS FLOPs (this rank's and the total), bytes sent / received (phase 1 alone too, beside its
minimum) and the number of collectives; :meth:`OwnershipPlan.per_rank` gives the same figures for every rank
from the plan alone (the teams' Gram sums as ``team_bytes``). Only this project's NS function
(:func:`~optim.newton_schulz.zeropower_via_newtonschulz5` with the optimizer's settings) is split over teams;
any other ``ns`` gets whole matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from optim.newton_schulz import (
    NS_EPS,
    NS_STEPS,
    _products,
    block_step,
    ns_coefficients,
    resolve_dtype,
    zeropower_via_newtonschulz5,
)
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
    chunk_bounds,
    dim_runs,
    layout_of,
    ns_block_flops,
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


def _splittable(ns: NSFn) -> bool:
    """Whether matrices may be split over teams: only for this project's Newton–Schulz (a partial of
    :func:`~optim.newton_schulz.zeropower_via_newtonschulz5`, as the optimizer builds it), whose iteration the
    team loop runs with the same settings; any other ``ns`` gets whole matrices."""
    return getattr(ns, "func", None) is zeropower_via_newtonschulz5


def _note_input(stats: NSStats, x: torch.Tensor) -> None:
    if x.numel() > math.prod(stats.largest_ns_input or (0,)):
        stats.largest_ns_input = tuple(x.shape)


def _numel(runs: tuple[Runs, Runs]) -> int:
    return _length(runs[0]) * _length(runs[1])


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
    split = _splittable(ns)
    gram_dtype = resolve_dtype(ns.keywords.get("dtype", "auto"), us[0].device) if split else None  # type: ignore
    plan = _cached_plan(tuple(layout_of(u) for u in us), steps, split, gram_dtype.itemsize if gram_dtype else None)
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
    dtype): one all_to_all_single to assemble, NS on the owned matrices and blocks, one all_to_all_single back.
    Both sides of every exchange walk the same (tensor, matrix) order, so the element counts are all they need.
    A matrix owned whole is the team of one member whose block is the whole matrix."""
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
    # Phase 1: my pieces of blocks owned elsewhere go to their members; pieces of mine come from the others.
    send: list[list[torch.Tensor]] = [[] for _ in range(size)]
    recv_sizes = [0] * size
    mine: list[tuple[int, int, MatrixOwnership, int]] = []  # (tensor, matrix, plan entry, my block), in order
    held: list[tuple[int, int, MatrixOwnership]] = []  # (tensor, local slot, plan entry) of what I hold
    for t in tensors:
        info = plan.infos[t]
        gi, mypos = info.rank_group[me]
        local3 = _stack(locals_[t])
        for slot, b in sorted(enumerate(info.held[gi]), key=lambda sb: sb[1]):
            m = plan.matrix(t, b, me)
            held.append((t, slot, m))
            for j, r in enumerate(m.team):
                if r == me:
                    mine.append((t, b, m, j))
                    for pos, src in enumerate(info.groups[gi]):
                        if src != me:
                            recv_sizes[pg_rank(src)] += _numel(m.block_piece(info.pieces[pos], j)[0])
                    block = math.prod(m.block_shape(j, us[t].shape))
                    stats.min_bytes_gather += (block - _numel(m.block_piece(info.pieces[mypos], j)[0])) * itemsize
                else:
                    at = m.block_piece(info.pieces[mypos], j)[0]
                    if _numel(at):
                        send[pg_rank(r)].append(_extract(local3[slot], *at).reshape(-1))
    received = _all_to_all(send, recv_sizes, first.to_local(), pg, stats)
    stats.bytes_received_gather += sum(recv_sizes) * itemsize

    # Phase 2: assemble (owned whole: one [k, n, m] buffer per tensor, so NS runs batched as in one process; a
    # block: its own buffer) and orthogonalize.
    cursor = [0] * size
    count: dict[int, int] = {}
    for t, _, m, _ in mine:
        count[t] = count.get(t, 0) + (len(m.team) == 1)
    stacks = {t: locals_[t].new_empty((k, *us[t].shape[-2:])) for t, k in count.items() if k}
    buffers: list[torch.Tensor] = []
    filled = dict.fromkeys(stacks, 0)
    for t, b, m, j in mine:
        info = plan.infos[t]
        gi, _ = info.rank_group[me]
        if len(m.team) == 1:  # a whole matrix: a slot of its tensor's stack
            buf = stacks[t][filled[t]]
            filled[t] += 1
        else:
            buf = locals_[t].new_empty(m.block_shape(j, us[t].shape))
        for pos, src in enumerate(info.groups[gi]):
            at, into = m.block_piece(info.pieces[pos], j)
            if src == me:
                piece = _extract(_stack(locals_[t])[info.held[gi].index(b)], *at)
            else:
                q, n = pg_rank(src), _numel(at)
                piece = received[q][cursor[q]:cursor[q] + n].view(_length(at[0]), _length(at[1]))
                cursor[q] += n
            _place(buf, piece, *into)
        buffers.append(buf)
    group = plan.infos[tensors[0]].groups[plan.infos[tensors[0]].rank_group[me][0]]
    teams = any((t, group) in plan.split for t in tensors)
    outputs = _orthogonalize_owned(mine, buffers, stacks, us, ns, steps, stats, pg, pg_rank, teams,
                                   first.to_local())

    # Phase 3: members send each holder its piece of their block of the result; I keep mine and receive the rest.
    send = [[] for _ in range(size)]
    for (t, _, m, j), y in zip(mine, outputs, strict=True):
        info = plan.infos[t]
        gi, _ = info.rank_group[me]
        for pos, r in enumerate(info.groups[gi]):
            into = m.block_piece(info.pieces[pos], j)[1]
            if r != me and _numel(into):
                send[pg_rank(r)].append(_extract(y, *into).reshape(-1).to(first.dtype))
    back_sizes = [0] * size
    for t, _, m in held:
        piece = plan.infos[t].pieces[plan.infos[t].rank_group[me][1]]
        for j, r in enumerate(m.team):
            if r != me:
                back_sizes[pg_rank(r)] += _numel(m.block_piece(piece, j)[0])
    back = _all_to_all(send, back_sizes, first.to_local(), pg, stats)

    for t in tensors:
        results[t] = torch.empty_like(locals_[t])
    result_of = {(t, b, j): y for (t, b, _, j), y in zip(mine, outputs, strict=True)}
    cursor = [0] * size
    for t, slot, m in held:
        info = plan.infos[t]
        gi, mypos = info.rank_group[me]
        dst = _stack(results[t])[slot]  # type: ignore[arg-type]
        for j, r in enumerate(m.team):
            at, into = m.block_piece(info.pieces[mypos], j)
            if r == me:
                _place(dst, _extract(result_of[(t, info.held[gi][slot], j)], *into), *at)
            elif _numel(at):
                q, n = pg_rank(r), _numel(at)
                _place(dst, back[q][cursor[q]:cursor[q] + n].view(_length(at[0]), _length(at[1])), *at)
                cursor[q] += n


def _orthogonalize_owned(mine: list[tuple[int, int, MatrixOwnership, int]], buffers: list[torch.Tensor],
                         stacks: dict[int, torch.Tensor], us: list[DTensor], ns: NSFn, steps: int, stats: NSStats,
                         pg: dist.ProcessGroup, pg_rank: Callable[[int], int], teams: bool,
                         like: torch.Tensor) -> list[torch.Tensor]:
    """NS on what this rank owns: the matrices it owns whole, one ``[k, n, m]`` stack per tensor (one ``ns`` call
    each, as in one process), and its blocks of team matrices, all teams in step together
    (:func:`_team_newton_schulz`; `teams`: whether the group has any)."""
    outputs: list[torch.Tensor | None] = [None] * len(mine)
    whole: dict[int, list[int]] = {}
    for i, (t, _, m, _) in enumerate(mine):
        if len(m.team) == 1:
            whole.setdefault(t, []).append(i)
    for t, idx in whole.items():
        x = stacks[t] if len(us[t].shape) > 2 else stacks[t][0]
        _note_input(stats, x)
        y = ns(x)  # a plain matrix stays 2-D: NS's unbatched kernels, as in one process
        stats.local_flops += ns_flops(x.shape, steps)
        for k, i in enumerate(idx):
            outputs[i] = y[k] if len(us[t].shape) > 2 else y
    if teams:  # every rank of the group joins the team exchanges, with or without blocks of its own
        blocks = [i for i, (_, _, m, _) in enumerate(mine) if len(m.team) > 1]
        team_out = _team_newton_schulz([buffers[i] for i in blocks], [mine[i][2:] for i in blocks], ns, steps,
                                       stats, pg, pg_rank, like)
        for i, y in zip(blocks, team_out, strict=True):
            outputs[i] = y
    return outputs  # type: ignore[return-value]


def _team_newton_schulz(blocks: list[torch.Tensor], entries: list[tuple[MatrixOwnership, int]], ns: NSFn,
                        steps: int, stats: NSStats, pg: dist.ProcessGroup, pg_rank: Callable[[int], int],
                        like: torch.Tensor) -> list[torch.Tensor]:
    """Newton–Schulz on this rank's blocks of team matrices (``entries``: plan entry and block number; possibly
    none: the rank still joins the collectives). Each member normalizes its block by the norm summed over the
    team, then at every step sums its partial Gram matrix ``X_j X_jᵀ`` over the team and takes a
    :func:`~optim.newton_schulz.block_step`: the whole matrix's iteration, each member computing its long-side
    columns. ``ns``'s settings (dtype, coefficients, eps, Triton) apply; ``gram=True``'s form does not (it needs
    the whole long side)."""
    kw = getattr(ns, "keywords", {}) or {}
    coefficients = ns_coefficients(kw.get("method", "muon"), steps)
    teams = [(m.team, j) for m, j in entries]
    dtype = resolve_dtype(kw.get("dtype", "auto"), like.device)  # the same on every rank, blocks or not
    xs = [(x if m.long_dim == 1 else x.mT).to(dtype) for x, (m, _) in zip(blocks, entries, strict=True)]  # wide
    fp32 = like.new_zeros(1, dtype=torch.float32)
    sq = _team_sum([x.float().square().sum().reshape(1, 1) for x in xs], teams, pg, pg_rank, fp32, stats)
    xs = [x / s.to(x.dtype).sqrt().clamp(min=kw.get("eps", NS_EPS)) for x, s in zip(xs, sq, strict=True)]
    grams = [_products(x, kw.get("triton", "auto"))[0] for x in xs]
    # Partial Grams travel in the compute dtype (bf16 on GPU: half the bytes), each rounded once as one process's
    # X Xᵀ is; the sums are taken in float32 at least.
    compute = like.new_zeros(1, dtype=dtype)
    for a, b, c in coefficients:
        gram = _team_sum([g(x) for g, x in zip(grams, xs, strict=True)], teams, pg, pg_rank, compute, stats)
        xs = [block_step(x, A, a, b, c) for x, A in zip(xs, gram, strict=True)]
    out = []
    for x, y, (m, j) in zip(blocks, xs, entries, strict=True):
        _note_input(stats, x)
        stats.local_flops += m.member_flops[j]
        out.append((y if m.long_dim == 1 else y.mT).to(x.dtype))
    return out


def _team_sum(parts: list[torch.Tensor], teams: list[tuple[tuple[int, ...], int]], pg: dist.ProcessGroup,
              pg_rank: Callable[[int], int], like: torch.Tensor, stats: NSStats) -> list[torch.Tensor]:
    """For each team this rank is in (``teams``: members' global ranks, my position), the sum over the members
    of their ``[n, n']`` part: a reduce-scatter of row chunks (member i sums chunk i), then an all-gather, each
    one all_to_all_single for all the teams of the group (collectives do not grow with the number of teams)."""
    size = dist.get_world_size(pg)
    send: list[list[torch.Tensor]] = [[] for _ in range(size)]
    sizes = [0] * size
    bounds = [chunk_bounds(p.shape[0], len(team)) for p, (team, _) in zip(parts, teams, strict=True)]
    for p, (team, j), bb in zip(parts, teams, bounds, strict=True):
        for i, r in enumerate(team):
            if i != j:
                send[pg_rank(r)].append(p[bb[i][0]:bb[i][1]].reshape(-1))
                sizes[pg_rank(r)] += (bb[j][1] - bb[j][0]) * p.shape[1]
    got = _all_to_all(send, sizes, like, pg, stats)
    cursor = [0] * size
    sums = []
    for p, (team, j), bb in zip(parts, teams, bounds, strict=True):
        s = p[bb[j][0]:bb[j][1]].to(torch.promote_types(p.dtype, torch.float32), copy=True)
        for i, r in enumerate(team):
            if i != j:
                q = pg_rank(r)
                s += got[q][cursor[q]:cursor[q] + s.numel()].view_as(s)
                cursor[q] += s.numel()
        sums.append(s.to(p.dtype))
    send = [[] for _ in range(size)]
    sizes = [0] * size
    for s, p, (team, j), bb in zip(sums, parts, teams, bounds, strict=True):
        for i, r in enumerate(team):
            if i != j:
                send[pg_rank(r)].append(s.reshape(-1))
                sizes[pg_rank(r)] += (bb[i][1] - bb[i][0]) * p.shape[1]
    got = _all_to_all(send, sizes, like, pg, stats)
    cursor = [0] * size
    out = []
    for s, p, (team, j), bb in zip(sums, parts, teams, bounds, strict=True):
        chunks = []
        for i, r in enumerate(team):
            if i == j:
                chunks.append(s)
            else:
                q, n = pg_rank(r), (bb[i][1] - bb[i][0]) * p.shape[1]
                chunks.append(got[q][cursor[q]:cursor[q] + n].view(-1, p.shape[1]))
                cursor[q] += n
        out.append(torch.cat(chunks))
    return out


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


def _all_to_all(send: list[list[torch.Tensor]], recv_sizes: list[int], like: torch.Tensor, pg: dist.ProcessGroup,
                stats: NSStats) -> list[torch.Tensor]:
    """One all_to_all_single of the packed `send` lists (element counts as splits); returns what came from each
    group rank. Each rank also sends itself one dummy element so that no buffer is ever empty: torch's fake
    process group (what a simulated world runs on) refuses an empty input beside a non-empty output."""
    me = dist.get_rank(pg)
    send[me] = [like.new_zeros(1)]  # nothing else goes to oneself
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
