"""Loader throughput against the raw read speed of the same files, and loader time inside a tiny training step.

    python bench/data_loader.py                        # parts b and c, ~3 min on 2 idle cores (+ ~40 s once
                                                       # to prepare the dataset, kept with --keep)
    python bench/data_loader.py --parts b --profile --cold
    python bench/data_loader.py --parts c --c-steps 30

(b) A byte-tokenized dataset made by `data.prepare.prepare` from --replicas copies of the Python standard library's
    .py files (one jsonl per copy, written by bench/data_prepare.py's `write_corpus`; 4 copies = ~125M train
    tokens in 2 train shards of ~125 MB of uint16; units of 64 MiB), under --work (reused if already complete).
    Physical limit: the train shards' tokens.bin read sequentially with ``readinto`` into one 16 MiB buffer
    (MB/s and tokens/s = bytes / 2), page-cache warm (one untimed pass first); and, as a second reference, the
    same files through their memory maps converted to int64 in 4M-token chunks (the least work that produces
    the loader's output dtype). With --cold, the raw read is repeated after ``posix_fadvise(POSIX_FADV_DONTNEED)``
    on each file (evicts this script's files from the guest page cache, no root needed; the host below the VM
    may still cache them, and dropping all caches needs root, so "cold" is an upper bound on cold speed).
    Loader: ``TokenBatchLoader(WindowDataset(train_paths, seq_len, seed=0), global_batch_size=--gbs,
    dp_rank=r, dp_world=W, prefetch=P)`` for seq_len 4096 and 1024, W 1 and 2, P 0 and 2; after 3 untimed
    batches, ``next(loader)`` is called for --seconds and tokens/s per rank = batches x (G/W) x seq_len / time
    (input tokens; each row read is seq_len + 1). "alone": rank 0 of W in this process (what one rank costs on
    an otherwise idle machine); "concurrent": W spawned processes, one per rank, released together by a barrier,
    each timing its own loop (aggregate = sum over ranks). torch threads per rank: max(1, cpus // W). Median
    of --reps; each repetition starts at another sample so it reads other windows. --profile: cProfile of
    prefetch-0 batches at each seq_len (top functions by own time) and a breakdown of one batch's parts.
(c) configs/tiny.yaml through `train.trainer.Trainer` (built-in corpus; cache: $CHOGORI_CACHE if set, else
    <work>/chogori-cache), one process. ``trainer.train_loader`` is wrapped so that every ``next()`` that
    `train_step()` makes is timed; step time is `train_step()`'s own ``step_time_s`` (it starts before that
    ``next()``). Blocks of --c-steps steps with data.prefetch 0 and 2 alternate --c-reps times, each trainer
    after --c-warmup untimed steps; reported: the share of step time spent in ``next()`` (sum over timed steps)
    and medians per step. Also ``batch_at`` timed synchronously: the loader work per step if nothing overlapped.

Timing: time.perf_counter. Before each part the load average is printed and, if the 1-minute load is above 1.0,
the script waits (up to --max-wait s); before each timed case it samples /proc/stat for a second and waits
while other processes keep more than 25% of the CPUs busy. Benchmarks never fail a test run; results go to
docs/bench_data.md. Temporary files live under --work (deleted unless --keep).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import glob
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from data_prepare import WORK, end_of_part, machine_line, wait_for_idle, wait_quiet, write_corpus  # noqa: E402
from machine import profile_top  # noqa: E402

from data.dataset import WindowDataset, open_source  # noqa: E402
from data.loader import TokenBatchLoader, _to_batch  # noqa: E402
from data.prepare import prepare  # noqa: E402

MB = 1e6
CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------- (b) dataset
def loader_dataset(work: Path, replicas: int) -> tuple[list[str], str]:
    """Train shard paths of the byte dataset (prepared on first use) and a line describing it."""
    out = work / f"loader_ds_x{replicas}"
    if not (out / "dataset.json").exists():
        corpus = work / "loader_corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        for k in range(replicas):
            write_corpus(corpus / f"stdlib-{k}.jsonl")
        t0 = time.perf_counter()
        # units of 64 MiB: two ~33 MB jsonl files per unit (one train shard each), units shared by the workers
        m = prepare(out, inputs=[str(corpus / "*.jsonl")], tokenizer="byte", workers=os.cpu_count() or 1,
                    unit_mb=64, progress=False)
        print(f"prepared {out} in {time.perf_counter() - t0:.1f} s ({m['run']['units']} units)", flush=True)
        shutil.rmtree(corpus, ignore_errors=True)
    train, _ = open_source(str(out))
    sizes = [os.path.getsize(Path(p) / "tokens.bin") for p in train]
    return train, (f"dataset {out}: byte tokenizer, {len(train)} train shards, {sum(sizes) / 2:,.0f} train tokens, "
                   f"{sum(sizes) / MB:.0f} MB of tokens.bin (uint16)")


# ----------------------------------------------------------------------------------------------- (b) raw read
def evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[str]) -> tuple[int, float]:
    """(bytes, seconds) of reading every file sequentially into one 16 MiB buffer."""
    buf = memoryview(bytearray(CHUNK))
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


def memmap_int64(paths: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of converting every file's memory map to int64, 4M tokens at a time."""
    out = np.empty(1 << 22, dtype=np.int64)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        tokens = np.memmap(p, dtype="<u2", mode="r")
        for i in range(0, tokens.size, out.size):
            piece = tokens[i : i + out.size]
            np.copyto(out[: piece.size], piece)
            total += piece.size
        del tokens
    return total, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- (b) loader
def loader_rate(paths: list[str], seq: int, gbs: int, rank: int, world: int, prefetch: int, seconds: float,
                start: int, barrier: Any = None) -> tuple[int, float, int]:
    """(input tokens, seconds, batches) of rank `rank`'s loader run for about `seconds` after 3 untimed batches."""
    ds = WindowDataset(paths, seq, seed=0)
    loader = TokenBatchLoader(ds, gbs, dp_rank=rank, dp_world=world, start_sample=start, prefetch=prefetch)
    try:
        for _ in range(3):
            next(loader)
        if barrier is not None:
            barrier.wait()
        n = 0
        t0 = time.perf_counter()
        while True:
            x, _ = next(loader)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        return n * x.numel(), dt, n
    finally:
        loader.close()


def _rank_main(paths: list[str], seq: int, gbs: int, rank: int, world: int, prefetch: int, seconds: float,
               start: int, barrier: Any, results: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    results.put((rank, *loader_rate(paths, seq, gbs, rank, world, prefetch, seconds, start, barrier)))


def concurrent_rates(paths: list[str], seq: int, gbs: int, world: int, prefetch: int, seconds: float,
                     start: int) -> list[float]:
    """tokens/s of each of `world` rank processes running at the same time."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(paths, seq, gbs, r, world, prefetch, seconds, start, barrier,
                                                  results)) for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return [tok / sec for _, tok, sec, _ in sorted(got)]


def profile_loader(paths: list[str], seqs: list[int], gbs: int, batches: int) -> None:
    for seq in seqs:
        ds = WindowDataset(paths, seq, seed=0)
        loader = TokenBatchLoader(ds, gbs, prefetch=0)
        next(loader)
        _, body = profile_top(lambda ld=loader: [next(ld) for _ in range(batches)], 8)
        print(f"\ncProfile: {batches} batches, seq_len {seq}, global batch {gbs}, world 1, prefetch 0; "
              f"top 8 by own time:\n```\n{body}\n```")
        # breakdown of one batch: sample -> window ids, the per-window copies, the int64 -> inputs/targets split
        parts: dict[str, list[float]] = {"windows_of (permutation)": [], "per-window loop (window())": [],
                                         "_to_batch (2 contiguous copies)": []}
        start = 10 * gbs
        for b in range(max(20, batches // 5)):
            g = np.arange(start + b * gbs, start + (b + 1) * gbs, dtype=np.uint64)
            t0 = time.perf_counter()
            ws = ds.windows_of(g).tolist()
            t1 = time.perf_counter()
            rows = np.empty((gbs, seq + 1), dtype=np.int64)
            for r, w in enumerate(ws):
                rows[r] = ds.window(w)
            t2 = time.perf_counter()
            _to_batch(rows)
            t3 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[k].append(v)
        # what-ifs (not what the loader does): the permutation of 64 batches in one call, per batch; and the
        # per-window loop copying the shard dtype (uint16) instead of converting every row to int64
        whatif: dict[str, list[float]] = {"what-if: windows_of for 64 batches in one call, per batch": [],
                                          "what-if: per-window loop into a uint16 array": []}
        for b in range(max(20, batches // 5)):
            g = np.arange(start + 64 * b * gbs, start + 64 * (b + 1) * gbs, dtype=np.uint64)
            t0 = time.perf_counter()
            ws = ds.windows_of(g).tolist()[:gbs]
            t1 = time.perf_counter()
            rows16 = np.empty((gbs, seq + 1), dtype=ds._shards[0].tokens.dtype)
            for r, w in enumerate(ws):
                rows16[r] = _window_raw(ds, w)
            t2 = time.perf_counter()
            whatif["what-if: windows_of for 64 batches in one call, per batch"].append((t1 - t0) / 64)
            whatif["what-if: per-window loop into a uint16 array"].append(t2 - t1)
        total = sum(statistics.median(v) for v in parts.values())
        print(f"\none batch (seq_len {seq}, {gbs} rows), median of {len(parts['_to_batch (2 contiguous copies)'])}:"
              f"\n\n| part | ms | share of the batch |\n|---|---|---|")
        for k, v in parts.items():
            m = statistics.median(v)
            print(f"| {k} | {1e3 * m:.3f} | {m / total:.0%} |")
        for k, v in whatif.items():
            print(f"| {k} | {1e3 * statistics.median(v):.3f} | - |")


def _window_raw(ds: WindowDataset, w: int) -> np.ndarray:
    """WindowDataset.window in the shard's own dtype (a what-if for the profile; same bisect and slicing)."""
    n, start = ds.seq_len + 1, w * ds.seq_len
    k = bisect.bisect_right(ds._starts, start) - 1
    parts, filled = [], 0
    while filled < n:
        shard = ds._shards[k]
        lo = start + filled - ds._starts[k]
        take = min(n - filled, shard.num_tokens - lo)
        parts.append(shard.tokens[lo : lo + take])
        filled += take
        k += 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def part_b(args: argparse.Namespace, work: Path) -> None:
    paths, desc = loader_dataset(work, args.replicas)
    print(desc)
    files = [str(Path(p) / "tokens.bin") for p in paths]
    raw_read(files)  # untimed: warm the page cache
    wait_for_idle("b: raw read", args.max_wait)
    warm = []
    conv = []
    for _ in range(args.reps):
        wait_quiet("raw read", args.max_wait)
        warm.append(raw_read(files))
        conv.append(memmap_int64(files))
    nbytes = warm[0][0]
    warm_s = statistics.median(s for _, s in warm)
    conv_s = statistics.median(s for _, s in conv)
    raw_tps = nbytes / 2 / warm_s
    refs = [("raw sequential read, page-cache warm (readinto 16 MiB)", nbytes / MB / warm_s, raw_tps),
            ("memory map -> int64, sequential, warm (4M-token chunks)", conv[0][0] * 2 / MB / conv_s,
             conv[0][0] / conv_s)]
    if args.cold:
        cold = []
        for _ in range(args.reps):
            evict(files)
            wait_quiet("cold raw read", args.max_wait)
            cold.append(raw_read(files))
        cold_s = statistics.median(s for _, s in cold)
        refs.append(("raw sequential read after POSIX_FADV_DONTNEED", nbytes / MB / cold_s, nbytes / 2 / cold_s))
        raw_read(files)  # warm again for the loader
    end_of_part("b: raw read")
    print(f"\nmedian of {args.reps}; {nbytes / MB:.0f} MB read per pass\n")
    print("| reference | MB/s | tokens/s |\n|---|---|---|")
    for label, mbs, tps in refs:
        print(f"| {label} | {mbs:,.0f} | {tps:,.0f} |")

    wait_for_idle("b: loader", args.max_wait)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for seq in args.seq_lens:
        for world in args.worlds:
            for prefetch in args.prefetch:
                modes = ["alone"] if world == 1 else ["alone", "concurrent"]
                for mode in modes:
                    per_rank: list[float] = []
                    aggregate: list[float] = []
                    for rep in range(args.reps):
                        start = (rep + 1) * 7919 * args.gbs  # other windows each repetition
                        wait_quiet(f"loader seq {seq} W {world} P {prefetch} {mode}", args.max_wait)
                        if mode == "alone":
                            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
                            tok, sec, _ = loader_rate(paths, seq, args.gbs, 0, world, prefetch, args.seconds, start)
                            rates = [tok / sec]
                        else:
                            rates = concurrent_rates(paths, seq, args.gbs, world, prefetch, args.seconds, start)
                        per_rank.append(statistics.mean(rates))
                        aggregate.append(sum(rates))
                        print(f"  seq {seq} W {world} prefetch {prefetch} {mode} rep {rep}: "
                              + ", ".join(f"{r:,.0f}" for r in rates) + " tokens/s per rank", flush=True)
                    rows.append((seq, world, prefetch, mode, statistics.median(per_rank),
                                 statistics.median(aggregate), min(per_rank), max(per_rank)))
    torch.set_num_threads(os.cpu_count() or 1)
    end_of_part("b: loader")
    print(f"\nglobal batch {args.gbs}, {args.seconds:g} s per measurement, median of {args.reps}; ratio = loader "
          f"tokens/s / raw warm read tokens/s ({raw_tps:,.0f})\n")
    print("| seq_len | dp_world | prefetch | ranks run | tokens/s per rank (M) | min..max (M) | aggregate tokens/s (M) "
          "| aggregate / raw read |\n|---|---|---|---|---|---|---|---|")
    for seq, world, prefetch, mode, pr, agg, lo, hi in rows:
        ranks = "1 (rank 0 alone)" if mode == "alone" else f"{world} processes"
        agg_s = f"{agg / 1e6:,.1f}" if mode != "alone" or world == 1 else "-"
        ratio = f"{agg / raw_tps:.3f}" if mode != "alone" or world == 1 else f"({pr / raw_tps:.3f} per rank)"
        print(f"| {seq} | {world} | {prefetch} | {ranks} | {pr / 1e6:,.1f} | {lo / 1e6:,.1f}..{hi / 1e6:,.1f} | "
              f"{agg_s} | {ratio} |")

    if args.profile:
        wait_for_idle("b: profile", args.max_wait)
        profile_loader(paths, args.seq_lens, args.gbs, args.profile_batches)
        end_of_part("b: profile")


# ----------------------------------------------------------------------------------------------- (c)
class TimedLoader:
    """Wraps the trainer's loader: times every next() the trainer makes; everything else is delegated."""

    def __init__(self, inner: TokenBatchLoader) -> None:
        self.inner = inner
        self.waits: list[float] = []

    def __iter__(self) -> TimedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        batch = next(self.inner)
        self.waits.append(time.perf_counter() - t0)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def part_c(args: argparse.Namespace, work: Path) -> None:
    from train.config import load_config
    from train.trainer import Trainer

    cache = os.environ.get("CHOGORI_CACHE") or str(work / "chogori-cache")
    total_steps = args.c_warmup + args.c_reps * args.c_steps + 5
    trainers: dict[int, Trainer] = {}
    for prefetch in (0, 2):
        cfg = load_config(args.config, [f"train.out_dir={work / f'trainer_p{prefetch}'}", f"train.steps={total_steps}",
                                        "train.eval_interval=0", "checkpoint.save_final=false",
                                        "logging.progress=false", f"data.cache_dir={cache}",
                                        f"data.prefetch={prefetch}", *args.c_overrides])
        trainer = Trainer(cfg)
        trainer.train_loader = TimedLoader(trainer.train_loader)
        for _ in range(args.c_warmup):
            trainer.train_step()
        trainer.train_loader.waits.clear()
        trainers[prefetch] = trainer
    t = trainers[0]
    print(f"config {args.config} {' '.join(args.c_overrides)}: {t.model.num_params() / 1e6:.2f}M params, "
          f"{t.cfg.train.global_batch_size} x {t.cfg.data.seq_len} tokens/step, torch threads "
          f"{torch.get_num_threads()}, corpus cache {cache}")

    wait_for_idle("c: tiny training steps", args.max_wait)
    steps: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.c_reps):
        for prefetch, trainer in trainers.items():
            wait_quiet(f"tiny steps prefetch {prefetch}", args.max_wait)
            for _ in range(args.c_steps):
                steps[prefetch].append(trainer.train_step()["step_time_s"])
    # the loader's work per step when nothing overlaps it: batch_at, synchronously, on the same loader
    sync: list[float] = []
    inner = trainers[0].train_loader.inner
    for k in range(args.c_reps * args.c_steps):
        t0 = time.perf_counter()
        inner.batch_at(k * inner.global_batch_size)
        sync.append(time.perf_counter() - t0)
    end_of_part("c: tiny training steps")

    print(f"\n{args.c_reps} x {args.c_steps} timed steps per prefetch setting after {args.c_warmup} warm-up steps; "
          f"batch_at synchronously: median {1e6 * statistics.median(sync):.0f} us per step\n")
    print("| data.prefetch | step median (ms) | next() median (us) | next() p90 (us) | share of step time in next() |"
          "\n|---|---|---|---|---|")
    for prefetch, trainer in trainers.items():
        waits, st = trainer.train_loader.waits, steps[prefetch]
        q = statistics.quantiles(waits, n=10)
        print(f"| {prefetch} | {1e3 * statistics.median(st):.1f} | {1e6 * statistics.median(waits):.0f} | "
              f"{1e6 * q[-1]:.0f} | {sum(waits) / sum(st):.3%} |")
    for trainer in trainers.values():
        trainer.train_loader.inner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["b", "c"], choices=["b", "c"])
    ap.add_argument("--replicas", type=int, default=4, help="copies of the stdlib corpus in the (b) dataset")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--gbs", type=int, default=32, help="global batch size (samples) for (b)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one loader measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also read after evicting the files from the page cache")
    ap.add_argument("--profile", action="store_true", help="cProfile the loader and break one batch down")
    ap.add_argument("--profile-batches", type=int, default=100)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--c-steps", type=int, default=30)
    ap.add_argument("--c-reps", type=int, default=2)
    ap.add_argument("--c-warmup", type=int, default=5)
    ap.add_argument("--c-overrides", nargs="*", default=[], help="extra config overrides for (c)")
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for the load to drop")
    ap.add_argument("--work", default=str(WORK), help="temporary directory (default /tmp/bench_data_work)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared dataset and corpus cache afterwards")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    try:
        if "b" in args.parts:
            part_b(args, work)
        if "c" in args.parts:
            part_c(args, work)
    finally:
        if not args.keep:  # only what this script made: data_prepare.py may share the directory
            made = [*glob.glob(str(work / "loader_ds_x*")), str(work / "loader_corpus"), str(work / "chogori-cache"),
                    str(work / "trainer_p0"), str(work / "trainer_p2")]
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(OSError):
                work.rmdir()


if __name__ == "__main__":
    main()
