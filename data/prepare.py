"""`python -m data.prepare`: tokenize raw text into a directory of shards, in parallel and resumably.

Input is either local files by glob (``.txt`` and any other text file: one document per file; ``.jsonl`` /
``.json``: one JSON object per line with a text field; ``.parquet`` and ``.arrow``: one row per document;
``.gz`` for compressed text/jsonl), directories (a ``save_to_disk`` dataset, whose split ``--hf-split``
chooses, or any directory of Arrow / Parquet files), or a Hugging Face `datasets` dataset, streamed. Output::

    OUT/prepare.json      the plan: settings and work units (written first; a rerun must match it)
    OUT/tokenizer.json    a copy of the tokenizer (absent for the built-in byte tokenizer)
    OUT/train/part-NNNNNNNN/, OUT/val/part-NNNNNNNN/   one shard per work unit and split (data/shards.py)
    OUT/dataset.json      written last: totals, dtype, tokenizer fingerprint and every shard's checksums

**Work units.** Inputs are cut into units of about ``--unit-mb`` of raw text: large jsonl files by byte
range (a line belongs to the range holding its first byte), parquet files by row groups, Arrow files by
record batches (read from memory maps, never whole), whole small files
packed together; a streamed dataset by ``--docs-per-unit`` documents. Each unit becomes one train and one
val shard, written by a worker process. Which document goes to validation is decided by a hash of its text
(so duplicates land on the same side), never by position or worker.

**Resuming.** Shards appear atomically, so after an interruption the same command finds the finished ones,
skips them and writes only what is missing: nothing is rewritten or duplicated. A rerun with different
settings or changed input files is refused (naming what changed) instead of mixing two datasets.
`dataset.json` exists only when every unit is done; the loader refuses a directory without it.

Empty documents are not written (they would be a lone EOS); they are counted and reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from data.hf_disk import is_save_to_disk
from data.inputs import PrepareError, _file_identity, _text_field, expand_inputs, plan_units, read_documents
from data.shards import MANIFEST_FILE, ShardError, ShardWriter, fsync_dir, is_shard, token_dtype
from data.tokenizer import Tokenizer, load_tokenizer

PLAN_FILE = "prepare.json"
DATASET_FILE = "dataset.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
PLAN_VERSION = 1
_BATCH_DOCS = 256  # documents per tokenizer call: amortises the call, bounds the memory of one batch


def is_validation(text: str, val_fraction: float) -> bool:
    """The split of a document: a stable hash of its text, so the same text always lands on the same side."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h % 1_000_000 < round(val_fraction * 1_000_000)


# ----------------------------------------------------------------------------------------------- workers

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_spec: str, progress: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _worker["tokenizer"] = load_tokenizer(tokenizer_spec)
    _worker["progress"] = progress


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(islice(it, _BATCH_DOCS)):
        yield batch


def shard_name(unit_id: int) -> str:
    return f"part-{unit_id:08d}"


def process_unit(job: tuple[dict[str, Any], list[str] | None, str, dict[str, Any]]) -> dict[str, Any]:
    """Tokenize one unit into its train and val shards (only those not already finished)."""
    unit, texts, out, settings = job
    tok: Tokenizer = _worker["tokenizer"]
    progress = _worker.get("progress")
    name = shard_name(unit["id"])
    t0 = time.perf_counter()
    stats = {"id": unit["id"], "bytes": 0, "tokens": 0, "docs": 0, "empty_docs": 0}
    meta = {"unit": unit["id"], "plan": settings["plan_hash"]}
    with contextlib.ExitStack() as stack:
        writers: dict[str, ShardWriter | None] = {}
        for split in SPLITS:
            dest = Path(out) / split / name
            writers[split] = None if is_shard(dest) else stack.enter_context(
                ShardWriter(dest, tok.fingerprint, tok.vocab_size, tok.eos_id, {**meta, "split": split}))
        docs: Iterable[str] = texts if texts is not None else (
            d for piece in unit["pieces"] for d in read_documents(piece, settings["text_field"]))
        for batch in _batches(docs):
            arrays = tok.encode_batch_arrays(batch)
            nbytes = ntok = 0
            for text, ids in zip(batch, arrays, strict=True):
                nbytes += len(text.encode("utf-8", "surrogatepass"))
                if ids.size == 0:
                    stats["empty_docs"] += 1
                    continue
                writer = writers["val" if is_validation(text, settings["val_fraction"]) else "train"]
                if writer is not None:
                    writer.add(ids)
                ntok += int(ids.size) + 1
                stats["docs"] += 1
            stats["bytes"] += nbytes
            stats["tokens"] += ntok
            if progress is not None:
                progress.put((nbytes, ntok))
        for writer in writers.values():
            if writer is not None:
                writer.commit()
    stats["seconds"] = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------------- driver


def _plan_hash(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write the plan on a first run; on a rerun insist it is the same (naming the first difference)."""
    path = out / PLAN_FILE
    if not path.exists():
        _write_json_atomic(path, plan)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepareError(f"{path}: unreadable plan of an earlier run ({type(e).__name__}); use a new --out") \
            from None
    for key in sorted(set(old) | set(plan)):
        if old.get(key) != plan.get(key):
            if key == "files":
                before = {p[0]: p for p in old.get("files", [])}
                for now in plan["files"]:
                    if before.get(now[0]) != now:
                        raise PrepareError(f"{now[0]}: input changed since the earlier run into {out} "
                                           f"(size/mtime differ or the file is new); use a new --out")
                raise PrepareError(f"inputs differ from the earlier run into {out} (files were removed); "
                                   f"use a new --out")
            raise PrepareError(f"'{key}' is {plan.get(key)!r} but the earlier run into {out} used "
                               f"{old.get(key)!r}; rerun with the same settings to resume, or use a new --out")


def _remove_stale_temps(out: Path) -> None:
    for split in SPLITS:
        for stale in (out / split).glob(".part-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _unit_done(out: Path, unit_id: int) -> bool:
    return all(is_shard(out / split / shard_name(unit_id)) for split in SPLITS)


def write_dataset_manifest(out: Path, num_units: int) -> dict[str, Any]:
    """Aggregate the shards' manifests into `dataset.json`, the marker of a complete dataset."""
    splits: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    for split in SPLITS:
        shards, tokens, docs = [], 0, 0
        for u in range(num_units):
            mpath = out / split / shard_name(u) / MANIFEST_FILE
            m = json.loads(mpath.read_text(encoding="utf-8"))
            first = first or m
            if (m["tokenizer_fingerprint"], m["dtype"]) != (first["tokenizer_fingerprint"], first["dtype"]):
                raise ShardError(mpath, "tokenizer or dtype differs from the other shards of this dataset")
            shards.append({"name": f"{split}/{shard_name(u)}", "num_tokens": m["num_tokens"],
                           "num_docs": m["num_docs"], "tokens_sha256": m["tokens_sha256"],
                           "docs_sha256": m["docs_sha256"]})
            tokens += m["num_tokens"]
            docs += m["num_docs"]
        splits[split] = {"num_tokens": tokens, "num_docs": docs, "shards": shards}
    assert first is not None
    manifest = {
        "format": "chogori-dataset", "version": 1, "tokenizer_fingerprint": first["tokenizer_fingerprint"],
        "vocab_size": first["vocab_size"], "eos_id": first["eos_id"], "dtype": first["dtype"],
        "splits": splits,
    }
    _write_json_atomic(out / DATASET_FILE, manifest)
    return manifest


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One `prepare` per output directory at a time (a second one fails fast instead of racing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks: rely on the atomic shard renames alone
        yield
        return
    with open(out / ".prepare.lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"{out}: another `python -m data.prepare` is writing here") from None
        yield


def prepare(
    out: str | os.PathLike[str],
    inputs: list[str] | None = None,
    hf_dataset: dict[str, Any] | None = None,
    tokenizer: str = "byte",
    text_field: str = "text",
    val_fraction: float = 0.01,
    workers: int | None = None,
    unit_mb: float = 256.0,
    docs_per_unit: int = 100_000,
    progress: bool = True,
    split: str = "train",
) -> dict[str, Any]:
    """Build (or finish) the dataset at `out`; returns the dataset manifest. See the module doc.

    `split` chooses the split of a `save_to_disk` DatasetDict or a split-named Arrow/Parquet directory input.
    """
    from tqdm import tqdm

    hf_path = str((hf_dataset or {}).get("path") or "")
    if hf_path and inputs is None and not (hf_dataset or {}).get("data_files") and is_save_to_disk(hf_path):
        # `datasets.load_dataset` cannot open what `save_to_disk` wrote; read its Arrow files as local inputs
        # instead (split by record batches over the workers, like any Arrow directory).
        inputs, split, hf_dataset = [hf_path], (hf_dataset or {}).get("split") or split, None
    if (inputs is None) == (hf_dataset is None):
        raise PrepareError("give either --input globs or --hf-dataset, not both or neither")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if unit_mb <= 0 or docs_per_unit < 1:
        raise PrepareError("--unit-mb and --docs-per-unit must be positive")
    out = Path(out).expanduser().resolve()
    tok = load_tokenizer(tokenizer)
    token_dtype(tok.vocab_size)  # fails early for a vocabulary that does not fit uint32
    workers = (os.cpu_count() or 1) if workers is None else workers
    plan: dict[str, Any] = {"version": PLAN_VERSION, "tokenizer": tok.fingerprint, "text_field": text_field,
                            "val_fraction": val_fraction}
    units: list[dict[str, Any]] | None = None
    if inputs is not None:
        files = expand_inputs(inputs, split)
        units = plan_units(files, int(unit_mb * 2**20))
        plan.update(files=_file_identity(files), units=units)
    else:
        plan.update(hf_dataset=hf_dataset, docs_per_unit=docs_per_unit)
    settings = {"text_field": text_field, "val_fraction": val_fraction, "plan_hash": _plan_hash(plan)}

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _check_plan(out, plan)
        if (out / DATASET_FILE).exists():
            if progress:
                print(f"{out}: already complete ({DATASET_FILE} exists); nothing to do", file=sys.stderr)
            try:
                return json.loads((out / DATASET_FILE).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise PrepareError(f"{out / DATASET_FILE}: unreadable ({type(e).__name__})") from None
        tok_spec = tokenizer
        if getattr(tok, "path", None) is not None:
            dest = out / TOKENIZER_FILE
            if not dest.exists():
                tmp = out / f".{TOKENIZER_FILE}.tmp"
                tok.save(tmp)
                os.replace(tmp, dest)
            tok_spec = str(dest)
        _remove_stale_temps(out)
        for split in SPLITS:
            (out / split).mkdir(exist_ok=True)

        if units is not None:
            todo = [u for u in units if not _unit_done(out, u["id"])]
            jobs: Iterator[tuple[Any, ...]] = ((u, None, str(out), settings) for u in todo)
            total_bytes = sum(u["bytes"] for u in todo)
            skipped = len(units) - len(todo)
        else:
            jobs, total_bytes, skipped = _hf_jobs(out, hf_dataset or {}, text_field, docs_per_unit, settings), None, 0
        started = time.perf_counter()
        totals = {"bytes": 0, "tokens": 0, "docs": 0, "empty_docs": 0, "units": 0}
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, smoothing=0.1,
                   desc=f"prepare -> {out.name}" + (f" (resuming: {skipped} units done)" if skipped else ""))
        max_id = -1
        with bar:
            for stats in _run_jobs(jobs, tok_spec, workers, bar, started):
                for k in ("bytes", "tokens", "docs", "empty_docs"):
                    totals[k] += stats[k]
                totals["units"] += 1
                max_id = max(max_id, stats["id"])
        num_units = len(units) if units is not None else _hf_units_total(out, max_id)
        if num_units == 0:
            raise PrepareError("the input holds no documents")
        manifest = write_dataset_manifest(out, num_units)
        seconds = time.perf_counter() - started
        if manifest["splits"]["train"]["num_tokens"] + manifest["splits"]["val"]["num_tokens"] == 0:
            raise PrepareError("the input holds no non-empty documents")
        if progress:
            tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
            print(f"{out}: {tr['num_tokens']:,} train tokens ({tr['num_docs']:,} docs), {va['num_tokens']:,} val "
                  f"tokens ({va['num_docs']:,} docs), dtype {manifest['dtype']}; this run: {totals['units']} "
                  f"units, {totals['bytes'] / 2**20:.1f} MiB in {seconds:.1f} s "
                  f"({totals['bytes'] / 2**20 / max(seconds, 1e-9):.1f} MiB/s, "
                  f"{totals['tokens'] / max(seconds, 1e-9):,.0f} tokens/s), "
                  f"{totals['empty_docs']} empty documents not written", file=sys.stderr)
        manifest["run"] = {**totals, "seconds": seconds, "skipped_units": skipped, "workers": workers}
        return manifest


def _hf_jobs(
    out: Path, spec: dict[str, Any], text_field: str, docs_per_unit: int, settings: dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    """Units of a streamed `datasets` dataset, read in stream order by this process; finished ones are
    skipped (their documents are still streamed past, as a stream cannot seek)."""
    import datasets

    kwargs = {k: v for k, v in spec.items() if v is not None}
    name = kwargs.pop("path")
    try:
        stream = datasets.load_dataset(name, streaming=True, **kwargs)
    except Exception as e:  # datasets raises many types (missing dataset, no network, bad config)
        raise PrepareError(f"--hf-dataset {name!r}: cannot open ({type(e).__name__}: {e})") from e
    texts = (_text_field(row, text_field, f"--hf-dataset {name!r} row {i}") for i, row in enumerate(stream))
    for unit_id in range(sys.maxsize):
        chunk = list(islice(texts, docs_per_unit))
        if not chunk:
            _write_json_atomic(out / ".hf_units.json", {"units": unit_id})
            return
        if not _unit_done(out, unit_id):
            yield ({"id": unit_id, "pieces": [], "bytes": 0}, chunk, str(out), settings)


def _hf_units_total(out: Path, max_id: int) -> int:
    path = out / ".hf_units.json"
    return int(json.loads(path.read_text())["units"]) if path.exists() else max_id + 1


def _run_jobs(
    jobs: Iterator[tuple[Any, ...]], tok_spec: str, workers: int, bar: Any, started: float
) -> Iterator[dict[str, Any]]:
    """Run jobs on `workers` processes (0: in this process), feeding the progress bar as they go."""

    def show(nbytes: int, ntok: int) -> None:
        bar.update(nbytes)
        bar.tokens = getattr(bar, "tokens", 0) + ntok
        bar.set_postfix_str(f"{bar.tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False)

    if workers == 0:
        progress: queue.Queue[tuple[int, int]] = queue.Queue()
        _init_worker(tok_spec, progress)
        for job in jobs:
            stats = process_unit(job)
            while not progress.empty():
                show(*progress.get_nowait())
            yield stats
        return
    ctx = mp.get_context("spawn")  # no fork: the tokenizers library and threads do not survive it
    updates = ctx.Queue()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(tok_spec, updates)) as pool:
        pending: set[cf.Future[dict[str, Any]]] = set()
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:  # bounded: a stream may be endless
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                else:
                    pending.add(pool.submit(process_unit, job))
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            with contextlib.suppress(queue.Empty):
                while True:
                    show(*updates.get_nowait())
            for fut in done:
                yield fut.result()  # a worker's PrepareError surfaces here; finished shards stay finished
        with contextlib.suppress(queue.Empty):
            while True:
                show(*updates.get(timeout=0.05))


def verify(out: str | os.PathLike[str], progress: bool = True) -> dict[str, Any]:
    """Re-hash every shard of a finished dataset against its manifest and `dataset.json` (reads everything).

    Opening a dataset for training checks only sizes (it must start in a second at any scale); run this
    after copying a dataset or when a storage fault is suspected. Raises `ShardError` naming the bad file.
    """
    from tqdm import tqdm

    from data.shards import open_shard

    root = Path(out)
    path = root / DATASET_FILE
    if not path.exists():
        raise ShardError(path, "missing: the dataset is unfinished (rerun prepare) or this is not a dataset")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    entries = [sh for split in SPLITS for sh in manifest["splits"][split]["shards"]]
    itemsize = token_dtype(manifest["vocab_size"]).itemsize
    with tqdm(total=sum(sh["num_tokens"] * itemsize for sh in entries), unit="B", unit_scale=True,
              disable=not progress, desc=f"verify {root.name}") as bar:
        for sh in entries:
            shard = open_shard(root / sh["name"], expected_fingerprint=manifest["tokenizer_fingerprint"],
                               verify_checksum=True)
            for key in ("num_tokens", "num_docs", "tokens_sha256", "docs_sha256"):
                if shard.manifest[key] != sh[key]:
                    raise ShardError(root / sh["name"] / MANIFEST_FILE, f"{key} differs from {path}")
            bar.update(sh["num_tokens"] * itemsize)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
        epilog="Rerun the same command after an interruption to finish the missing shards.")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--input", action="append", metavar="GLOB",
                     help="local files: txt (one document per file), jsonl, parquet, arrow, .gz; or a directory: "
                     "a save_to_disk dataset, or Arrow/Parquet files; repeatable")
    src.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face datasets name or builder (json, parquet, "
                     "text), streamed; a save_to_disk directory is read as --input DIR")
    src.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    src.add_argument("--hf-split", default="train", help="the split to read (default train); also "
                     "the split of a save_to_disk DatasetDict or split-named files in an --input directory")
    src.add_argument("--hf-data-files", action="append", default=None, metavar="GLOB",
                     help="data_files for builders like json/parquet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default byte)")
    p.add_argument("--text-field", default="text", help="the text field of jsonl/parquet/datasets rows")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count; 0 = inline)")
    p.add_argument("--unit-mb", type=float, default=256.0, help="raw text per work unit / shard (default 256)")
    p.add_argument("--docs-per-unit", type=int, default=100_000, help="documents per unit for --hf-dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--verify", action="store_true", help="re-hash every shard of the finished dataset at --out")
    a = p.parse_args(argv)
    if a.verify:
        try:
            m = verify(a.out, progress=not a.quiet)
        except (ShardError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        n = sum(len(m["splits"][s]["shards"]) for s in SPLITS)
        print(f"{a.out}: all {n} shards match their checksums", file=sys.stderr)
        return 0
    hf = None
    if a.hf_dataset:
        hf = {"path": a.hf_dataset, "name": a.hf_config, "split": a.hf_split, "data_files": a.hf_data_files}
    try:
        prepare(a.out, inputs=a.input, hf_dataset=hf, tokenizer=a.tokenizer, text_field=a.text_field,
                val_fraction=a.val_fraction, workers=a.workers, unit_mb=a.unit_mb, docs_per_unit=a.docs_per_unit,
                progress=not a.quiet, split=a.hf_split)
    except (PrepareError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["PrepareError", "prepare", "verify", "plan_units", "expand_inputs", "read_documents", "is_validation"]
