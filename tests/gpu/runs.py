"""Trainer runs for the GPU suite: the `tiny` preset shrunk to a smoke test, in-process or as `python -m train`
/ torchrun subprocesses, and their per-step losses.

On CUDA the runs use the preset's sequence length (128) and a 16-sequence batch in two micro-batches; a CPU dry
run (CHOGORI_GPU_TESTS_DEVICE=cpu) shrinks them further, because bf16 matmuls on CPUs without bf16 units run
some 15x slower than fp32 — it checks the tests' logic, not the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from train.config import ExperimentConfig, load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

# per device type: tokens per step and step counts of the suite's runs
SIZES = {
    "cuda": {"data.seq_len": 128, "train.global_batch_size": 16, "train.micro_batch_size": 8},
    "cpu": {"data.seq_len": 32, "train.global_batch_size": 4, "train.micro_batch_size": 2},
}
STEPS = {"cuda": 30, "cpu": 15}


def overrides(out: Path, cache: Path, device: torch.device, **extra: object) -> list[str]:
    """`key=value` overrides of configs/tiny.yaml for a short bf16 run on `device` (no eval, no checkpoint)."""
    base: dict[str, object] = {
        "train.device": device.type, "train.dtype": "bf16", "train.out_dir": out, "data.cache_dir": cache,
        "train.steps": STEPS[device.type], "optim.warmup_steps": 5, "train.eval_interval": 0,
        "logging.progress": "false", "checkpoint.save_final": "false", "train.log_interval": 1,
        **SIZES[device.type], **extra}
    return [f"{k}={v}" for k, v in base.items()]


def config(out: Path, cache: Path, device: torch.device, **extra: object) -> ExperimentConfig:
    return load_config(TINY, overrides(out, cache, device, **extra))


def train_in_process(cfg: ExperimentConfig) -> list[float]:
    """`Trainer(cfg).run()` in this process, its process group (a one-rank group under bf16) left afterwards so
    that later tests, on any device, start clean; returns the per-step losses."""
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return losses(Path(cfg.train.out_dir))


def losses(run_dir: Path) -> list[float]:
    """The training losses of `run_dir/metrics.jsonl`, one per step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run_module(args: list[str], timeout: int = 900) -> str:
    """`python <args>` from the repository root (e.g. `-m train ...`); fails with its output tail, returns stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout
