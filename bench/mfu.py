"""Single-device MFU: tokens/s, achieved TFLOP/s and MFU of a preset through the real trainer, under natural
routing and under forced-balanced routing.

    python bench/mfu.py                                   # configs/small.yaml on a GPU
    python bench/mfu.py --config configs/tiny.yaml        # on CPU (the default config when there is no GPU)
    python bench/mfu.py --peak-tflops 989 train.micro_batch_size=4

FLOPs per token: `models.flops.flops_per_token` (the count of the planner and of the trainer's MFU: matmuls
only, causal attention, training = 3 x forward, no recompute). Peak: on CUDA `--peak-tflops` or the known dense
bf16 peak of the GPU (`train.metrics.detect_peak_tflops`); on CPU a measured fp32 matmul peak of the same
machine (`machine.matmul_peak_tflops`: a 2048 x 2048 `torch.mm`, best of 5), so CPU MFU is against what this
machine's GEMM reaches, not a datasheet.

Routings: "natural" is the router's own top-k (what training does; its imbalance depends on the weights);
"balanced" forces every expert to receive the same number of token copies (`models.moe.forced_balanced_routing`:
token t's k experts are (t*k + j) mod E, gating weights still the router's scores). Peers publish only the
balanced figure; compare theirs with that row. Imbalance = max over steps and layers of max/mean expert load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py when imported from tests

import torch  # noqa: E402
from machine import cpu_model, matmul_peak_tflops  # noqa: E402

from models.flops import flops_per_token  # noqa: E402
from models.moe import forced_balanced_routing  # noqa: E402
from train.config import load_config  # noqa: E402
from train.metrics import detect_peak_tflops  # noqa: E402
from train.trainer import Trainer  # noqa: E402

ROUTINGS = ("natural", "balanced")


def default_config() -> str:
    return "configs/small.yaml" if torch.cuda.is_available() else "configs/tiny.yaml"


def measure(config: str, overrides: list[str], routing: str, steps: int, warmup: int) -> dict[str, Any]:
    """Run `warmup + steps` trainer steps under `routing`; medians over the timed steps."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [f"train.out_dir={out}", f"train.steps={warmup + steps}",
                                   "train.eval_interval=0", "checkpoint.save_final=false",
                                   "logging.progress=false", "optim.warmup_steps=0",  # the lr does not
                                   *overrides])  # change the step's work, and a short run has fewer steps
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        ctx = forced_balanced_routing(trainer.model) if routing == "balanced" else contextlib.nullcontext()
        with ctx:
            records = [trainer.train_step() for _ in range(warmup + steps)]
    timed = records[warmup:]
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    loads = [v for r in timed for k, v in r.items() if k.startswith("moe/load_imbalance/")]
    return {
        "routing": routing,
        "tokens_per_s": tps,
        "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in timed),
        "flops_per_token": fpt,
        "achieved_tflops": fpt * tps / 1e12,
        "imbalance": max(loads) if loads else 1.0,
        "device": trainer.device,
        "dtype": trainer.compute_dtype or torch.float32,
        "params": trainer.model.num_params(),
        "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
    }


def peak_for(device: torch.device, peak_tflops: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from)."""
    if peak_tflops is not None:
        return peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        return detect_peak_tflops(device), "known dense bf16 peak of this GPU"
    return matmul_peak_tflops(), "measured fp32 2048x2048 torch.mm, best of 5"


def run(config: str, overrides: list[str], steps: int, warmup: int,
        peak_tflops: float | None = None) -> tuple[list[dict[str, Any]], float | None, str]:
    """Both routings, each in a fresh trainer (same seed), and the peak: (rows, peak TFLOP/s, peak source).
    Each row gets `peak_tflops` and `mfu` = achieved / peak (None when the peak is unknown)."""
    rows = [measure(config, overrides, routing, steps, warmup) for routing in ROUTINGS]
    peak, source = peak_for(rows[0]["device"], peak_tflops)  # after the runs: the same warm machine
    for r in rows:
        r["peak_tflops"] = peak
        r["mfu"] = r["achieved_tflops"] / peak if peak else None
    return rows, peak, source


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="default: configs/small.yaml on CUDA, configs/tiny.yaml else")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per routing")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, lazy init)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak; default: see above")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config = args.config or default_config()

    rows, peak, source = run(config, args.overrides, args.steps, args.warmup, args.peak_tflops)
    first = rows[0]
    gpu = first["device"].type == "cuda"
    unit, scale = ("TFLOP/s", 1.0) if gpu else ("GFLOP/s", 1e3)
    name = torch.cuda.get_device_name() if gpu else cpu_model()
    print(f"config {config} {' '.join(args.overrides)}")
    print(f"device {first['device']} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, {platform.system()}")
    print(f"model {first['params'] / 1e6:.2f}M params, {first['tokens_per_step']} tokens/step, dtype "
          f"{first['dtype']}, {first['flops_per_token'] / 1e6:,.2f} MFLOP/token (models.flops, training)")
    peak_txt = f"{peak * scale:,.1f} {unit}" if peak else "unknown (pass --peak-tflops)"
    print(f"peak {peak_txt} ({source}); {args.steps} timed steps after {args.warmup} warmup, medians")
    print()
    print(f"| routing | tokens/s | step (ms) | achieved {unit} | MFU | expert-load imbalance (max/mean) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        print(f"| {r['routing']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{r['achieved_tflops'] * scale:,.2f} | {mfu} | {r['imbalance']:.3f} |")
    print("\nPeers publish only the balanced row (every expert gets the same number of token copies).")
    return rows


if __name__ == "__main__":
    main()
