"""Run a function on N real gloo ranks (separate processes) from a test; failures re-raise in the test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every rank imports anyway, imported once in the forkserver: torch._dynamo too, since building any torch
# optimizer imports it (~1.3 s), and the model and parallel modules by name (their packages load lazily).
RANK_PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.fsdp", "torch._dynamo", "models.transformer",
                "parallel.apply"]


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
    mp.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def run_reporting_ranks(target: Callable[[int, int, int, str], None], world: int, out: Path,
                        timeout: float = 150.0) -> dict[int, dict]:
    """Run `target(rank, world, port, out)` on `world` processes; each writes `out/rank<R>.json` with "done"
    (success) or "error" (a traceback). Returns every rank's report, or fails with each failing rank's
    traceback; a rank that crashes, or hangs past `timeout` and is killed, is reported as such.

    Unlike `run_ranks`, the test process reads results back from files, and a hung rank cannot hang the test.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*RANK_PRELOAD, "torch.distributed.checkpoint.state_dict", "pytest"])
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, str(out)), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    reports, problems = {}, []
    for rank, p in enumerate(procs):
        path = out / f"rank{rank}.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        if report.get("error") is None and report.get("done") and rank not in hung:
            reports[rank] = report
            continue
        state = f"timed out after {timeout:.0f} s" if rank in hung else f"exit code {p.exitcode}"
        problems.append(f"--- rank {rank} ({state}):\n{report.get('error') or 'no report written'}")
    if problems:
        raise RuntimeError(f"{world} gloo ranks failed:\n" + "\n".join(problems))
    return reports


@contextlib.contextmanager
def reporting_rank(rank: int, world: int, port: int, out: str) -> Iterator[dict]:
    """The worker side of `run_reporting_ranks`: join the gloo group, yield the report to fill in, then write
    `out/rank<R>.json` with "done" or the traceback of what failed (never raised: the parent reads it), and
    leave the group."""
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks are local: skip hostname resolution
    report: dict = {"error": None}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        yield report
        dist.barrier()
        report["done"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        if dist.is_initialized():
            dist.destroy_process_group()


# --- torchrun worlds of the real trainer ----------------------------------------------------------------------
TINY = ROOT / "configs" / "tiny.yaml"
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with torchrun's shared rendezvous store, restarted ranks can read the dead
# ranks' gloo addresses from the first attempt (pytorch/pytorch#135712); `python -m launch` sets it too.
TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(nproc: int, args: list[str], restarts: int = 0, background: bool = False,
             ) -> subprocess.Popen | subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m train --config configs/tiny.yaml *args`: finished (asserting exit code
    0), or started in the background (stdout and stderr piped)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), "-m", "train", "--config", str(TINY), *args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# The 4-rank run several test files check (tests/conftest.py `four_rank_run`): tiny, experts over ep=2, FSDP2
# over the 4 data-parallel ranks, 8 steps, evaluation and checkpoints every 4 (written asynchronously).
FOUR_RANK_STEPS = 8


@dataclasses.dataclass
class FourRankRun:
    out: Path  # the run directory: metrics.jsonl, checkpoints/step-4 and step-8
    cache_dir: str  # the built-in corpus it read
    stdout: str  # torchrun's console output (rank 0 logs)


def four_rank_overrides(out_dir: Path | str, cache_dir: Path | str, **extra: object) -> list[str]:
    """The shared 4-rank run's config (`extra` overrides it): a single-process run with these is its reference."""
    base = {"train.out_dir": out_dir, "data.cache_dir": cache_dir, "data.seq_len": 64, "train.global_batch_size": 8,
            "train.micro_batch_size": 2, "train.steps": FOUR_RANK_STEPS, "train.eval_interval": 4,
            "train.eval_batches": 1, "logging.progress": "false", "optim.warmup_steps": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]
