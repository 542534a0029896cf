"""Checkpoints with torch.distributed.checkpoint (DCP), written so a crash never corrupts the last good one.

Layout: `<out_dir>/checkpoints/step-<N>/` holding the DCP files of model + optimizer, one
`train_state-rank<R>.pt` per rank (step, LR schedule, data position, RNG states), `config.yaml`, and a
`COMPLETE` marker. A checkpoint is written under a hidden temporary name, the marker is written last, and
only then is the directory renamed into place; resume only ever considers directories with the marker.

DCP is used even in one process (it needs no process group there) so the same files reshard when the
world size changes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data.shards import fsync_dir
from models.export import quiet_dcp

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first. Incomplete or temporary directories are ignored."""
    root = checkpoint_root(out_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """`auto`: newest complete checkpoint of this run (or none); `none`; or an explicit checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return path


class Checkpointer:
    """Writes checkpoints `step-<N>` atomically, optionally in the background, and prunes old ones.

    With `async_save`, `save` returns once the state is staged (copied to CPU memory): DCP writes it from a
    background thread while training continues, over a dedicated gloo group so its collectives never
    interleave with the training ones. The checkpoint becomes visible (marker + rename) in `poll`, at the
    first step boundary where every rank's write has finished, or in `wait`. One save is in flight at most.
    """

    def __init__(self, out_dir: str | Path, keep_last: int, async_save: bool = False,
                 device: torch.device | None = None) -> None:
        self.out_dir, self.keep_last, self.async_save = Path(out_dir), keep_last, async_save
        self.device = device or torch.device("cpu")  # where the training group's collectives run
        self._pending: tuple[Any, Path, Path, int, str] | None = None
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if async_save and distributed else None
        if async_save and not distributed:  # the writer thread warns outside `quiet_dcp`; one process is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], config_yaml: str) -> Path | None:
        """Write `step-<step>`; returns its path, or None while an async write is still in flight."""
        self.wait()
        root = checkpoint_root(self.out_dir)
        final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier attempt at this step
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = _state_dicts(model, optimizer)
        torch.save({**train_state, "rng": rng_state()}, tmp / f"train_state-rank{_rank()}.pt")
        with quiet_dcp():
            if self.async_save:
                future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                                        process_group=self._group)
                self._pending = (future, tmp, final, step, config_yaml)
                return None
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        return self._finalize(tmp, final, step, config_yaml)

    def poll(self) -> Path | None:
        """Publish the in-flight checkpoint if every rank has finished writing it (call at step boundaries)."""
        if self._pending is None:
            return None
        # Asked on the training group, from this thread: the writer thread may be using the gloo group.
        busy = torch.tensor([0.0 if self._pending[0].done() else 1.0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return self.wait() if busy.item() == 0.0 else None

    def wait(self) -> Path | None:
        """Block until the in-flight checkpoint is written, then publish it."""
        if self._pending is None:
            return None
        future, tmp, final, step, config_yaml = self._pending
        self._pending = None
        future.result()
        return self._finalize(tmp, final, step, config_yaml)

    def _finalize(self, tmp: Path, final: Path, step: int, config_yaml: str) -> Path:
        _barrier(self._group)
        if _rank() == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            fsync_dir(tmp)
            (tmp / COMPLETE).write_text(f"step {step}\n")
            if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old one
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point: the checkpoint exists complete, or not at all
            fsync_dir(final.parent)
            for _, old in list_checkpoints(self.out_dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self._group)
        return final


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return this rank's train state (RNG already restored)."""
    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"train_state-rank{_rank()}.pt"
    if not rank_file.exists():  # resumed with more ranks than saved: take rank 0's (RNG differs per rank)
        rank_file = path / "train_state-rank0.pt"
    train_state = torch.load(rank_file, weights_only=False)
    set_rng_state(train_state.pop("rng"))
    return train_state


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    with quiet_dcp():
        return get_state_dict(model, optimizer)

