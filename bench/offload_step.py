"""Trainer step time with `optim.offload: cpu` against the same run without it, one process, through the real
trainer (train.Trainer.train_step). Prints markdown tables.

    python bench/offload_step.py                                   # tiny and wide, muon and adamw
    python bench/offload_step.py --presets tiny --optims adamw --steps 10 --warmup 3 --rounds 2

For each preset (configs/tiny.yaml as is, and `wide`: tiny widened and deepened so that the optimizer is a
visible share of the step) and each `optim.name` (muon, adamw), a fresh Trainer is built per (offload, round)
with `optim.offload=none` and `optim.offload=cpu`, the order of the two alternating round by round; --warmup
untimed steps, then --steps timed ones. Step time = the trainer's own `step_time_s`; optimizer time = the wall
time of `trainer.optimizer.step()` (its post-step hooks included: router-bias update), timed by a step pre-hook
and a post-hook registered after the trainer's.
Medians over all rounds' timed steps, with min-max; "cpu / none" is the ratio of the medians in the same run.

What this measures on a CPU-only machine: offloading moves nothing across PCIe here (the "device" is the host).
`offload: cpu` turns on FSDP2 in one process (a one-rank gloo group, CPUOffloadPolicy without pinned memory), and
AdamW groups step on DeepSpeed's CPU Adam kernel instead of torch's for-loop. So the difference is FSDP2's
per-unit overhead (the plain one-process run has no FSDP at all) plus the kernel's speed-up on the AdamW groups,
not the host<->GPU copies a GPU run pays. Muon groups step the same way in both (NS on the CPU: no accelerator).

Benchmarks never fail a test run; record the output in docs/BENCHMARKS.md with the machine they ran on. Set
TORCH_EXTENSIONS_DIR to where DeepSpeed's CPU Adam op is already built, or the first offloaded run builds it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/ is the script directory)

from train.config import load_config  # noqa: E402
from train.signals import stop_signals  # noqa: E402
from train.trainer import Trainer  # noqa: E402

PRESETS: dict[str, list[str]] = {
    "tiny": [],
    # ~5x tiny's hidden size, twice the depth, a quarter of the tokens: the optimizer's share grows
    "wide": ["model.hidden_size=384", "model.intermediate_size=1152", "model.num_hidden_layers=6",
             "model.moe_intermediate_size=288", "model.q_lora_rank=96", "model.kv_lora_rank=48",
             "train.global_batch_size=4", "train.micro_batch_size=4"],
}


def run_one(preset: str, optim: str, offload: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("configs/tiny.yaml", [
            f"train.out_dir={out}", f"train.steps={max(steps + warmup, 60)}", "train.eval_interval=0",
            "checkpoint.save_final=false", "logging.progress=false", f"optim.name={optim}",
            f"optim.offload={offload}", *PRESETS[preset]])
        tr = Trainer(cfg)
        try:
            # step hooks, registered after the trainer's own: the time covers the step and its post-step hooks
            # (replacing optimizer.step would trip the LR scheduler's check that step was not overridden)
            opt_box: list[float] = []
            t0 = [0.0]
            tr.optimizer.register_step_pre_hook(lambda *_: t0.__setitem__(0, time.perf_counter()))
            tr.optimizer.register_step_post_hook(lambda *_: opt_box.append(time.perf_counter() - t0[0]))
            recs = []
            for _ in range(steps + warmup):
                recs.append(tr.train_step())
                if stop_signals.received is not None:  # the trainer holds SIGTERM / SIGINT; Trainer.run would stop
                    raise SystemExit(f"stopped by {stop_signals.name}")
            n_params = tr.model.num_params()
            kernel = getattr(tr.optimizer, "host_adam", None) is not None
            adamw_numel = sum(p.numel() for g in tr.optimizer.param_groups if not g.get("use_muon", False)
                              for p in g["params"])
            tokens = cfg.train.global_batch_size * cfg.data.seq_len
            fsdp = tr.mesh is not None
        finally:
            tr.close()
    assert len(opt_box) == len(recs), "a non-finite step skipped the optimizer"
    return {"step": [r["step_time_s"] for r in recs[warmup:]], "opt": opt_box[warmup:], "params": n_params,
            "adamw_numel": adamw_numel, "kernel": kernel, "tokens": tokens, "fsdp": fsdp,
            "loss": recs[-1]["loss"]}


def fmt(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):,.1f} ({1e3 * min(xs):,.1f}-{1e3 * max(xs):,.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--optims", nargs="+", default=["muon", "adamw"], choices=["muon", "adamw"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, {datetime.date.today()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print("\n### Trainer step with optim.offload=cpu vs none, one process\n")
    print(f"median (min-max) over {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps per "
          f"trainer; fp32; a fresh trainer per (offload, round), the order alternating. Step = the trainer's "
          f"step_time_s; optimizer = trainer.optimizer.step() (post-step hooks included). No PCIe on this machine: "
          f"cpu - none is FSDP2's one-rank overhead plus DeepSpeed's CPU Adam kernel on the AdamW groups.\n")
    print("| preset | optim | params (M) | AdamW-group params (M) | tokens/step | none step (ms) | cpu step (ms) "
          "| cpu / none step | none optimizer (ms) | cpu optimizer (ms) | cpu / none optimizer "
          "| optimizer share none / cpu |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for optim in args.optims:
            res: dict[str, dict] = {}
            for rnd in range(args.rounds):
                order = ("none", "cpu") if rnd % 2 == 0 else ("cpu", "none")
                for off in order:
                    r = run_one(preset, optim, off, args.steps, args.warmup)
                    if off not in res:
                        res[off] = r
                    else:
                        res[off]["step"] += r["step"]
                        res[off]["opt"] += r["opt"]
                    print(f"{preset} {optim} offload={off} round {rnd} done (fsdp {r['fsdp']}, kernel "
                          f"{r['kernel']}, loss {r['loss']:.3f})", file=sys.stderr, flush=True)
            n, c = res["none"], res["cpu"]
            ms = {k: statistics.median(v["step"]) for k, v in res.items()}
            mo = {k: statistics.median(v["opt"]) for k, v in res.items()}
            print(f"| {preset} | {optim} | {n['params'] / 1e6:.2f} | {c['adamw_numel'] / 1e6:.2f} | {n['tokens']} | "
                  f"{fmt(n['step'])} | {fmt(c['step'])} | {ms['cpu'] / ms['none']:.2f} | {fmt(n['opt'])} | "
                  f"{fmt(c['opt'])} | {mo['cpu'] / mo['none']:.2f} | {100 * mo['none'] / ms['none']:.0f}% / "
                  f"{100 * mo['cpu'] / ms['cpu']:.0f}% |", flush=True)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")


if __name__ == "__main__":
    main()
