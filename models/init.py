"""World-size-independent parameter initialisation.

A parameter's initial values are a pure function of (seed, parameter name, global element index), so a
run on 1, 2, 4 ... N ranks starts from bit-identical weights whatever the sharding (FSDP2, expert
parallelism, both on a 2-D mesh), and each rank generates only the values of its own shard: no rank
ever materialises a full parameter.

Scheme (`init_normal_`): view the global parameter as 2-D rows ``[prod(shape[:-1]), shape[-1]]`` and
group the rows into blocks of `block_rows`. Block ``b`` is drawn on the CPU in float32 as
``torch.randn(rows_in_block, cols, generator=g) * std`` where ``g`` is a fresh ``torch.Generator``
seeded with a 64-bit BLAKE2b hash of (seed, name, b). A rank draws only the blocks that overlap its
rows, keeps the rows it owns, casts them to the parameter's dtype and copies them to its device.

`block_rows` is part of the function: another value gives other (equally distributed) numbers, so every
rank of a run must use the same one. It sets the granularity: the CPU memory of one block
(``block_rows * cols * 4`` bytes), and the most a rank can draw in excess (the rest of the first and
the last block it touches).

Supported layouts: plain tensors and DTensors with any mix of `Replicate`, `Shard(d)` and FSDP2's
`_StridedShard(d)` placements on any mesh, for ``d`` any dim but the last. Uneven shards and empty
local shards are fine.
"""

from __future__ import annotations

import hashlib

import torch

from models.dtensor import is_dtensor, local

# Module names that wrappers (activation checkpointing, torch.compile, FSDP1) insert into parameter
# names; `canonical_name` drops them so that a parameter keeps its name, and its init, when wrapped.
WRAPPER_NAME_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """The parameter's name in the unwrapped model: 'layers.0._checkpoint_wrapped_module.mlp.w' ->
    'layers.0.mlp.w'."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAME_PARTS)


def block_seed(seed: int, name: str, block: int) -> int:
    """Stable unsigned 64-bit seed of one block of rows (BLAKE2b; Python's `hash()` is salted per
    process)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{int(block)}".encode(), digest_size=8,
                             person=b"chogori.init").digest()
    return int.from_bytes(digest, "little")


@torch.no_grad()
def fill_(param: torch.Tensor, value: float) -> None:
    """`param.fill_(value)` for a plain tensor or the local shard of a DTensor (no communication)."""
    local(param).fill_(value)


def shard_indices(param: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(local tensor, per dim the global indices of the local tensor's entries along that dim): which part of
    the global parameter this rank holds, for any layout `init_normal_` supports (also what `models.hf` reads
    from a released checkpoint)."""
    shape = tuple(param.shape)
    if not is_dtensor(param):
        return param, [torch.arange(n) for n in shape]

    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    mesh, placements, local = param.device_mesh, tuple(param.placements), param.to_local()
    strided = False
    for placement in placements:
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Partial) or not isinstance(placement, Shard | _StridedShard):
            raise ValueError(f"shard_indices: placement {placement} is not supported (only Replicate, "
                             "Shard and _StridedShard): a parameter cannot be initialised as partial sums")
        strided |= isinstance(placement, _StridedShard)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the mesh: it holds nothing
        return local, [torch.arange(0) for _ in shape]

    if not strided:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        index = [torch.arange(o, o + n) for o, n in zip(offset, local_shape, strict=True)]
    else:
        # FSDP2 on top of another shard of the same dim (e.g. experts: EP Shard(0) then FSDP Shard(0))
        # gives `_StridedShard`, whose rows are not one contiguous range: follow the placements left to
        # right as torch.distributed.tensor._utils._compute_local_shape_and_global_offset does, keeping
        # every index instead of the first offset only.
        from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

        index = [torch.arange(n) for n in shape]
        for mesh_dim, placement in enumerate(placements):
            if isinstance(placement, Replicate):
                continue
            dim, chunks, rank = placement.dim % len(shape), mesh.size(mesh_dim), coordinate[mesh_dim]
            current = index[dim].numel()
            if isinstance(placement, _StridedShard):
                size, offsets = placement._local_shard_size_and_offset(
                    current, chunks, rank, offset_mode=_StridedShardOffsetMode.ALL)
                within = torch.as_tensor(list(offsets or [])[:size], dtype=torch.long)
            else:
                size, offset = placement._local_shard_size_and_offset(current, chunks, rank)
                within = torch.arange(offset, offset + size)
            index[dim] = index[dim][within]
        local_shape = tuple(i.numel() for i in index)

    if tuple(local.shape) != tuple(local_shape):
        raise RuntimeError(f"shard_indices: local shard has shape {list(local.shape)} but placements "
                           f"{placements} of {list(shape)} on mesh {mesh} give {list(local_shape)}")
    return local, index


@torch.no_grad()
def init_normal_(param: torch.Tensor, name: str, seed: int, std: float, block_rows: int = 64) -> None:
    """Fill `param` (plain tensor or DTensor) in place with N(0, std) values that depend only on
    (seed, name, global element index, block_rows) — not on the world size or the sharding. See the
    module docstring for the scheme. Local work only: no communication."""
    if block_rows < 1:
        raise ValueError(f"init_normal_: block_rows must be >= 1, got {block_rows}")
    if param.device.type == "meta":
        raise ValueError(f"init_normal_: '{name}' is on the meta device; call to_empty() first")
    shape = tuple(param.shape)
    cols = shape[-1] if shape else 1
    total_rows = 1
    for n in shape[:-1]:
        total_rows *= n

    local, index = shard_indices(param)
    if shape and local.numel() and index[-1].numel() < cols:
        raise NotImplementedError(
            f"init_normal_: '{name}' is sharded along its last dim (shape {list(shape)}, local {list(local.shape)}): "
            "rows are generated whole, so every rank would draw the full parameter; shard a leading dim instead")
    # Global row of each local row, in the local tensor's row-major order.
    rows = torch.zeros(1, dtype=torch.long)
    for n, idx in zip(shape[:-1], index[:-1], strict=True):
        rows = (rows[:, None] * n + idx[None, :]).reshape(-1)
    if rows.numel() == 0 or local.numel() == 0:
        return

    out = local if local.is_contiguous() else torch.empty(local.shape, dtype=local.dtype,
                                                          device=local.device)
    out2d = out.view(rows.numel(), cols)
    order = None
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        order = torch.argsort(rows)
        rows = rows[order]
        order = order.to(local.device)
    blocks, counts = torch.unique_consecutive(torch.div(rows, block_rows, rounding_mode="floor"),
                                              return_counts=True)
    start = 0
    for b, count in zip(blocks.tolist(), counts.tolist(), strict=True):
        first = b * block_rows
        g = torch.Generator(device="cpu")
        g.manual_seed(block_seed(seed, name, b))
        block = torch.randn(min(block_rows, total_rows - first), cols, generator=g, dtype=torch.float32)
        block.mul_(std)
        wanted = rows[start:start + count] - first
        lo, hi = int(wanted[0]), int(wanted[-1])
        src = block[lo:hi + 1] if hi - lo + 1 == count else block.index_select(0, wanted)
        if order is None:
            out2d[start:start + count].copy_(src)
        else:
            out2d.index_copy_(0, order[start:start + count], src.to(device=local.device, dtype=local.dtype))
        start += count
    if out is not local:
        local.copy_(out)
