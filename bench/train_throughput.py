"""Training throughput of a preset through the real trainer: tokens/s over repeated runs, and where a step goes.

    python bench/train_throughput.py                         # tiny, then small at reduced size (SMALL_REDUCED)
    python bench/train_throughput.py --config configs/tiny.yaml --runs 5 --steps 20 --warmup 4 [overrides ...]
    python bench/train_throughput.py --baseline 604e87f     # the same, also for that git revision, alternating

Every run is an independent process that builds a `train.trainer.Trainer` and calls `train_step()` `--steps`
times; the first `--warmup` steps (allocator growth, lazy initialisation) are not timed. A run reports its
median tokens/s and, summed over its timed steps, the time spent in
- attention: forward and backward of every `models.attention.MLAttention` module,
- MoE: forward and backward of every `models.moe.MoE` module (router, experts, shared experts, balance loss),
- optimizer: the trainer's `optimizer_step` region (`train.profiling.region`: the update and its post-step
  hooks — router-bias update, QK-Clip),
- rest: the step time the trainer reports minus those three (embedding, norms, dense MLPs, LM head and loss,
  gradient clipping, statistics reduction, data loading, autograd bookkeeping).

Module times come from forward pre/post hooks and full backward pre/post hooks registered from outside on the
model's modules; region times from wrapping the trainer module's `region` context manager (both keep what they
wrap). On CPU a host clock (`time.perf_counter`) is exact because the ops run synchronously; on CUDA every
boundary records a CUDA event on the current stream and the intervals are read after the step, whose end the
trainer already synchronises. The full backward hooks add a few identity autograd nodes per module: small, and
the same on both sides of a comparison.

`--baseline REV` checks REV out into a temporary `git worktree` and measures it with this same script (the
measurement code of the current tree, the model/trainer code of REV: the worker runs with cwd and PYTHONPATH at
the worktree), alternating current and baseline runs (ABBA order), and prints both with each part's time ratio.
Both sides read the same config file (the current tree's), so they run the same workload; a revision whose code
lacks a piece (a config key, the region helper, the module classes) is reported with a message, not a crash.

Workers run with `--threads` (default 1) intra-op threads: on a shared 2-core machine two OpenMP threads that
lose one core to another process make steps several times slower and wildly uneven. Benchmarks never fail a
test run; record the output in docs/bench_train.md with the machine and load it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RESULT_TAG = "BENCH_RESULT "
PARTS = ("attention", "moe", "optimizer", "rest")
DETAIL = ("attention_fwd", "attention_bwd", "moe_fwd", "moe_bwd", "optimizer", "clip_grad_norm", "stats_reduce")
# `small` cut down until one step takes seconds, not minutes, on one CPU core: one layer (MoE, no dense layer) of the
# preset's width (hidden 1024, vocab 32768, MLA ranks, expert FFN 512, top-6 routing) with 8 of its 64 experts, and
# 2 x 256 tokens a step. The full-depth, 64-expert preset spends ~1 min a step in Muon alone on this CPU.
SMALL_REDUCED = ["model.num_hidden_layers=1", "model.first_k_dense_replace=0", "model.n_routed_experts=8",
                 "data.seq_len=256", "train.global_batch_size=2", "train.micro_batch_size=2"]
# (config, overrides, default runs / steps / warmup): a tiny run takes ~30 s, a reduced small one ~75 s here
PRESETS = [("configs/tiny.yaml", [], (5, 20, 4)), ("configs/small.yaml", SMALL_REDUCED, (3, 4, 1))]


# --- measurement inside one run (the worker) ---------------------------------------------------------------------

class PartTimer:
    """Intervals of named parts of a step. `start(key)` / `stop(key, part)` bracket one interval; `collect()`
    returns the seconds per part since the last `collect()`. CPU: host clock. CUDA: events on the current stream
    (read after the caller synchronised)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._open: dict[Any, Any] = {}
        self._spans: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            import torch
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, key: Any) -> None:
        self._open[key] = self._now()

    def stop(self, key: Any, part: str) -> None:
        begin = self._open.pop(key, None)
        if begin is not None:  # a stop without its start (a hook that fired alone) counts nothing
            self._spans.append((part, begin, self._now()))

    def collect(self) -> dict[str, float]:
        if self.cuda and self._spans:
            import torch
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for part, begin, end in self._spans:
            seconds = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
            out[part] = out.get(part, 0.0) + seconds
        self._spans.clear()
        self._open.clear()
        return out


def hook_modules(model: Any, cls: type, part: str, timer: PartTimer) -> int:
    """Time forward and backward of every `cls` module of `model` as `<part>_fwd` / `<part>_bwd`. Returns how
    many modules were hooked."""
    n = 0
    for module in model.modules():
        if not isinstance(module, cls):
            continue
        key = id(module)
        module.register_forward_pre_hook(lambda m, a, k=key: timer.start((part, "fwd", k)))
        module.register_forward_hook(lambda m, a, o, k=key: timer.stop((part, "fwd", k), f"{part}_fwd"))
        module.register_full_backward_pre_hook(lambda m, g, k=key: timer.start((part, "bwd", k)))
        module.register_full_backward_hook(lambda m, gi, go, k=key: timer.stop((part, "bwd", k), f"{part}_bwd"))
        n += 1
    return n


def timed_region(original: Callable[[str], Any], timer: PartTimer) -> Callable[[str], Any]:
    """`train.profiling.region`, also timing each region as the part of its name."""
    @contextlib.contextmanager
    def region(name: str) -> Any:
        timer.start(("region", name))
        try:
            with original(name):
                yield
        finally:
            timer.stop(("region", name), name.replace("/", "_"))
    return region


def measure_run(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """One independent trainer run, with the code importable right now (`train`, `models` on sys.path). Returns
    the run's summary; missing pieces of an older code base go into `notes` (or `error`)."""
    import torch

    notes: list[str] = []
    try:
        import train.trainer as trainer_mod
        from train.config import load_config
        from train.trainer import Trainer
    except ImportError as e:
        return {"error": f"cannot import the trainer (train.config.load_config, train.trainer.Trainer): {e}"}
    classes: dict[str, Any] = {}
    for part, mod_name, cls_name in (("attention", "models.attention", "MLAttention"), ("moe", "models.moe", "MoE")):
        try:
            classes[part] = getattr(__import__(mod_name, fromlist=[cls_name]), cls_name)
        except (ImportError, AttributeError) as e:
            notes.append(f"no {mod_name}.{cls_name} ({e}): its time counts as rest")
    with tempfile.TemporaryDirectory() as out:
        try:
            cfg = load_config(config, [f"train.out_dir={out}", f"train.steps={max(steps, 100_000)}",
                                       "train.eval_interval=0",
                                       "checkpoint.save_final=false", "logging.progress=false", *overrides])
            trainer = Trainer(cfg)
        except Exception as e:  # an older revision may not know a key or the config layout
            return {"error": f"cannot build the trainer for {config} {' '.join(overrides)}: "
                             f"{type(e).__name__}: {e}"}
        if not hasattr(trainer, "train_step"):
            return {"error": "train.trainer.Trainer has no train_step(): this benchmark cannot drive it"}
        timer = PartTimer(trainer.device.type == "cuda")
        hooked = {part: hook_modules(trainer.model, cls, part, timer) for part, cls in classes.items()}
        for part, n in hooked.items():
            if n == 0:
                notes.append(f"no {part} module found in the model")
        original_region = getattr(trainer_mod, "region", None)
        if original_region is not None:
            trainer_mod.region = timed_region(original_region, timer)
        else:  # before the trainer had named regions: time the optimizer's step call itself
            notes.append("train.trainer has no region(): optimizer time is trainer.optimizer.step() wrapped")
            step_fn = trainer.optimizer.step

            def optimizer_step(*a: Any, **k: Any) -> Any:
                timer.start(("region", "optimizer_step"))
                try:
                    return step_fn(*a, **k)
                finally:
                    timer.stop(("region", "optimizer_step"), "optimizer_step")
            trainer.optimizer.step = optimizer_step
        try:
            records, parts = [], []
            for i in range(steps):
                rec = trainer.train_step()
                times = timer.collect()
                if i >= warmup:
                    records.append(rec)
                    parts.append(times)
        finally:
            if original_region is not None:
                trainer_mod.region = original_region
    missing = {"tokens_per_s", "step_time_s", "loss"} - set(records[0])
    if missing:
        return {"error": f"train_step() records lack {sorted(missing)}: this benchmark cannot read its timing"}
    step_s = sum(r["step_time_s"] for r in records)
    part_s = {name: sum(p.get(name, 0.0) for p in parts) for name in DETAIL}
    summary = {
        "attention": part_s["attention_fwd"] + part_s["attention_bwd"],
        "moe": part_s["moe_fwd"] + part_s["moe_bwd"],
        "optimizer": part_s["optimizer"] if original_region is None else sum(p.get("optimizer_step", 0.0)
                                                                               for p in parts),
    }
    part_s["optimizer"] = summary["optimizer"]
    summary["rest"] = step_s - sum(summary.values())
    n = len(records)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "step_ms": 1e3 * step_s / n,
        "parts_ms": {k: 1e3 * v / n for k, v in summary.items()},
        "detail_ms": {k: 1e3 * v / n for k, v in part_s.items()},
        "timed_steps": n,
        "loss": [records[0]["loss"], records[-1]["loss"]],
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
        "device": str(trainer.device),
        "dtype": str(getattr(trainer, "compute_dtype", None) or torch.float32),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "notes": notes,
    }


def worker(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    try:
        result = measure_run(args.config, args.overrides, args.steps, args.warmup)
    except Exception as e:  # report, so the parent can print it next to the other side's numbers
        result = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_TAG + json.dumps(result), flush=True)


# --- the parent: runs, alternation, baseline worktree, tables -------------------------------------------------------

def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def describe(root: Path) -> str:
    """`<short hash>` of the checkout, `+uncommitted` when its tracked files differ from it."""
    try:
        head = git("rev-parse", "--short", "HEAD", cwd=root)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=root)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"
    return head + ("+uncommitted" if dirty else "")


def spawn(root: Path, config: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process whose `train`/`models` come from `root`; this script does the measuring."""
    cmd = [sys.executable, str(SCRIPT), "--worker", "--config", config, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), *overrides]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited with {proc.returncode} and no result: " + " | ".join(tail)}


def spread(values: list[float], fmt: str) -> str:
    """median (min-max) over the runs."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def flat(run: dict[str, Any]) -> dict[str, float] | None:
    """One run's figures by name (None for a failed run): tokens/s, step ms, each part's ms and % share, detail."""
    if "error" in run:
        return None
    out = {"tokens_per_s": run["tokens_per_s"], "step_ms": run["step_ms"], **run["detail_ms"]}
    for part in PARTS:
        out[part] = run["parts_ms"][part]
        out[part + "_share"] = 100 * run["parts_ms"][part] / run["step_ms"]
    return out


def paired_ratio(cur: list[dict[str, float] | None], base: list[dict[str, float] | None], key: str) -> str:
    """current / baseline of the runs made next to each other (repeat i of both sides): median (min-max). Pairs
    share the machine's load at the time, so their ratio is steadier than a ratio of medians on a busy host."""
    ratios = [c[key] / b[key] for c, b in zip(cur, base, strict=False) if c and b and b[key] > 0]
    return spread(ratios, "{:.2f}").replace(" (", "× (", 1) if len(ratios) > 1 else spread(ratios, "{:.2f}×")


DETAIL_LABELS = ("attention fwd", "attention bwd", "MoE fwd", "MoE bwd", "optimizer step", "clip_grad_norm",
                 "stats_reduce")


def table(sides: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """The markdown tables for one config: one column per side, a paired-ratio column when there are two."""
    runs = [[flat(r) for r in rs] for _, rs in sides]
    vals = [{k: [f[k] for f in fs if f] for k in next((f for f in fs if f), {})} for fs in runs]
    two = len(sides) == 2

    def col(i: int, key: str) -> list[float]:
        return vals[i].get(key, [])

    head = "| | " + " | ".join(label for label, _ in sides) + (" | current / baseline |" if two else " |")
    sep = "|---" * (len(sides) + 1 + two) + "|"
    lines = ["Median over runs (min–max). tokens/s: each run's median over its timed steps; times: each run's mean "
             "per timed step, with its share of the step time.", "", head, sep]

    def row(name: str, cells: list[str], key: str, what: str) -> None:
        if two:
            cells = [*cells, f"{paired_ratio(runs[0], runs[1], key)} {what}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("tokens/s", [spread(col(i, "tokens_per_s"), "{:,.0f}") for i in range(len(sides))], "tokens_per_s",
        "tokens/s")
    row("step time (ms)", [spread(col(i, "step_ms"), "{:.1f}") for i in range(len(sides))], "step_ms", "time")
    for part, label in zip(PARTS, ("attention", "MoE", "optimizer", "rest"), strict=True):
        row(label, [f"{spread(col(i, part), '{:.1f}')} ms, {spread(col(i, part + '_share'), '{:.1f}')}%"
                    if col(i, part) else "n/a" for i in range(len(sides))], part, "time")
    lines += ["", "Inside the parts (ms per step):", "", head, sep]
    for name, label in zip(DETAIL, DETAIL_LABELS, strict=True):
        row(label, [spread(col(i, name), "{:.1f}") for i in range(len(sides))], name, "time")
    lines.append("")
    for label, rs in sides:
        notes = sorted({n for r in rs for n in r.get("notes", [])})
        errors = [r["error"] for r in rs if "error" in r]
        lines.append(f"- {label}: {len(rs) - len(errors)} of {len(rs)} runs measured"
                     + (f"; notes: {'; '.join(notes)}" if notes else ""))
        if errors:
            lines.append(f"  - failed: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    if two:
        lines.append("- current / baseline: the ratio within each pair of runs made back to back, median (min–max) "
                     "over the pairs; time below 1.00× is faster, tokens/s above 1.00× is faster.")
    return "\n".join(lines)


@contextlib.contextmanager
def worktree(commit: str) -> Any:
    """A detached `git worktree` of `commit` in a temporary folder, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="bench-train-"))
    path = parent / "tree"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def frozen_current(stack: contextlib.ExitStack) -> tuple[Path, str]:
    """The working tree as it is now, in a worktree of its own, so that edits made while the benchmark runs (other
    people share the checkout) do not land in some runs and not others. `git stash create` records HEAD plus the
    uncommitted changes of tracked files as a commit object without touching the tree, the index or the stash
    list; untracked files are not in it."""
    label = describe(REPO)
    snapshot = git("stash", "create") or git("rev-parse", "HEAD")
    return stack.enter_context(worktree(snapshot)), f"{label}, frozen as {snapshot[:7]}"


def baseline(stack: contextlib.ExitStack, rev: str) -> tuple[Path, str]:
    try:
        commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--baseline {rev}: not a git revision of {REPO}")
    return stack.enter_context(worktree(commit)), commit[:7]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} cpus, load average {load}"


def run_config(config: str, overrides: list[str], args: argparse.Namespace,
               sides: list[tuple[str, Path]]) -> dict[str, Any]:
    # the current side's config file (frozen with it), read by both sides: the same workload
    config_path = str((sides[0][1] / config).resolve()) if not Path(config).is_absolute() else config
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in sides}
    for i in range(args.runs):
        order = sides if i % 2 == 0 else sides[::-1]  # ABBA: neither side always runs first
        for label, root in order:
            result = spawn(root, config_path, overrides, args)
            runs[label].append(result)
            msg = result.get("error") or f"{result['tokens_per_s']:,.0f} tokens/s, {result['step_ms']:.0f} ms/step"
            print(f"  run {i + 1}/{args.runs} {label}: {msg}", file=sys.stderr, flush=True)
    first = next((r for rs in runs.values() for r in rs if "error" not in r), None)
    print(f"\n### {config} {' '.join(overrides)}\n")
    if first is not None:
        print(f"{first['params_m']:.2f}M params, {first['tokens_per_step']} tokens/step, device {first['device']}, "
              f"dtype {first['dtype']}, {first['threads']} thread(s), torch {first['torch']}; {args.runs} runs per "
              f"side of {args.steps} steps, the first {args.warmup} untimed; {machine()} (after the runs)\n")
    print(table([(label, runs[label]) for label, _ in sides]))
    return {"config": config, "overrides": overrides, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help="one config (default: configs/tiny.yaml, then configs/small.yaml with SMALL_REDUCED)")
    ap.add_argument("--runs", type=int, default=None, help="independent trainer runs per side (default: 5 for "
                    "tiny or --config, 3 for the reduced small)")
    ap.add_argument("--steps", type=int, default=None, help="train steps per run (default 20; 4 for reduced small)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each run (default 4; "
                    "1 for reduced small)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each run")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also measure this git revision, alternating")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every run's figures to PATH")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value), with --config")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.config is None and args.overrides:
        ap.error("overrides need --config")
    configs = PRESETS if args.config is None else [(args.config, args.overrides, (5, 20, 4))]
    plans = []
    for config, overrides, (runs, steps, warmup) in configs:
        given = {k: v for k, v in vars(args).items() if v is not None}
        plan = argparse.Namespace(**{**vars(args), "runs": runs, "steps": steps, "warmup": warmup, **given})
        if plan.warmup >= plan.steps:
            ap.error(f"--warmup ({plan.warmup}) must be below --steps ({plan.steps})")
        plans.append((config, overrides, plan))
    print(f"machine: {machine()} (before the runs); python {platform.python_version()}")
    print(f"command: python {' '.join([str(Path(sys.argv[0])), *sys.argv[1:]])}")
    with contextlib.ExitStack() as stack:
        if args.baseline:
            cur_root, cur_label = frozen_current(stack)
            base_root, base_label = baseline(stack, args.baseline)
            sides = [(f"current ({cur_label})", cur_root), (f"baseline ({base_label})", base_root)]
        else:
            sides = [(f"current ({describe(REPO)})", REPO)]
        results = [run_config(config, overrides, plan, sides) for config, overrides, plan in plans]
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    main()
