"""Parallelism applied to the plain model from outside: one DeviceMesh, expert parallelism (all-to-all
token dispatch), FSDP2 for everything else, activation checkpointing."""

from __future__ import annotations

import torch

from models.transformer import Transformer
from parallel.expert_parallel import apply_expert_parallel, dispatch_bytes
from parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from parallel.mesh import ParallelDims, build_mesh, init_distributed
from parallel.utils import all_reduce_max, all_reduce_mean, all_reduce_sum, clip_grad_norm_


def parallelize(model: Transformer, mesh: torch.distributed.device_mesh.DeviceMesh | None,
                activation_checkpointing: str = "none", param_dtype: torch.dtype | None = None,
                compile: bool = False) -> Transformer:
    """Apply, in this order: expert parallelism (experts become DTensors on "ep"), activation
    checkpointing (wraps blocks), `torch.compile` of each block (regional: one small graph per block kind,
    parameter names unchanged), FSDP2 (shards what is left). Call on the meta-device model, then
    `to_empty` + `init_weights`. With `mesh=None` (one process) only checkpointing and compile apply."""
    if mesh is not None:
        apply_expert_parallel(model, mesh["ep"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers.values():
            block.compile()  # in place: the module (and its state-dict names) stays, its forward is compiled
    if mesh is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype)
    return model


__all__ = [
    "ParallelDims", "all_reduce_max", "all_reduce_mean", "all_reduce_sum", "build_mesh", "clip_grad_norm_",
    "dispatch_bytes", "init_distributed", "parallelize",
]
