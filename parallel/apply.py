"""`parallelize`: every kind of parallelism applied to the plain model, in the one order that composes."""

from __future__ import annotations

import torch

from models.transformer import Transformer
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from parallel.pipeline import PipelinePlan, StageModule, prune_to_stages


def parallelize(model: Transformer, mesh: torch.distributed.device_mesh.DeviceMesh | None,
                activation_checkpointing: str = "none", param_dtype: torch.dtype | None = None,
                compile: bool = False, pipeline: PipelinePlan | None = None,
                reshard_after_forward: bool | None = None, offload: bool = False) -> list[StageModule] | None:
    """Apply, in this order: the pipeline cut (`pipeline`: drop the layers other ranks' stages run, make this
    rank's stage views), expert parallelism (experts become DTensors on "ep"), activation checkpointing (wraps
    blocks), `torch.compile` of each block (regional: one small graph per block kind, parameter names
    unchanged), FSDP2 (shards what is left; the stage views are its roots under a pipeline). Call on the
    meta-device model, then `to_empty` + `init_weights`. With `mesh=None` (one process) only checkpointing and
    compile apply. Returns the stage views (None without a pipeline).

    `reshard_after_forward` (None = auto: False under a pipeline, whose micro-batches would gather the same
    weights again and again, else True). `offload`: FSDP2 keeps the sharded state in host memory (needs a mesh)."""
    stages = prune_to_stages(model, pipeline) if pipeline is not None else None
    if mesh is not None:
        apply_expert_parallel(model, mesh["ep"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if stages is not None:  # the views hold the blocks: take the wrapped ones
        for stage in stages:
            for name in stage.layers:
                stage.layers[name] = model.layers[name]
    if compile:
        for block in model.layers.values():
            block.compile()  # in place: the module (and its state-dict names) stays, its forward is compiled
    if mesh is not None:
        if reshard_after_forward is None:
            reshard_after_forward = stages is None
        apply_fsdp(model, mesh, param_dtype=param_dtype, roots=stages, reshard_after_forward=reshard_after_forward,
                   offload=offload)
    return stages

