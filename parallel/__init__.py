"""Parallelism applied to the plain model from outside: one DeviceMesh, expert parallelism (all-to-all
token dispatch), FSDP2 for everything else, activation checkpointing, pipeline stages.

The names below load on first use, so that `parallel.dims` (the config check's, torch-free) can be imported
without torch, FSDP2 and DTensor (with sympy, ~1.2 s of start-up)."""

from __future__ import annotations

import importlib

_HOMES = {
    "parallelize": "parallel.apply",
    "apply_expert_parallel": "parallel.expert_parallel", "dispatch_bytes": "parallel.expert_parallel",
    "apply_activation_checkpointing": "parallel.fsdp", "apply_fsdp": "parallel.fsdp",
    "ParallelDims": "parallel.dims", "build_mesh": "parallel.mesh", "dp_mesh": "parallel.mesh",
    "init_distributed": "parallel.mesh",
    "PipelinePlan": "parallel.pipeline", "StageModule": "parallel.pipeline", "plan_pipeline": "parallel.pipeline",
    "prune_to_stages": "parallel.pipeline",
    "all_reduce_max": "parallel.utils", "all_reduce_sum": "parallel.utils", "clip_grad_norm_": "parallel.utils",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
