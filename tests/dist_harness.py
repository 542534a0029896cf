"""Run a function on N real gloo ranks (separate processes) from a test; failures re-raise in the test."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    # Leave together: a rank tearing gloo down while a peer still closes its connections can abort
    # ("terminate called without an active exception"). On an error, spawn reports it and kills the rest.
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """`fn(rank, world, *args)` on `world` processes joined in one gloo group (fn must be importable)."""
    # Ranks fork from a forkserver that imports torch once per test session (a fresh interpreter per rank
    # would spend most of these tests' time importing torch on a 2-core machine).
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed.tensor",
                                                         "torch.distributed.fsdp", "models", "parallel"])
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="forkserver")
