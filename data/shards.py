"""The on-disk shard format: pre-tokenized text that the loader memory-maps.

A shard is a directory holding three files:

- ``tokens.bin``: every document's tokens followed by one EOS, concatenated (the "packed stream"),
  as uint16 when the vocabulary fits, else uint32; little-endian, no header, so it can be memory-mapped.
- ``docs.idx``: uint64 start offset (in tokens) of each document in ``tokens.bin``; document ``i`` ends
  (EOS included) where document ``i + 1`` starts, the last one at ``num_tokens``.
- ``manifest.json``: format version, counts, dtype, tokenizer fingerprint and vocabulary size, and the
  sha256 of both binary files. It is the proof that the shard is complete.

A shard is written into a temporary directory next to its destination and renamed into place only when
every file is complete and flushed, so a crash can never leave a half shard that looks finished. Opening
checks sizes against the manifest (cheap) and optionally the checksums (reads everything); any problem
raises `ShardError` naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "chogori-shard"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
DOCS_FILE = "docs.idx"
MANIFEST_FILE = "manifest.json"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REQUIRED = {
    "format": str, "version": int, "num_tokens": int, "num_docs": int, "dtype": str,
    "tokenizer_fingerprint": str, "vocab_size": int, "eos_id": int, "tokens_sha256": str, "docs_sha256": str,
}
_CHUNK = 1 << 24  # bytes per read/write when hashing or copying


class DataError(ValueError):
    """Bad training data or data settings: the message names the config key or file at fault, so the
    training CLI can print it as one `error:` line."""


class ShardError(RuntimeError):
    """A shard is missing, incomplete, corrupt or made by another tokenizer; `path` is the file at fault."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class TokenIdError(ShardError):
    """A token id at or past the model's vocabulary, found in a batch: names the file, offset and id."""

    def __init__(self, path: str | os.PathLike[str], offset: int, token_id: int, vocab_size: int) -> None:
        self.offset, self.token_id, self.vocab_size = offset, token_id, vocab_size
        super().__init__(path, f"token id {token_id} at token offset {offset} is outside the vocabulary: "
                               f"model.vocab_size={vocab_size} allows ids 0..{vocab_size - 1}. The file is corrupt "
                               "(check it with `python -m data.prepare --out DIR --verify`) or was tokenized for a "
                               "larger vocabulary (raise model.vocab_size or re-prepare the data)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: halves the disk and page cache for BPE."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return _DTYPES["uint16"]
    if vocab_size <= 1 << 32:
        return _DTYPES["uint32"]
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new, uniquely named, empty directory in `parent`, made the way `mkdir` makes one: mode 0o777 minus
    the umask. (tempfile.mkdtemp's 0o700 would follow an output folder renamed into place from it, hiding it
    from the group that shares the run or dataset.)"""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(8)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # 64 random bits: practically never
            continue


def fsync_dir(path: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Streams documents into a new shard at `path`; `commit()` makes it appear, atomically.

    Documents go to a temporary directory next to `path`, so the shard may be far larger than memory and a
    crash leaves no half shard behind. Use it as a context manager: leaving the block without `commit()`
    (or with an exception) discards everything written. Refuses to overwrite an existing `path`.
    """

    def __init__(
        self, path: str | os.PathLike[str], tokenizer_fingerprint: str, vocab_size: int, eos_id: int,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.dest = Path(path)
        if self.dest.exists():
            raise FileExistsError(f"{self.dest}: shard already exists (shards are immutable; delete it first)")
        self.dtype = token_dtype(vocab_size)
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.fingerprint, self.vocab_size, self.eos_id = tokenizer_fingerprint, int(vocab_size), int(eos_id)
        self.metadata = metadata or {}
        self.num_tokens = self.num_docs = 0
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = make_temp_dir(self.dest.parent, f".{self.dest.name}.tmp-")
        self._tok_hash, self._doc_hash = hashlib.sha256(), hashlib.sha256()
        self._ftok = open(self._tmp / TOKENS_FILE, "wb", buffering=_CHUNK)
        self._fdoc = open(self._tmp / DOCS_FILE, "wb")
        self._starts: list[int] = []
        self._done = False

    def add(self, doc: Any) -> None:
        """Append one document (a sequence of integer ids); an EOS is appended after it."""
        ids = np.asarray(doc).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"document {self.num_docs} has dtype {ids.dtype}; token ids must be integers")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"document {self.num_docs} has token ids outside the vocabulary [0, {self.vocab_size})")
        out = np.empty(ids.size + 1, dtype=self.dtype)
        out[:-1] = ids
        out[-1] = self.eos_id
        raw = out.tobytes()
        self._ftok.write(raw)
        self._tok_hash.update(raw)
        self._starts.append(self.num_tokens)
        self.num_tokens += int(out.size)
        self.num_docs += 1
        if len(self._starts) >= 1 << 20:
            self._flush_starts()

    def _flush_starts(self) -> None:
        if self._starts:
            raw = np.asarray(self._starts, dtype="<u8").tobytes()
            self._fdoc.write(raw)
            self._doc_hash.update(raw)
            self._starts.clear()

    def commit(self) -> dict[str, Any]:
        """Flush, write the manifest and rename the shard into place; returns the manifest."""
        self._flush_starts()
        for f in (self._ftok, self._fdoc):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "dtype": self.dtype.name,
            "tokenizer_fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokens_sha256": self._tok_hash.hexdigest(),
            "docs_sha256": self._doc_hash.hexdigest(),
            "metadata": self.metadata,
        }
        with open(self._tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(self._tmp, self.dest)  # the commit point: fails rather than replace a shard that appeared meanwhile
        fsync_dir(self.dest.parent)
        self._done = True
        return manifest

    def abort(self) -> None:
        """Discard everything written (no-op after `commit`)."""
        if not self._done:
            self._done = True
            self._ftok.close()
            self._fdoc.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_shard(
    path: str | os.PathLike[str],
    docs: Iterable[Any],
    tokenizer_fingerprint: str,
    vocab_size: int,
    eos_id: int,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `docs` (an iterable of integer id sequences) as a shard directory at `path`, atomically.

    An EOS is appended after every document. Documents are streamed, so the shard may be far larger than
    memory. `metadata` (JSON-serialisable) is stored in the manifest, e.g. where the text came from.
    Returns the manifest. Refuses to overwrite an existing `path` (shards are immutable).
    """
    with ShardWriter(path, tokenizer_fingerprint, vocab_size, eos_id, metadata) as writer:
        for doc in docs:
            writer.add(doc)
        return writer.commit()


@dataclass
class Shard:
    """An open shard: its manifest and read-only memory maps of its token stream and document starts."""

    path: str
    manifest: dict[str, Any]
    tokens: np.ndarray  # np.memmap (or an empty array for an empty shard), shape [num_tokens]
    doc_starts: np.ndarray  # np.memmap of uint64, shape [num_docs]

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_docs(self) -> int:
        return int(self.manifest["num_docs"])

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.manifest["tokenizer_fingerprint"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def __len__(self) -> int:
        return self.num_tokens

    def document(self, i: int, with_eos: bool = False) -> np.ndarray:
        """The tokens of document `i` (a view into the memory map), without its trailing EOS by default."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents in {self.path}")
        start = int(self.doc_starts[i])
        end = int(self.doc_starts[i + 1]) if i + 1 < self.num_docs else self.num_tokens
        return self.tokens[start : end if with_eos else end - 1]


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise ShardError(path, "shard directory does not exist" if not path.exists() else "not a directory")
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(mpath, "manifest is missing (the shard was never finished or was damaged)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(mpath, f"cannot read manifest: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(mpath, f"manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ShardError(mpath, "manifest is not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise ShardError(mpath, f"manifest lacks the field '{key}'")
        if not isinstance(manifest[key], typ) or isinstance(manifest[key], bool):
            raise ShardError(mpath, f"manifest field '{key}' should be {typ.__name__}, got {manifest[key]!r}")
    if manifest["format"] != FORMAT:
        raise ShardError(mpath, f"not a Chogori shard manifest (format {manifest['format']!r})")
    if manifest["version"] != FORMAT_VERSION:
        raise ShardError(mpath, f"shard format version {manifest['version']} is not supported "
                                f"(this Chogori reads version {FORMAT_VERSION})")
    if manifest["dtype"] not in _DTYPES:
        raise ShardError(mpath, f"unknown token dtype {manifest['dtype']!r}")
    if manifest["num_tokens"] < 0 or manifest["num_docs"] < 0:
        raise ShardError(mpath, "negative token or document count")
    return manifest


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only memory map of exactly `count` items after checking the file size (no data is read)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(path, "file is missing") from None
    expected = count * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than the manifest says"
        raise ShardError(path, f"file is {what}: {size} bytes, manifest implies {count} x {dtype.itemsize} "
                               f"= {expected} bytes")
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_shard(
    path: str | os.PathLike[str], expected_fingerprint: str | None = None, verify_checksum: bool = False
) -> Shard:
    """Open and check a shard: sizes always, tokenizer fingerprint if given, sha256 if `verify_checksum`."""
    root = Path(path)
    manifest = _read_manifest(root)
    mpath = root / MANIFEST_FILE
    if expected_fingerprint is not None and manifest["tokenizer_fingerprint"] != expected_fingerprint:
        raise ShardError(mpath, f"made by tokenizer {manifest['tokenizer_fingerprint']!r}, but tokenizer "
                                f"{expected_fingerprint!r} was expected; re-prepare the data with that one")
    dtype = _DTYPES[manifest["dtype"]]
    vocab = manifest["vocab_size"]
    if not 0 < vocab <= 1 << 32 or dtype.itemsize < token_dtype(vocab).itemsize:
        raise ShardError(mpath, f"dtype {dtype.name} cannot hold vocab_size {vocab}")
    tokens = _memmap(root / TOKENS_FILE, dtype, manifest["num_tokens"])
    doc_starts = _memmap(root / DOCS_FILE, np.dtype("<u8"), manifest["num_docs"])
    if verify_checksum:
        for name, key in ((TOKENS_FILE, "tokens_sha256"), (DOCS_FILE, "docs_sha256")):
            digest = _sha256_file(root / name)
            if digest != manifest[key]:
                raise ShardError(root / name, f"checksum mismatch: sha256 {digest} but the manifest "
                                              f"records {manifest[key]} (the file is corrupt)")
    return Shard(path=str(root), manifest=manifest, tokens=tokens, doc_starts=doc_starts)


def is_shard(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a finished shard (its manifest exists); cheap, nothing is verified."""
    return (Path(path) / MANIFEST_FILE).is_file()
