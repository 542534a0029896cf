"""Checkpoints with torch.distributed.checkpoint (DCP), written so a crash never corrupts the last good one.

Layout: `<out_dir>/checkpoints/step-<N>/` holding the DCP files of model + optimizer, one
`train_state-rank<R>.pt` per rank (step, LR schedule, data position, RNG states), `config.yaml`, and a
`COMPLETE` marker. A checkpoint is written under a hidden temporary name, the marker is written last, and
only then is the directory renamed into place; resume only ever considers directories with the marker.

DCP is used even in one process (it needs no process group there) so the same files reshard when the
world size changes.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data.shards import fsync_dir

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step-<step>` atomically and prune all but the newest `keep_last` complete ones."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash during an earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    model_sd, optim_sd = _state_dicts(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**train_state, "rng": rng_state()}, tmp / f"train_state-rank{rank}.pt")
    _barrier()

    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        fsync_dir(tmp)
        (tmp / COMPLETE).write_text(f"step {step}\n")
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return this rank's train state (RNG already restored)."""
    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"train_state-rank{_rank()}.pt"
    if not rank_file.exists():  # resumed with more ranks than saved: take rank 0's (RNG differs per rank)
        rank_file = path / "train_state-rank0.pt"
    train_state = torch.load(rank_file, weights_only=False)
    set_rng_state(train_state.pop("rng"))
    return train_state


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns at every call that it runs without a process group; in one process that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
        yield


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    with _quiet():
        return get_state_dict(model, optimizer)

