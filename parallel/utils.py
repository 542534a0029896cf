"""Collectives the trainer needs around a parallelized model: global grad norm, sums, means, maxima."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from models.dtensor import local


def _replication(t: DTensor) -> int:
    """How many ranks hold each local element of `t` (the product of its replicated mesh dims)."""
    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, Replicate))


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of all gradients to `max_norm`; returns the norm before clipping.

    Written by hand because the dense weights (FSDP over "dp") and the routed experts (over "dp_mod_ep" x
    "ep") are DTensors on different meshes, which `torch.nn.utils.clip_grad_norm_` cannot combine. Each
    rank sums the squares of its local shards (divided by how many ranks hold the same shard), one
    all-reduce adds them up.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = local(grads[0]).device
    sq = torch.zeros((), device=device, dtype=torch.float32)
    distributed = False
    for g in grads:
        if isinstance(g, DTensor):
            distributed = True
            sq += g.to_local().float().pow(2).sum() / _replication(g)
        else:
            sq += g.float().pow(2).sum()
    if distributed and dist.is_initialized():
        if device.type == "cpu" and dist.get_backend() == "nccl":  # host-offloaded gradients: NCCL reduces on the GPU
            sq = sq.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(sq)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).to(device)
        for g in grads:
            local(g).mul_(coef)
    return total


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over the ranks of `group` (default: all ranks), out of place; the identity in one process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise max over the ranks of `group` (default: all ranks), out of place; the identity in one
    process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t
