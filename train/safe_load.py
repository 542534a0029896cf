"""Reading checkpoint files without running code from them.

DCP's `.metadata` is a pickle, and DCP's own reader unpickles it, and its non-tensor entries, unrestricted.
Here `.metadata` is read by an unpickler that admits only DCP's own metadata classes, a non-tensor entry is
refused, and each tensor entry is checked to start like torch.save's format before DCP reads it with
`torch.load(weights_only=True)`. Train states of the pre-JSON format (`train_state-rank*.pt`) are read with
`weights_only=True` too, admitting only the numpy types their RNG state holds.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

METADATA = ".metadata"


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or loaded; the message names the file and is shown as one line."""


class CorruptCheckpoint(CheckpointError):
    """A file whose bytes do not match the checksum written with it (or that is missing)."""


class UntrustedCheckpoint(CheckpointError):
    """A file that would have to be unpickled with arbitrary classes (an older format, or a planted file)."""


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP warns at every call that it runs without a process group; in one process that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
        yield


# --- DCP ---------------------------------------------------------------------------------------------
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout")} | {
    (module, cls) for module in ("pathlib", "pathlib._local")
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's `.metadata` holds (its dataclasses, torch.Size, dtypes, layouts, paths)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of DCP's metadata)")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` at `path`, unpickled with the restricted unpickler; anything else is refused."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - whatever a crafted or damaged pickle raises, name the file
        raise UntrustedCheckpoint(f"{path}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpoint(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_dcp_metadata` (DCP's own reader admits any class).
    Tensors are read by DCP with `torch.load(weights_only=True)`; before that, each entry this rank reads is
    checked to start like what DCP writes there (a torch.save zip archive), so a substituted file is refused
    by name rather than failing somewhere inside DCP."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path) / METADATA)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        by_file: dict[str, list[int]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if not info.transform_descriptors:  # a transformed (e.g. compressed) entry has no fixed header
                by_file.setdefault(info.relative_path, []).append(info.offset)
        for name, offsets in by_file.items():
            path = Path(self.path) / name
            try:
                with open(path, "rb") as f:
                    for offset in sorted(offsets):
                        f.seek(offset)
                        head = f.read(len(_ZIP_MAGIC))
                        if len(head) < len(_ZIP_MAGIC):
                            raise CorruptCheckpoint(f"{path}: truncated (DCP's metadata expects data at byte {offset})")
                        if head != _ZIP_MAGIC:
                            raise UntrustedCheckpoint(f"{path}: not DCP tensor data (at byte {offset})")
            except OSError as e:
                raise CorruptCheckpoint(f"{path}: unreadable ({e.strerror})") from None
        return super().read_data(plan, planner)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format, which DCP uses for every tensor entry


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses DCP's non-tensor entries, which DCP would unpickle with any class admitted."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise UntrustedCheckpoint(f"the checkpoint stores '{read_item.dest_index.fqn}' as a pickled object, not a "
                                  "tensor; Chogori checkpoints hold only tensors, so it is refused")


def _dcp_failure(path: Path, e: BaseException) -> CheckpointError:
    """DCP wraps per-rank failures in CheckpointException (a BaseException); surface the first cause."""
    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
    cause = causes[0] if causes else e
    if isinstance(cause, CheckpointError):  # already names its file
        return cause
    detail = (str(cause).strip().splitlines() or [""])[0]
    return CheckpointError(f"{path}: reading failed ({type(cause).__name__}{': ' + detail if detail else ''})")


def load_dcp_tensors(ckpt: Path, state: dict[str, Any], **kwargs: Any) -> None:
    """`dcp.load` of the tensors in `state` (in place) from `ckpt`, through the safe reader and planner."""
    try:
        with quiet_dcp():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), planner=TensorOnlyLoadPlanner(),
                     **kwargs)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        if isinstance(e, CheckpointError):
            raise
        raise _dcp_failure(ckpt, e) from e


def checkpoint_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in a checkpoint, from its metadata (read safely)."""
    md = read_dcp_metadata(path / METADATA)
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _numpy_rng_types() -> list[Any]:
    """What `np.random.get_state()` pickles to: an array rebuilt by numpy's `_reconstruct`, of uint32."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_legacy_train_state(path: Path) -> dict[str, Any]:
    """A pre-JSON `train_state-rank<R>.pt`, read with `torch.load(weights_only=True)`: plain values, tensors and
    the numpy RNG array, nothing that could run code."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_types()):
            state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling error, whatever its type, names the file
        raise UntrustedCheckpoint(f"{path}: not a train state of this format ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpoint(f"{path}: not a train state")
    return state
