"""Opening a `datasets` source for streamed training: every split as an `IterableDataset`, nothing read yet.

`path` is what `datasets.load_dataset` takes (a hub name, a builder such as ``json`` / ``parquet`` / ``text``
with `data_files`, or a local directory of data files, whose splits it infers from the file names), or a
directory written by `save_to_disk`, which `load_dataset` cannot open: that one is memory-mapped with
`load_from_disk` and streamed with `to_iterable_dataset` (a single saved `Dataset` is the split ``train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data.hf_disk import is_save_to_disk
from data.shards import DataError


def open_splits(path: str, name: str | None = None, data_files: Any = None) -> dict[str, Any]:
    """{split name: IterableDataset} of the source (lazy: only file lists and metadata are resolved)."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_dir() and is_save_to_disk(local) and not data_files:
            loaded = datasets.load_from_disk(str(local))  # Arrow memory maps: nothing is read into memory
            items = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("train", loaded)]
            # One stream shard per Arrow file, so ranks can take whole files when their number divides.
            return {str(k): d.to_iterable_dataset(num_shards=max(1, min(len(d.cache_files), len(d))))
                    for k, d in items}
        kwargs = {k: v for k, v in (("name", name), ("data_files", data_files)) if v}
        loaded = datasets.load_dataset(str(local) if local.is_dir() else path, streaming=True, **kwargs)
    except Exception as e:  # datasets raises many types (missing dataset, no network, bad config, bad files)
        raise DataError(f"data.stream.path: cannot open {path!r} ({type(e).__name__}: {e})") from e
    return {str(k): v for k, v in loaded.items()}


def text_of(row: Any, field: str, where: str) -> str:
    """The text field of one streamed row, or a DataError naming the row and the fields it has."""
    text = row.get(field) if isinstance(row, dict) else None
    if isinstance(text, str):
        return text
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(sorted(map(str, row))[:10]) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no field {field!r} (fields: {keys}); choose one with data.stream.text_field")
    raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`key` of a config section, whatever it is: a dataclass, a dict or an OmegaConf node (None: `default`)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)
