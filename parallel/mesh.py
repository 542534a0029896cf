"""The one DeviceMesh of a run, and the process-group set-up around it.

Pipeline parallelism is the outermost dimension: `pp` stages, each a block of `world / pp` consecutive
ranks (a stage spans whole nodes; only activations cross stage boundaries, the cheapest traffic). Inside a
stage all ranks are data-parallel ranks (FSDP2 shards the stage's dense weights over them). Expert
parallelism borrows from data parallelism: consecutive groups of `ep` ranks (intra-node first, where the
all-to-all is cheapest) each hold all of the stage's experts, `E / ep` whole experts per rank; the same
expert shard is replicated (and further FSDP-sharded) across the `dp / ep` groups.

    mesh dims: ("pp", "dp_mod_ep", "ep")  — shape (pp, dp / ep, ep); "dp" is the last two flattened.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.dims import ParallelDims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """3-D mesh ("pp", "dp_mod_ep", "ep") with the flattened "dp" dim (a stage's data-parallel ranks) registered
    for the dense FSDP wrapping."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_mod_ep, dims.ep), mesh_dim_names=("pp", "dp_mod_ep", "ep"))
    dp_mesh(mesh)  # made once here, on every rank alike (a collective)
    return mesh


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened "dp" mesh (a stage's data-parallel ranks), as `build_mesh` made it. Taken from the dims it
    flattens rather than sliced by name off the root mesh, which torch deprecates."""
    return mesh["dp_mod_ep", "ep"]._flatten("dp")


def init_distributed(device: torch.device, timeout_minutes: int = 30,
                     one_process_group: bool = False) -> tuple[int, int, bool]:
    """Join the process group torchrun describes in the environment: (rank, world, created), `created` saying
    whether this call made the default group (the caller then destroys it when done).

    One process gets (0, 1) and no group, unless `one_process_group`: then a one-rank group over an in-process
    store, so that FSDP2 (and its mixed-precision policy) applies to a single process exactly as to many.
    `timeout_minutes` (`parallel.timeout_minutes`): how long a collective waits for a hung or dead peer."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if world == 1:
        if not one_process_group:
            return 0, 1, False
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=timeout_minutes))
        return 0, 1, True
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), True
