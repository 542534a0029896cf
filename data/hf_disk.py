"""Datasets on disk as the Hugging Face ecosystem leaves them: which files a directory means, and Arrow reading.

A directory is one of:

* a `Dataset.save_to_disk` directory (``state.json`` + ``dataset_info.json`` + ``data-*.arrow``): its Arrow
  files, in the order ``state.json`` lists them;
* a `DatasetDict.save_to_disk` directory (``dataset_dict.json`` + one such directory per split): the chosen
  split's files;
* any other directory of ``.arrow`` / ``.parquet`` files: its files of the chosen split when their names
  follow the hub's split naming (``train-00000-of-00004.parquet``, ``data/test/...``; resolved by `datasets`
  itself, so it agrees with ``load_dataset(DIR)``), else all of them (as split ``train``).

Arrow files are read as memory maps, one record batch at a time, in the IPC *stream* format (what
``save_to_disk`` writes) or the IPC *file* format: nothing is loaded whole, whatever the file's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".arrow", ".parquet")


class DiskDatasetError(ValueError):
    """A directory or Arrow file that cannot be read as a dataset; the message names it."""


def is_save_to_disk(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _save_to_disk_files(root: Path, split: str) -> list[str]:
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DiskDatasetError(f"{root / 'dataset_dict.json'}: unreadable ({type(e).__name__})") from None
        if split not in splits:
            raise DiskDatasetError(f"{root}: a DatasetDict with splits {', '.join(splits)}; no split {split!r} "
                                   f"(choose one with --hf-split / data.stream.split)")
        root = root / split
    state_path = root / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DiskDatasetError(f"{state_path}: not a save_to_disk state file ({type(e).__name__})") from None
    files = [str((root / n).resolve()) for n in names]
    for f in files:
        if not os.path.isfile(f):
            raise DiskDatasetError(f"{f}: listed in {state_path} but missing")
    return files


def _split_files(root: Path, split: str) -> list[str]:
    """The .arrow/.parquet files of `split`, by the hub's file-naming rules (all of them if names carry no split)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        by_split = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    except Exception:  # datasets raises EmptyDatasetError and others for a directory without data files
        by_split = {}
    by_split = {str(k): [f for f in v if f.lower().endswith(DATA_SUFFIXES)] for k, v in by_split.items()}
    by_split = {k: v for k, v in by_split.items() if v}
    if not by_split:
        raise DiskDatasetError(f"{root}: a directory with no .arrow or .parquet files and no save_to_disk dataset "
                               f"(for text or jsonl files give a glob, e.g. {root}/**/*.jsonl)")
    if split not in by_split:
        raise DiskDatasetError(f"{root}: its files hold splits {', '.join(sorted(by_split))}, not {split!r} "
                               f"(choose one with --hf-split / data.stream.split)")
    return sorted(os.path.abspath(f) for f in by_split[split])


def directory_files(path: str | os.PathLike[str], split: str = "train") -> list[str]:
    """The data files (absolute paths, in reading order) that the directory `path` holds for `split`."""
    root = Path(path).expanduser().resolve()
    if is_save_to_disk(root):
        return _save_to_disk_files(root, split)
    return _split_files(root, split)


# ----------------------------------------------------------------------------------------------- Arrow IPC


def _open(path: str) -> tuple[Any, bool]:
    """(reader, random_access) over a memory map: an IPC file reader if the file is one, else a stream reader."""
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
    except (OSError, pa.ArrowException) as e:
        raise DiskDatasetError(f"{path}: cannot open ({e})") from e
    try:
        return pa.ipc.open_file(source), True
    except (pa.ArrowException, OSError, ValueError):
        pass
    try:
        source.seek(0)
        return pa.ipc.open_stream(source), False
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DiskDatasetError(f"{path}: not a readable Arrow IPC file or stream ({e})") from e


def arrow_batch_sizes(path: str) -> list[int]:
    """Bytes of each record batch, in order. A stream is walked once, but zero-copy: only its headers are read."""
    import pyarrow as pa

    reader, random_access = _open(path)
    try:
        if random_access:
            return [reader.get_batch(i).nbytes for i in range(reader.num_record_batches)]
        return [batch.nbytes for batch in reader]
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DiskDatasetError(f"{path}: damaged Arrow data ({e})") from e


def arrow_batches(path: str, start: int, end: int) -> Iterator[Any]:
    """Record batches ``[start, end)`` of an Arrow file, each a view of the memory map."""
    import pyarrow as pa

    reader, random_access = _open(path)
    try:
        if random_access:
            for i in range(start, min(end, reader.num_record_batches)):
                yield reader.get_batch(i)
            return
        for i, batch in enumerate(reader):  # a stream cannot seek; skipping batches touches only their headers
            if i >= end:
                return
            if i >= start:
                yield batch
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DiskDatasetError(f"{path}: damaged Arrow data ({e})") from e


def arrow_schema_names(path: str) -> list[str]:
    reader, _ = _open(path)
    return list(reader.schema.names)
