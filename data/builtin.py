"""The built-in corpus: the Python standard library's own source code, byte-tokenized.

It exists so that every install can train and evaluate something real with no download: tests, CPU
smoke runs and the `tiny` configs use it. The corpus is built once into the cache directory and reused;
its directory name carries a fingerprint of (tokenizer, Python version, file list), so a different Python
or tokenizer gets its own copy instead of silently reusing a stale one.

Building is safe when several processes (torchrun ranks) start at once: one builds under an exclusive
file lock while the others wait, and the finished corpus appears through a single atomic rename, so no
process ever sees a half-built corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import platformdirs
from tqdm import tqdm

from data.shards import is_shard, make_temp_dir, write_shard
from data.tokenizer import ByteTokenizer

try:  # POSIX only; elsewhere the atomic rename alone keeps concurrent builds correct (maybe duplicated)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "CHOGORI_CACHE"
VAL_PERCENT = 2  # a document goes to validation when hash(relative path) % 100 < VAL_PERCENT
# Installed third-party packages are not the standard library and differ between machines.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir` if given, else $CHOGORI_CACHE, else the per-user cache directory of the platform."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("chogori"))


def stdlib_files(stdlib: str | os.PathLike[str] | None = None) -> list[tuple[str, Path, int]]:
    """The standard library's `.py` files as (relative posix path, absolute path, size), sorted by path."""
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling symlink
                    continue
                found.append((path.relative_to(root).as_posix(), path, size))
    found.sort(key=lambda f: f[0])
    if not found:
        raise RuntimeError(f"{root}: found no .py files in the Python standard library")
    return found


def is_validation(relpath: str) -> bool:
    """The deterministic train/validation split: a stable hash of the path (not Python's salted hash())."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")
    return h % 100 < VAL_PERCENT


def corpus_fingerprint(tokenizer: ByteTokenizer, files: list[tuple[str, Path, int]]) -> str:
    """Hash of everything the corpus depends on: tokenizer, Python version, file names and sizes."""
    identity = {
        "corpus": "python-stdlib-v1",
        "tokenizer": tokenizer.fingerprint,
        "python": f"{platform.python_implementation()}-{platform.python_version()}",
        "val_percent": VAL_PERCENT,
        "files": [[rel, size] for rel, _, size in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def read_source(path: Path) -> str:
    """A source file as text, honouring its PEP 263 encoding cookie; undecodable bytes become U+FFFD."""
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError:
        encoding = "utf-8"
    try:
        return raw.decode(encoding, errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path`; the OS drops it if the process dies."""
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(
    dest_tmp: Path, files: list[tuple[str, Path, int]], tokenizer: ByteTokenizer, progress: bool
) -> None:
    """Write the train and val shards of the corpus into `dest_tmp` (a private directory)."""
    python = f"{platform.python_implementation()}-{platform.python_version()}"
    with tqdm(total=sum(f[2] for f in files), unit="B", unit_scale=True, disable=not progress,
              desc="building built-in corpus (Python stdlib)") as bar:
        for split in ("val", "train"):
            chosen = [f for f in files if is_validation(f[0]) == (split == "val")]

            def docs(chosen: list[tuple[str, Path, int]] = chosen) -> Iterator[np.ndarray]:
                for _, path, size in chosen:
                    yield tokenizer.encode_array(read_source(path))
                    bar.update(size)

            write_shard(
                dest_tmp / split, docs(), tokenizer.fingerprint, tokenizer.vocab_size, tokenizer.eos_id,
                metadata={"source": "python-stdlib", "split": split, "python": python,
                          "stdlib": sysconfig.get_paths()["stdlib"], "files": [f[0] for f in chosen]},
            )


def builtin_corpus(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> tuple[str, str]:
    """Paths of the built-in corpus' (train, val) shards, building them on first use.

    The corpus lives in `<cache_dir>/builtin-<fingerprint>/{train,val}`; the default cache directory is
    $CHOGORI_CACHE or the platform's user cache dir. Later calls only check that the manifests exist.
    """
    tokenizer = ByteTokenizer()
    root = default_cache_dir(cache_dir)
    files = stdlib_files()
    name = f"builtin-{corpus_fingerprint(tokenizer, files)}"
    out = root / name
    train, val = out / "train", out / "val"
    if is_shard(train) and is_shard(val):
        return str(train), str(val)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{name}.lock"):
        if is_shard(train) and is_shard(val):  # another process built it while we waited
            return str(train), str(val)
        if fcntl is not None:  # holding the lock, we own every leftover of a crashed build of this corpus
            for stale in root.glob(f".{name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if out.exists():
                shutil.rmtree(out)
        tmp = make_temp_dir(root, f".{name}.tmp-")
        try:
            _build(tmp, files, tokenizer, progress)
            try:
                os.rename(tmp, out)  # train and val appear together, or not at all
            except OSError:
                if not (is_shard(train) and is_shard(val)):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # without a lock: another process finished first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(train), str(val)


if __name__ == "__main__":  # python -m data.builtin [cache_dir]: build (or find) it and print the paths
    for p in builtin_corpus(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
