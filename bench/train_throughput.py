"""Training throughput of a preset: tokens/s and step time, measured through the real trainer.

    python bench/train_throughput.py --config configs/tiny.yaml --steps 40 --warmup 5

Prints a table: median / p10 / p90 tokens per second over the steps after `--warmup` (the first steps pay
for allocator growth and lazy initialisation), plus the model size and device. Benchmarks never fail a
test run; record their output in docs/BENCHMARKS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"train.out_dir={out}", f"train.steps={args.steps}",
                                        "train.eval_interval=0", "checkpoint.save_final=false",
                                        "logging.progress=false", *args.overrides])
        trainer = Trainer(cfg)
        records = [trainer.train_step() for _ in range(args.steps)]
    timed = records[args.warmup:]
    tps = sorted(r["tokens_per_s"] for r in timed)
    step_ms = sorted(1e3 * r["step_time_s"] for r in timed)
    q = statistics.quantiles(tps, n=10)
    device = torch.cuda.get_device_name() if trainer.device.type == "cuda" else platform.processor() or "cpu"
    print(f"config {args.config} {' '.join(args.overrides)}")
    print(f"device {trainer.device} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    print(f"model {trainer.model.num_params() / 1e6:.2f}M params, {cfg.train.global_batch_size} x "
          f"{cfg.data.seq_len} tokens/step, dtype {trainer.compute_dtype or torch.float32}")
    print()
    print("| metric | median | p10 | p90 |")
    print("|---|---|---|---|")
    print(f"| tokens/s | {statistics.median(tps):,.0f} | {q[0]:,.0f} | {q[-1]:,.0f} |")
    sq = statistics.quantiles(step_ms, n=10)
    print(f"| step time (ms) | {statistics.median(step_ms):.1f} | {sq[0]:.1f} | {sq[-1]:.1f} |")
    print(f"\nloss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f} over {args.steps} steps "
          f"({len(timed)} timed)")


if __name__ == "__main__":
    main()
