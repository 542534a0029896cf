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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from models.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world: int
    dp_shard: int  # data-parallel ranks per pipeline stage
    ep: int
    pp: int = 1

    @property
    def dp_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @classmethod
    def from_config(cls, parallel_cfg: object, world: int, n_routed_experts: int) -> ParallelDims:
        """Resolve `-1` ("the rest of the world") and validate, naming the key at fault.

        One process has no pipeline, data or expert parallelism: `pp`, `dp_shard` and `ep` are ignored there (a config
        written for a cluster still runs on one GPU; see `ignored_in_one_process`)."""
        dp_shard = int(getattr(parallel_cfg, "dp_shard", -1))
        ep = int(getattr(parallel_cfg, "ep", 1))
        pp = int(getattr(parallel_cfg, "pp", 1))
        for key, value in (("dp_shard", dp_shard), ("ep", ep)):
            if value < 1 and value != -1:
                raise ConfigError(f"parallel.{key}: must be -1 (the whole data-parallel size) or >= 1, got {value}")
        if pp < 1:
            raise ConfigError(f"parallel.pp: the number of pipeline stages must be >= 1, got {pp}")
        if world == 1:
            return cls(world=1, dp_shard=1, ep=1)
        if world % pp:
            raise ConfigError(f"parallel.pp: {pp} pipeline stages do not divide the world of {world} ranks (allowed: "
                              f"{', '.join(str(d) for d in range(1, world + 1) if world % d == 0)})")
        dp = world // pp
        if dp_shard == -1:
            dp_shard = dp
        if ep == -1:
            ep = dp_shard
        if dp_shard != dp:
            raise ConfigError(f"parallel.dp_shard: {dp_shard} must equal world / parallel.pp = {dp} (or be -1): "
                              "every rank of a pipeline stage is a data-parallel rank")
        if dp_shard % ep:
            raise ConfigError(f"parallel.ep: {ep} must divide the data-parallel size {dp_shard} "
                              f"(allowed: {', '.join(str(d) for d in range(1, dp_shard + 1) if dp_shard % d == 0)})")
        if n_routed_experts and n_routed_experts % ep:
            raise ConfigError(f"parallel.ep: model.n_routed_experts={n_routed_experts} is not divisible by "
                              f"parallel.ep={ep}; each expert-parallel rank must hold the same number of whole experts")
        return cls(world=world, dp_shard=dp_shard, ep=ep, pp=pp)


def ignored_in_one_process(parallel_cfg: object) -> str | None:
    """The notice to print when a single process is given a parallel layout it ignores, else None."""
    values = {k: int(getattr(parallel_cfg, k, d)) for k, d in (("pp", 1), ("dp_shard", -1), ("ep", 1))}
    ignored = [f"parallel.{k}={v}" for k, v in values.items() if v not in (1, -1)]
    if not ignored:
        return None
    return (f"note: {' and '.join(ignored)} ignored: this is one process, which holds every layer, every expert "
            "and the whole batch (start several with `python -m launch --gpus-per-node N`)")


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
