"""The parallel layout as numbers, without torch: the data/expert/pipeline sizes a world splits into and the
pipeline schedules' names. The config check (train.config) validates a layout with these in every command line,
before anything imports torch; parallel/mesh.py builds the DeviceMesh from them."""

from __future__ import annotations

from dataclasses import dataclass

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


# parallel.pp_schedule -> (torch's schedule class name, stage placement, virtual stages per rank: None = any)
SCHEDULES: dict[str, tuple[str, str, int | None]] = {
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "1f1b": ("Schedule1F1B", "loop", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "interleaved_zb": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zbv": ("ScheduleZBVZeroBubble", "v", 2),
    "dualpipev": ("ScheduleDualPipeV", "v", 2),
}


def virtual_stages(schedule: str, requested: int) -> int:
    """Stages per rank for `schedule`: `requested` (`parallel.pp_virtual_stages`; -1 = the schedule's default),
    checked against what the schedule supports."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule: must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
    fixed = SCHEDULES[schedule][2]
    if requested == -1:
        return fixed if fixed is not None else 2
    if requested < 1:
        raise ConfigError(f"parallel.pp_virtual_stages: must be -1 (the schedule's default) or >= 1, got {requested}")
    if fixed is not None and requested != fixed:
        raise ConfigError(f"parallel.pp_virtual_stages: the {schedule} schedule runs exactly {fixed} stage(s) per "
                          f"rank, got {requested} (use interleaved_1f1b for another number)")
    return requested
