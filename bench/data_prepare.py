"""`data.prepare` throughput against a plain `datasets.map`, for the byte tokenizer and a 32k BPE. Prints markdown.

    python bench/data_prepare.py                               # both tokenizers, 2 reps, ~6 min on 2 idle cores
    python bench/data_prepare.py --tokenizers byte --reps 3 --whatif --profile      # ~3-4 min
    python bench/data_prepare.py --tokenizers bpe32k --reps 2                       # ~5 min

Corpus: the Python standard library's own ``.py`` files (``sysconfig.get_paths()['stdlib']`` without
site-packages, read like the built-in corpus: `data.builtin.stdlib_files` / `read_source`), written as one
jsonl file of ``{"text": ...}`` (1,790 documents, ~30 MiB of text, ~33 MB of jsonl; ``--replicate N`` writes
every document N times into that one file). MB below are 10^6 bytes of UTF-8 *text* (the ``bytes`` that
`prepare` reports), not of jsonl. Tokens include one EOS per document on both sides.

The 32k BPE is trained once with `data.tokenizer.train_bpe` on that jsonl and cached under the work directory
(its training time is printed; a run with --keep leaves it for the next run, which prints the cached time).

What is timed (time.perf_counter, median of --reps; the rows of one tokenizer run one after another in each
repetition, so slow periods hit all of them):

- ``prepare``: one call of `data.prepare.prepare(out, inputs=[jsonl], tokenizer=..., workers=N,
  unit_mb=--unit-mb, progress=False)` into an empty directory, end to end: planning, spawning the N worker
  processes (each loads the tokenizer), reading and JSON-parsing the jsonl, tokenizing, the validation split
  (1% by a hash of each document), writing the train/val shards with their sha256 and fsync, and the dataset
  manifest. ``--unit-mb`` (default 4) cuts the 30 MiB into 8 work units so that 2 workers have work to share
  (the default 256 MB would make a single unit). The output is deleted after each run (untimed).
- baseline ``datasets.map``: ``datasets.Dataset.from_json(jsonl, keep_in_memory=True, cache_dir=<fresh>)``
  ("load": datasets parses the jsonl into an Arrow file in an emptied builder cache, then reads it), then
  ``.map(fn, batched=True, batch_size=256, num_proc=N, keep_in_memory=True, remove_columns=["text"],
  features=uint16 ids)`` ("map"), then the token column flattened with pyarrow and written as one uint16 file
  with fsync ("write": the minimal equivalent of a shard's tokens.bin; no index, checksum or split). Rows: "map"
  alone (the number usually quoted) and "load+map+write" (what `prepare` does end to end). Caching is off
  (``datasets.disable_caching()``). ``fn`` uses the same tokenizer: for byte, `ByteTokenizer.encode_batch_arrays`
  (UTF-8 bytes) + EOS; for the BPE, ``tokenizers.Tokenizer.from_file(...).encode_batch(texts,
  add_special_tokens=False)`` and, as a second row, ``encode_batch_fast`` (no offsets: the call `prepare` makes)
  + EOS. num_proc=1 means datasets' in-process path (``num_proc=None``).

``TOKENIZERS_PARALLELISM=false`` is set for the whole script (also for BPE training), so a tokenizer uses one
thread and N processes means N cores. Before each part: an untimed warm-up (a 2 MB corpus through both
pipelines, the corpus file read once so it is page-cache warm). Two cores only, shared with whatever else
runs: before each part the script prints the load average and, if the 1-minute load is above 1.0, waits (up to
--max-wait seconds) and says so; before each timed case it also samples /proc/stat for one second and waits while
other processes keep more than 25% of the CPUs busy (the load average lags by a minute and counts this script's
own previous case), printing the busy share it started at.

``--profile``: cProfile of one inline `prepare` (workers=0, byte tokenizer), top functions by own time.
``--whatif``: the same inline `prepare` timed as is and with ``data.inputs._line_number`` (the line-number
lookup for error messages, run for every jsonl line) replaced by a constant, to size that cost; workers=0 because
spawned workers would re-import the unpatched module. Benchmarks never fail a test run; results go to
docs/bench_data.md with the machine and load they ran on. Temporary files live under --work (deleted unless
--keep).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before `tokenizers` is imported: one thread per process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from machine import cpu_model, profile_top  # noqa: E402  (bench/ is the script directory)

import data.inputs as dinputs  # noqa: E402
import data.prepare as dprep  # noqa: E402
from data.builtin import read_source, stdlib_files  # noqa: E402
from data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe  # noqa: E402

WORK = Path("/tmp/bench_data_work")
MB = 1e6


# ----------------------------------------------------------------------------------------------- shared helpers
def loadavg() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def wait_for_idle(part: str, max_wait: float, threshold: float = 1.0) -> None:
    """Print the load average before a part; wait (up to max_wait s) while the 1-minute load is above threshold."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"\n[{part}] load average (1/5/15 min) at start {loadavg()} ({stamp} UTC)", flush=True)
    if not hasattr(os, "getloadavg") or os.getloadavg()[0] <= threshold:
        return
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < max_wait:
        time.sleep(10)
    waited = time.monotonic() - t0
    state = "below" if os.getloadavg()[0] <= threshold else "still above"
    print(f"[{part}] 1-min load was > {threshold}: waited {waited:.0f} s, now {loadavg()} ({state} {threshold})",
          flush=True)


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (while this script sleeps: i.e. other processes), from /proc/stat."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(label: str, max_wait: float, threshold: float = 0.25) -> float:
    """Before one timed case: wait (up to max_wait s) until other processes use at most `threshold` of the CPUs
    (the load average lags by a minute and counts this script's own last case, so it cannot tell). Returns the
    busy share seen last; prints a line when it had to wait."""
    t0 = time.monotonic()
    busy = cpu_busy()
    while busy > threshold and time.monotonic() - t0 < max_wait:
        time.sleep(4)
        busy = cpu_busy()
    waited = time.monotonic() - t0
    if waited > 2:
        print(f"    ({label}: other processes kept {busy:.0%} of the CPUs busy; waited {waited:.0f} s"
              f"{'' if busy <= threshold else ', gave up waiting'})", flush=True)
    return busy


def end_of_part(part: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{part}] load average (1/5/15 min) at end {loadavg()} ({stamp} UTC)", flush=True)


def machine_line() -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    return (f"machine: {cpu_model()}, {os.cpu_count()} cpus, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def write_corpus(path: Path, replicate: int = 1, limit_bytes: int | None = None) -> tuple[int, int]:
    """The stdlib's .py files as one jsonl of {"text": ...}; returns (text bytes, documents)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        for _, p, _ in stdlib_files():
            text = read_source(p)
            line = json.dumps({"text": text}) + "\n"
            size = len(text.encode("utf-8", "surrogatepass"))
            for _ in range(replicate):
                f.write(line)
                nbytes += size
                docs += 1
            if limit_bytes is not None and nbytes >= limit_bytes:
                break
    return nbytes, docs


def read_through(path: Path) -> None:
    """Read a file once (untimed), so timed runs start page-cache warm."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def bpe_tokenizer(corpus: Path, vocab: int, cache: Path) -> tuple[str, float, bool]:
    """(tokenizer.json path, training seconds, loaded from cache?) of the BPE trained on `corpus`."""
    tok_file, meta = cache / "tokenizer.json", cache / "bench_train.json"
    ident = {"corpus_bytes": corpus.stat().st_size, "vocab": vocab}
    if tok_file.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("ident") == ident:
            return str(tok_file), float(info["seconds"]), True
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    train_bpe([str(corpus)], vocab, cache, show_progress=False)
    seconds = time.perf_counter() - t0
    meta.write_text(json.dumps({"ident": ident, "seconds": seconds}))
    return str(tok_file), seconds, False


# ----------------------------------------------------------------------------------------------- the two pipelines
def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (waited-for) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_prepare(corpus: Path, tok_spec: str, workers: int, unit_mb: float, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    manifest = dprep.prepare(out, inputs=[str(corpus)], tokenizer=tok_spec, workers=workers, unit_mb=unit_mb,
                             progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    shutil.rmtree(out, ignore_errors=True)
    run = manifest["run"]
    return {"seconds": wall, "cpu": cpu, "run_seconds": run["seconds"], "bytes": run["bytes"],
            "tokens": run["tokens"], "units": run["units"]}


def map_fn(kind: str, tok_spec: str, eos: int) -> Callable[[dict[str, list[str]]], dict[str, Any]]:
    """The batched map function of the baseline: the same tokenizer, one EOS appended per document."""
    if kind == "byte":
        tok = ByteTokenizer()

        def fn(batch: dict[str, list[str]]) -> dict[str, Any]:
            return {"ids": [np.append(a, np.uint16(eos)) for a in tok.encode_batch_arrays(batch["text"])]}
        return fn
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(tok_spec)
    encode = hf.encode_batch_fast if kind == "bpe-fast" else hf.encode_batch

    def fn(batch: dict[str, list[str]]) -> dict[str, Any]:
        return {"ids": [e.ids + [eos] for e in encode(batch["text"], add_special_tokens=False)]}
    return fn


def run_baseline(corpus: Path, kind: str, tok_spec: str, eos: int, nproc: int, out: Path) -> dict[str, float]:
    import datasets
    import pyarrow.compute as pc

    fn = map_fn(kind, tok_spec, eos)
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16"))})
    cache = out.parent / "hf_cache"  # a fresh builder cache: every "load" really parses the jsonl
    shutil.rmtree(cache, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    ds = datasets.Dataset.from_json(str(corpus), keep_in_memory=True, cache_dir=str(cache))
    c1, t1 = cpu_seconds(), time.perf_counter()
    mapped = ds.map(fn, batched=True, batch_size=256, num_proc=None if nproc == 1 else nproc, keep_in_memory=True,
                    remove_columns=["text"], features=features)
    c2, t2 = cpu_seconds(), time.perf_counter()
    flat = pc.list_flatten(mapped.data.column("ids")).to_numpy(zero_copy_only=False)
    with open(out, "wb") as f:
        f.write(np.ascontiguousarray(flat, dtype="<u2").data)
        f.flush()
        os.fsync(f.fileno())
    c3, t3 = cpu_seconds(), time.perf_counter()
    out.unlink()
    del ds, mapped
    shutil.rmtree(cache, ignore_errors=True)
    return {"load": t1 - t0, "map": t2 - t1, "write": t3 - t2, "seconds": t3 - t0, "map_cpu": c2 - c1,
            "cpu": c3 - c0, "tokens": int(flat.size)}


# ----------------------------------------------------------------------------------------------- part (a)
def bench_tokenizer(name: str, tok_spec: str, eos: int, corpus: Path, text_bytes: int, args: argparse.Namespace,
                    work: Path) -> list[tuple[Any, ...]]:
    """All rows of one tokenizer: prepare (workers 1, 2) and the baseline (num_proc 1, 2)."""
    kinds = ["byte"] if name == "byte" else ["bpe", "bpe-fast"]
    cases: list[tuple[str, str, int]] = [("prepare", "", w) for w in args.workers]
    cases += [("baseline", k, n) for k in kinds for n in args.workers]
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {c: [] for c in cases}
    for rep in range(args.reps):
        for case in cases:
            what, kind, n = case
            busy = wait_quiet(f"{name} {what} {kind} n={n}", args.max_wait)
            if what == "prepare":
                r = run_prepare(corpus, tok_spec, n, args.unit_mb, work / "prep_out")
            else:
                r = run_baseline(corpus, kind, tok_spec, eos, n, work / "baseline_tokens.bin")
            results[case].append(r)
            extra = f" (units {r['units']}, run seconds {r['run_seconds']:.2f})" if what == "prepare" else (
                f" (load {r['load']:.2f} + map {r['map']:.2f} + write {r['write']:.2f})")
            print(f"  rep {rep} {name} {what}{'/' + kind if kind else ''} n={n}: {r['seconds']:.2f} s, "
                  f"{r['tokens']:,} tokens{extra}; CPUs busy before: {busy:.0%}", flush=True)

    rows = []
    for case in cases:
        what, kind, n = case
        rs = results[case]
        row = {"tokenizer": name, "n": n, "tokens": rs[0]["tokens"], "bytes": text_bytes}
        if what == "prepare":
            rows.append({**row, "pipeline": "`prepare`", "timed": "end to end", "secs": [r["seconds"] for r in rs],
                         "cpu": [r["cpu"] for r in rs]})
            continue
        label = {"byte": "`datasets.map`", "bpe": "`datasets.map` (encode_batch)",
                 "bpe-fast": "`datasets.map` (encode_batch_fast)"}[kind]
        rows.append({**row, "pipeline": label, "timed": "map only", "secs": [r["map"] for r in rs],
                     "cpu": [r["map_cpu"] for r in rs]})
        rows.append({**row, "pipeline": label, "timed": "load+map+write", "secs": [r["seconds"] for r in rs],
                     "cpu": [r["cpu"] for r in rs]})
    return rows


def part_a(args: argparse.Namespace, work: Path) -> None:
    corpus = work / "corpus" / "stdlib.jsonl"
    text_bytes, docs = write_corpus(corpus, args.replicate)
    print(f"corpus {corpus}: {docs:,} documents, {text_bytes / MB:.1f} MB of text, "
          f"{corpus.stat().st_size / MB:.1f} MB of jsonl")
    small = work / "corpus" / "small.jsonl"
    write_corpus(small, 1, limit_bytes=2_000_000)

    tok_specs: dict[str, tuple[str, int]] = {"byte": ("byte", ByteTokenizer().eos_id)}
    if "bpe32k" in args.tokenizers:
        wait_for_idle("a: BPE training", args.max_wait)
        path, seconds, cached = bpe_tokenizer(corpus, args.vocab, work / f"bpe{args.vocab}")
        tok = load_tokenizer(path)
        print(f"BPE: {path}, vocab {tok.vocab_size}, trained with train_bpe in {seconds:.1f} s "
              f"(1 thread, TOKENIZERS_PARALLELISM=false){' [cached from an earlier run]' if cached else ''}")
        tok_specs["bpe32k"] = (path, tok.eos_id)
        end_of_part("a: BPE training")

    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    all_rows = []
    for name in args.tokenizers:
        spec, eos = tok_specs[name]
        # untimed warm-up: imports, worker start-up paths, page cache
        read_through(corpus)
        run_prepare(small, spec, max(args.workers), args.unit_mb, work / "prep_out")
        run_baseline(small, "byte" if name == "byte" else "bpe-fast", spec, eos, max(args.workers),
                     work / "baseline_tokens.bin")
        wait_for_idle(f"a: {name}", args.max_wait)
        all_rows += bench_tokenizer(name, spec, eos, corpus, text_bytes, args, work)
        end_of_part(f"a: {name}")

    print(f"\nmedian of {args.reps}; MB = 10^6 bytes of UTF-8 text; tokens include one EOS per document; "
          f"unit_mb {args.unit_mb}; TOKENIZERS_PARALLELISM=false\n")
    print("| tokenizer | pipeline | processes | timed | seconds | min..max | MB/s | tokens | tokens/s "
          "| tokens/s per process | CPU s | tokens per CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        sec, cpu, n, tokens = statistics.median(r["secs"]), statistics.median(r["cpu"]), r["n"], r["tokens"]
        print(f"| {r['tokenizer']} | {r['pipeline']} | {n} | {r['timed']} | {sec:.2f} | {min(r['secs']):.2f}.."
              f"{max(r['secs']):.2f} | {r['bytes'] / MB / sec:.1f} | {tokens:,} | {tokens / sec:,.0f} | "
              f"{tokens / sec / n:,.0f} | {cpu:.1f} | {tokens / cpu:,.0f} |")
    # prepare vs the faster end-to-end baseline at the same process count
    print("\n| tokenizer | processes | `prepare` s | fastest baseline load+map+write s "
          "| `prepare` time / baseline time |\n|---|---|---|---|---|")
    for name in args.tokenizers:
        for n in args.workers:
            mine = [r for r in all_rows if r["tokenizer"] == name and r["n"] == n]
            prep = next(statistics.median(r["secs"]) for r in mine if r["pipeline"] == "`prepare`")
            base = min((statistics.median(r["secs"]), r["pipeline"]) for r in mine if r["timed"] == "load+map+write")
            print(f"| {name} | {n} | {prep:.2f} | {base[0]:.2f} ({base[1]}) | {prep / base[0]:.1f}x |")

    if args.whatif or args.profile:
        wait_for_idle("a: diagnosis (inline prepare, byte)", args.max_wait)
        diagnose(corpus, args, work)
        end_of_part("a: diagnosis (inline prepare, byte)")


def diagnose(corpus: Path, args: argparse.Namespace, work: Path) -> None:
    out = work / "prep_out"
    if args.profile:
        r, body = profile_top(lambda: run_prepare(corpus, "byte", 0, args.unit_mb, out), 10)
        print(f"\ncProfile, inline prepare (workers=0), byte tokenizer, {r['seconds']:.2f} s under the profiler; "
              f"top 10 by own time:\n```\n{body}\n```")
    if args.whatif:
        original = dinputs._line_number
        times: dict[str, list[float]] = {"as is": [], "_line_number stubbed": []}
        for _ in range(args.reps):
            for label in times:
                wait_quiet(f"inline prepare, {label}", args.max_wait)
                dinputs._line_number = original if label == "as is" else (lambda path, offset: 0)
                try:
                    r = run_prepare(corpus, "byte", 0, args.unit_mb, out)
                finally:
                    dinputs._line_number = original
                times[label].append(r["seconds"])
                text_bytes = r["bytes"]
        print(f"\nwhat-if, inline prepare (workers=0), byte tokenizer, median of {args.reps}:\n")
        print("| data.prepare | seconds | MB/s |")
        print("|---|---|---|")
        for label, ts in times.items():
            sec = statistics.median(ts)
            print(f"| {label} | {sec:.2f} | {text_bytes / MB / sec:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", nargs="+", default=["byte", "bpe32k"], choices=["byte", "bpe32k"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare workers / datasets num_proc")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--replicate", type=int, default=1, help="copies of every document in the corpus file")
    ap.add_argument("--unit-mb", type=float, default=4.0, help="prepare's work-unit size (default 4)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--profile", action="store_true", help="cProfile one inline prepare (byte)")
    ap.add_argument("--whatif", action="store_true", help="time inline prepare with _line_number stubbed")
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for the load to drop")
    ap.add_argument("--work", default=str(WORK), help="temporary directory (default /tmp/bench_data_work)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (corpus, BPE) afterwards")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")  # nothing goes to ~/.cache/huggingface
    import datasets
    import tokenizers

    print(machine_line())
    print(f"numpy {np.__version__}, datasets {datasets.__version__}, tokenizers {tokenizers.__version__}, "
          f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
    try:
        part_a(args, work)
    finally:
        if not args.keep:  # only what this script made: data_loader.py may share the directory
            for name in ("corpus", f"bpe{args.vocab}", "prep_out", "baseline_tokens.bin", "hf_cache"):
                p = work / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                work.rmdir()  # if now empty


if __name__ == "__main__":
    main()
