"""Pipeline parallelism on CPU: step time of pp=2 schedules against pp=1 data parallel, and the measured bubble.

    python bench/pipeline.py --steps 8 --warmup 3 --rounds 2

Every configuration runs the real trainer on the same 2 gloo processes (one torch thread each), with the same
global batch, micro-batch size and model, one fresh world per configuration and round (rounds alternate the
configurations, so a slow spell of a shared machine falls on all of them):

    pp1                 parallel.pp=1: FSDP data parallel over both ranks, gradient accumulation over the same
                        micro-batch size (the baseline of the ratios)
    pp1_one_mb          the same with one micro-batch per rank (micro-batch = global batch / 2): what data
                        parallel would run when memory allows
    1f1b                parallel.pp=2, Schedule1F1B
    interleaved_1f1b    parallel.pp=2, 2 virtual stages per rank
    zbv                 parallel.pp=2, ZBVZeroBubble (V placement, split input/weight backward)

Step time: the trainer's own `step_time_s` (data, forward/backward, clip, reductions, optimizer), medians over
the measured steps after `--warmup`; the ratio pp2 / pp1 is of medians measured in the same invocation.

Bubble, measured per pipeline rank: busy = the wall time inside the stage's compute calls of torch's schedule
(`PipelineStage.forward_one_chunk`, `backward_one_chunk`, `backward_weight_one_chunk`, and the last stage's loss),
timed with `perf_counter` around each call (CPU: synchronous, one thread, so the call's wall time is its compute;
receives are waited for by the schedule outside these calls). pipe = the wall time of the trainer's pipeline
phase (`Trainer._run_pipeline`, i.e. `schedule.step` over the step's micro-batches). bubble = the planner's
definition, 1 - sum of the ranks' busy / (ranks x the slower rank's pipe), median over steps (per rank:
1 - busy / pipe). Compared with
`tools.plan_pipeline.simulate(schedule, 2, v, m).bubble` (unit costs F=1, B=2, no communication), and with the
same simulation re-run on the measured mean costs of F, B, I, W (still no communication).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from functools import wraps
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name -> overrides on top of the shared ones
    "pp1": ["parallel.pp=1"],
    "pp1_one_mb": ["parallel.pp=1"],  # + train.micro_batch_size = global batch / 2: one micro-batch per rank
    "1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "interleaved_1f1b": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    "zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv"],
}
VIRTUAL = {"1f1b": 1, "interleaved_1f1b": 2, "zbv": 2}


def _instrument(times: dict[str, float], counts: dict[str, int]) -> None:
    """Time every compute call of torch's pipeline schedules on this rank (class-level wrappers)."""
    from torch.distributed.pipelining import schedules, stage

    def timed(cls: type, name: str, key: str) -> None:
        fn = getattr(cls, name)

        @wraps(fn)
        def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if key == "B" and kwargs.get("full_backward") is False:
                k = "I"  # zero-bubble schedules: the input-gradient half
            elif key == "loss" and not args[0].is_last:
                return fn(self, *args, **kwargs)
            else:
                k = key
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                times[k] = times.get(k, 0.0) + time.perf_counter() - t0
                counts[k] = counts.get(k, 0) + 1

        setattr(cls, name, wrapper)

    timed(stage._PipelineStageBase, "forward_one_chunk", "F")
    timed(stage._PipelineStageBase, "backward_one_chunk", "B")
    timed(stage._PipelineStageBase, "backward_weight_one_chunk", "W")
    timed(schedules._PipelineSchedule, "_maybe_compute_loss", "loss")


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from tests.dist_harness import reporting_rank
    from train.config import load_config
    from train.trainer import Trainer

    warnings.filterwarnings("ignore", message="Slicing a flattened dim")  # torch's own, from FSDP's mesh
    # the timing wrapper around optimizer.step hides the scheduler's call counter: the schedule is unchanged
    warnings.filterwarnings("ignore", message=re.escape("Seems like `optimizer.step()` has been overridden"))
    spec = json.loads((Path(out) / "spec.json").read_text())
    with reporting_rank(rank, world, port, out) as report:
        os.environ["WORLD_SIZE"] = str(world)
        times: dict[str, float] = {}
        counts: dict[str, int] = {}
        _instrument(times, counts)
        trainer = Trainer(load_config(spec["config"], spec["overrides"]))
        pipe = [0.0]
        if trainer.stages is not None:
            run = trainer._run_pipeline

            def timed_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                t0 = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    pipe[0] += time.perf_counter() - t0

            trainer._run_pipeline = timed_run
        opt = [0.0]
        step = trainer.optimizer.step

        def timed_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                opt[0] += time.perf_counter() - t0

        trainer.optimizer.step = timed_step
        steps = []
        try:
            for _ in range(spec["steps"]):
                times.clear()
                counts.clear()
                pipe[0] = opt[0] = 0.0
                rec = trainer.train_step()
                steps.append({"step_s": rec["step_time_s"], "pipe_s": pipe[0], "opt_s": opt[0], "loss": rec["loss"],
                              "times": dict(times), "counts": dict(counts)})
        finally:
            trainer.close()
        report["steps"] = steps
        report["stages"] = [s.stage for s in trainer.stages] if trainer.stages is not None else []
        report["params"] = trainer.model.num_params()


def _run_world(name: str, overrides: list[str], steps: int, tmp: Path) -> dict[int, dict]:
    from tests.dist_harness import run_reporting_ranks

    work = tmp / f"{name}-{time.monotonic_ns()}"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps({"config": str(ROOT / "configs" / "tiny.yaml"),
                                                "overrides": [*overrides, f"train.out_dir={work / 'run'}"],
                                                "steps": steps}))
    return run_reporting_ranks(_rank, 2, work, timeout=900)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per world (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="fresh worlds per configuration, configurations alternating")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    assert args.configs and args.configs[0] == "pp1", "pp1 (the baseline) must come first"

    m = args.global_batch // args.micro_batch  # micro-batches per pipeline run (pp=2 x dp=1)
    common = [f"model.num_hidden_layers={args.layers}", "model.first_k_dense_replace=1",
              f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
              f"train.global_batch_size={args.global_batch}", f"train.steps={args.warmup + args.steps + 10}",
              "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
              "logging.progress=false", "train.threads=1", f"train.pp_microbatches={m}"]
    from bench.machine import cpu_model
    from parallel.schedule_sim import COSTS, simulate

    results: dict[str, list[dict[int, dict]]] = {name: [] for name in args.configs}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.configs if r % 2 == 0 else [args.configs[0], *reversed(args.configs[1:])]
            for name in order:
                t0 = time.perf_counter()
                extra = [f"train.micro_batch_size={args.global_batch // 2}"] if name == "pp1_one_mb" else []
                reports = _run_world(name, [*common, *CONFIGS[name], *extra], args.warmup + args.steps, Path(tmp))
                results[name].append(reports)
                med = statistics.median(s["step_s"] for s in reports[0]["steps"][args.warmup:])
                print(f"round {r + 1} {name}: median step {1e3 * med:.1f} ms (world {time.perf_counter() - t0:.0f} s)",
                      flush=True)

    rows, detail = [], []
    base = None
    for name in args.configs:
        # a step's time is the slower rank's (they leave the step together: the last reductions are collective)
        step_ms, opt_ms, pipe_ms, busy, per_kind = [], [], [], {0: [], 1: []}, {}
        for reports in results[name]:
            for i in range(args.warmup, args.warmup + args.steps):
                step_ms.append(1e3 * max(reports[k]["steps"][i]["step_s"] for k in (0, 1)))
                opt_ms.append(1e3 * max(reports[k]["steps"][i]["opt_s"] for k in (0, 1)))
                for k in (0, 1):
                    s = reports[k]["steps"][i]
                    if s["pipe_s"]:
                        busy[k].append((sum(s["times"].values()), s["pipe_s"]))
                        for kind, t in s["times"].items():
                            tot = per_kind.setdefault((k, kind), [0.0, 0])
                            tot[0] += t
                            tot[1] += s["counts"][kind]
                if reports[0]["steps"][i]["pipe_s"]:
                    pipe_ms.append(1e3 * max(reports[k]["steps"][i]["pipe_s"] for k in (0, 1)))
        med = statistics.median(step_ms)
        base = base if base is not None else med
        row = {"name": name, "med": med, "lo": min(step_ms), "hi": max(step_ms), "ratio": med / base,
               "opt": statistics.median(opt_ms),
               "rounds": [statistics.median(1e3 * max(rep[k]["steps"][i]["step_s"] for k in (0, 1))
                                            for i in range(args.warmup, args.warmup + args.steps))
                          for rep in results[name]]}
        if name in VIRTUAL:
            per_rank = {k: statistics.median(1 - b / p for b, p in busy[k]) for k in (0, 1)}
            # the planner's definition: 1 - sum of busy / (ranks x makespan), per step (makespan: the slower rank)
            row["bubble"] = statistics.median(1 - (b0 + b1) / (2 * max(p0, p1))
                                              for (b0, p0), (b1, p1) in zip(busy[0], busy[1], strict=True))
            row["bubble_ranks"] = per_rank
            row["pipe"] = statistics.median(pipe_ms)
            row["plan"] = simulate(name, 2, VIRTUAL[name], m).bubble
            # the planner's simulation again, on the measured mean cost of each kind (ms per micro-batch per
            # stage-call, both ranks pooled; the last stage's loss folded into F)
            kinds = {}
            for kind in ("F", "B", "I", "W", "loss"):
                t = sum(v[0] for (k, kk), v in per_kind.items() if kk == kind)
                c = sum(v[1] for (k, kk), v in per_kind.items() if kk == kind)
                kinds[kind] = (t, c)
            f_ms = (kinds["F"][0] + kinds["loss"][0]) / max(kinds["F"][1], 1)
            saved = dict(COSTS)
            try:
                for kind in ("B", "I", "W"):
                    if kinds[kind][1]:
                        COSTS[kind] = kinds[kind][0] / kinds[kind][1] / f_ms
                COSTS["F"] = 1.0
                row["plan_measured"] = simulate(name, 2, VIRTUAL[name], m).bubble
                row["costs"] = {k: COSTS[k] for k in ("B", "I", "W") if kinds[k][1]}
            finally:
                COSTS.update(saved)
            for k in (0, 1):
                stages = results[name][0][k]["stages"]
                parts = ", ".join(f"{kind} {1e3 * v[0] / v[1]:.1f} ms x{v[1] // len(results[name]) // args.steps}"
                                  for (kk, kind), v in sorted(per_kind.items()) if kk == k)
                detail.append(f"| {name} | {k} | {stages} | {parts} | {per_rank[k]:.1%} |")
        rows.append(row)

    print()
    print(f"config: configs/tiny.yaml, {args.layers} layers (1 dense + {args.layers - 1} MoE), "
          f"{results[args.configs[0]][0][0]['params'] / 1e6:.2f}M params/rank (pp1: whole model), seq {args.seq_len}, "
          f"global batch {args.global_batch}, micro-batch {args.micro_batch} "
          f"({m} micro-batches per pipeline run; pp1: {m // 2} per rank), float32")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, 2 gloo ranks x 1 thread; "
          f"{args.rounds} round(s) x {args.steps} measured steps after {args.warmup} warm-up; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print()
    print("| config | step ms median | min | max | per-round medians | vs pp1 | optimizer ms | pipeline phase ms | "
          "bubble measured | planner bubble (F=1,B=2) | planner on measured costs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = " / ".join(f"{x:.0f}" for x in r["rounds"])
        if "bubble" in r:
            costs = ", ".join(f"{k}={v:.2f}" for k, v in r["costs"].items())
            extra = (f"{r['pipe']:.0f} | {r['bubble']:.1%} (r0 {r['bubble_ranks'][0]:.0%}, r1 "
                     f"{r['bubble_ranks'][1]:.0%}) | {r['plan']:.1%} | {r['plan_measured']:.1%} ({costs}) |")
        else:
            extra = "- | - | - | - |"
        print(f"| {r['name']} | {r['med']:.0f} | {r['lo']:.0f} | {r['hi']:.0f} | {rounds} | {r['ratio']:.2f}x | "
              f"{r['opt']:.0f} | " + extra)
    print()
    print("| config | rank | stages | mean time per call (calls per step) | bubble |")
    print("|---|---|---|---|---|")
    print("\n".join(detail))


if __name__ == "__main__":
    main()
