"""Finding and reading raw text for `python -m data.prepare`: globs, work-unit planning, document readers.

A `.txt` (or any other text) file is one document; a `.jsonl` / `.json` / `.ndjson` line is one document (its
text field); a parquet or Arrow row is one document; `.gz` text and jsonl are read compressed. A directory
stands for the data files it holds (a `save_to_disk` dataset, or `.arrow` / `.parquet` files: data/hf_disk.py).
Large jsonl files are cut into byte ranges (a line belongs to the range holding its first byte), parquet files
into row-group ranges, Arrow files into record-batch ranges, and small files are packed together, so the plan
is a deterministic function of the inputs and the unit size.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from data.hf_disk import DiskDatasetError, arrow_batch_sizes, arrow_batches, arrow_schema_names, directory_files

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PrepareError(ValueError):
    """Bad input or settings for `prepare`; the message names the file, line or option at fault."""


def _kind(path: str) -> tuple[str, bool]:
    """(format, gzipped) of an input file, from its name."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".parquet"):
        if gz:
            raise PrepareError(f"{path}: parquet files are compressed internally; do not gzip them")
        return "parquet", False
    if name.endswith(".arrow"):
        if gz:
            raise PrepareError(f"{path}: gzipped Arrow files cannot be memory-mapped; decompress them")
        return "arrow", False
    return ("jsonl" if name.endswith(_JSON_SUFFIXES) else "text"), gz


def expand_inputs(patterns: Iterable[str], split: str = "train") -> list[str]:
    """Every file matched by the globs, sorted and de-duplicated; a glob that matches nothing is an error.

    A matched directory contributes the data files of `split` it holds (data/hf_disk.py), so `--input DIR`
    reads a `save_to_disk` dataset or a directory of Arrow / Parquet files.
    """
    files: set[str] = set()
    for pattern in patterns:
        matched = glob.glob(os.path.expanduser(pattern), recursive=True)
        found = [os.path.abspath(p) for p in matched if os.path.isfile(p)]
        for d in (p for p in matched if os.path.isdir(p)):
            try:
                found += directory_files(d, split)
            except DiskDatasetError as e:
                raise PrepareError(str(e)) from None
        if not found:
            raise PrepareError(f"input {pattern!r} matches no files")
        files.update(found)
    return sorted(files)


def _ranges(path: str, kind: str, sizes: list[int], unit_bytes: int) -> list[dict[str, Any]]:
    """Consecutive row groups / record batches (of `sizes` bytes) grouped into pieces of about `unit_bytes`."""
    out, first, acc = [], 0, 0
    for g, size in enumerate(sizes):
        acc += size
        if acc >= unit_bytes or g == len(sizes) - 1:
            out.append({"path": path, "kind": kind, "start": first, "end": g + 1, "bytes": acc})
            first, acc = g + 1, 0
    return out


def _pieces(path: str, unit_bytes: int) -> list[dict[str, Any]]:
    """How one file is cut: byte ranges (jsonl), row-group ranges (parquet) or the whole file."""
    kind, gz = _kind(path)
    size = os.path.getsize(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PrepareError(f"{path}: not a readable parquet file ({e})") from e
        return _ranges(path, kind, [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)],
                       unit_bytes)
    if kind == "arrow":
        try:
            return _ranges(path, kind, arrow_batch_sizes(path), unit_bytes)
        except DiskDatasetError as e:
            raise PrepareError(str(e)) from None
    if kind == "jsonl" and not gz and size > unit_bytes:
        return [{"path": path, "kind": kind, "start": a, "end": min(a + unit_bytes, size),
                 "bytes": min(unit_bytes, size - a)} for a in range(0, size, unit_bytes)]
    return [{"path": path, "kind": kind, "gz": gz, "start": 0, "end": size, "bytes": size}]


def plan_units(files: list[str], unit_bytes: int) -> list[dict[str, Any]]:
    """Pieces packed in order into units of about `unit_bytes` (a deterministic function of the inputs)."""
    units: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for path in files:
        for piece in _pieces(path, unit_bytes):
            if current and size + piece["bytes"] > unit_bytes:
                units.append({"id": len(units), "pieces": current, "bytes": size})
                current, size = [], 0
            current.append(piece)
            size += piece["bytes"]
    if current:
        units.append({"id": len(units), "pieces": current, "bytes": size})
    return units


def _file_identity(files: list[str]) -> list[list[Any]]:
    """(path, size, mtime) of each input: a rerun is refused if any changed underneath the plan."""
    out = []
    for p in files:
        st = os.stat(p)
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


# ----------------------------------------------------------------------------------------------- reading


def _text_field(obj: Any, field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:10]) or "none"
        raise PrepareError(f"{where}: no field {field!r} (fields: {keys}); choose one with --text-field")
    text = obj[field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _line_number(path: str, offset: int) -> int:
    """1-based line number of byte `offset` (only computed for error messages)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_docs(piece: dict[str, Any], field: str) -> Iterator[str]:
    path, start, end = piece["path"], piece["start"], piece["end"]
    opener = gzip.open if piece.get("gz") else open
    with opener(path, "rb") as f:
        if start > 0:  # the line holding byte start-1 belongs to the previous piece
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and isinstance(obj.get(field), str):  # the common case: no checks
                        yield obj[field]
                    else:
                        yield _text_field(obj, field, "")  # raises with the reason; re-raised with the place
                except (json.JSONDecodeError, UnicodeDecodeError, PrepareError) as e:
                    # Only now find the line number (reading the file up to here): errors are rare, lines not.
                    where = f"{path}:{_line_number(path, pos) if not piece.get('gz') else '?'}"
                    reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else (
                        "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else str(e).removeprefix(": "))
                    raise PrepareError(f"{where}: {reason}") from None
            pos += len(line)


def _parquet_docs(piece: dict[str, Any], field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    path = piece["path"]
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                           f"choose one with --text-field")
    for g in range(piece["start"], piece["end"]):
        column = pf.read_row_group(g, columns=[field]).column(0)
        for row, text in enumerate(column.to_pylist()):
            if not isinstance(text, str):
                raise PrepareError(f"{path}: row group {g} row {row}: column {field!r} is "
                                   f"{type(text).__name__}, not a string")
            yield text


def _arrow_docs(piece: dict[str, Any], field: str) -> Iterator[str]:
    path = piece["path"]
    try:
        names = arrow_schema_names(path)
        if field not in names:
            raise PrepareError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                               f"choose one with --text-field")
        for b, batch in enumerate(arrow_batches(path, piece["start"], piece["end"]), start=piece["start"]):
            for row, text in enumerate(batch.column(field).to_pylist()):
                if not isinstance(text, str):
                    raise PrepareError(f"{path}: record batch {b} row {row}: column {field!r} is "
                                       f"{type(text).__name__}, not a string")
                yield text
    except DiskDatasetError as e:
        raise PrepareError(str(e)) from None


def read_documents(piece: dict[str, Any], text_field: str) -> Iterator[str]:
    """The documents of one piece of an input file, in file order."""
    if piece["kind"] == "jsonl":
        yield from _jsonl_docs(piece, text_field)
    elif piece["kind"] == "parquet":
        yield from _parquet_docs(piece, text_field)
    elif piece["kind"] == "arrow":
        yield from _arrow_docs(piece, text_field)
    else:
        opener = gzip.open if piece.get("gz") else open
        with opener(piece["path"], "rb") as f:
            yield _decode(f.read(), piece["path"])
