"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, checksummed, and never unpickling a file.

Layout of `<out_dir>/checkpoints/step-<N>/`:

    .metadata, __<rank>_<i>.distcp   DCP: the model's and the optimizer's *tensors* (nothing else)
    train_state-rank<R>.json         step, tokens seen, data position, spike detector, RNG states (JSON)
    config.yaml                      the resolved experiment config of the run that saved it
    checksums-rank<R>.json           sha256 of every file rank R wrote (rank 0 also: .metadata, config.yaml)
    COMPLETE                         written last: "step N" and the save's sequence number

Atomic: a checkpoint is written under `.tmp-step-<N>`, the marker is written last, and only then is the
directory renamed into place; resume only considers directories with the marker. A failed save (a full
disk) removes its temporary directory and says which checkpoint is the last good one.

Trust: loading never runs code from a file. Hyperparameters (the optimizer's param groups, the LR
schedule) are not saved at all — a resume takes them from its config — so DCP holds only tensors and the
rest is JSON; train/safe_load.py reads DCP's files without unpickling anything but DCP's own metadata
classes. Checkpoints written before this format (pickled `train_state-rank*.pt`) are read the same safe way.

Order: the marker carries a save sequence number. "Newest" means the latest save, not the highest step,
so after a rollback (resume from an earlier step) the new branch's saves are the ones kept and resumed.

DCP is used even in one process (it needs no process group there) so the same files reshard when the
world size changes.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data.shards import fsync_dir
from models.config import ConfigError
from train.safe_load import (
    METADATA,
    CheckpointError,
    CorruptCheckpoint,
    load_dcp_tensors,
    quiet_dcp,
    read_legacy_train_state,
)

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MARKER_LINE = re.compile(r"^(step|save|ranks) (\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _gather_errors(error: str | None, group: Any = None) -> list[str]:
    """Every rank's error message (None where it went well), on every rank: all ranks take the same branch."""
    if _world() == 1:
        return [error] if error else []
    errors: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)  # our own processes' strings, not file contents
    return [e for e in errors if e]


# --- RNG state as JSON --------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if isinstance(state["torch"], torch.Tensor):  # a trusted pre-JSON checkpoint: the objects themselves
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# --- finding checkpoints --------------------------------------------------------------------------------
def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def read_marker(ckpt: Path) -> dict[str, int]:
    """The COMPLETE marker: `step N`, `save K` (the save's sequence number) and `ranks W` (how many ranks
    saved), one per line; older markers hold only the step."""
    path = ckpt / COMPLETE
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable ({type(e).__name__})") from None
    fields = {}
    for line in filter(None, lines):
        m = _MARKER_LINE.match(line)
        if m is None:
            raise CorruptCheckpoint(f"{path}: not a checkpoint marker (line {line[:40]!r})")
        fields[m.group(1)] = int(m.group(2))
    if "step" not in fields:
        raise CorruptCheckpoint(f"{path}: not a checkpoint marker (no step)")
    return fields


def save_sequence(path: Path) -> int:
    """The save's sequence number (0 for checkpoints written before it was recorded, or a damaged marker)."""
    try:
        return read_marker(path).get("save", 0)
    except CorruptCheckpoint:
        return 0


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), in save order: the last one is the newest save.
    Incomplete or temporary directories are ignored."""
    return complete_checkpoints(checkpoint_root(out_dir))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete `step-<N>` checkpoints directly under `root`, in save order (see `list_checkpoints`)."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE).exists():
                found.append((save_sequence(p), int(m.group(1)), p))
    return [(step, p) for _, step, p in sorted(found)]


def _explicit(resume: str) -> Path:
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise ConfigError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE} marker); "
                          "allowed: auto, none, or a checkpoint directory <out_dir>/checkpoints/step-<N>")
    return path


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """`auto`: newest complete checkpoint of this run (or none); `none`; or an explicit checkpoint path.
    Does not verify the files (see `find_resume`)."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1][1] if ckpts else None
    return _explicit(resume)


def find_resume(resume: str, out_dir: str | Path, *, notify: Any = print) -> Path | None:
    """The checkpoint to resume from, with its checksums verified on every rank. With `auto`, a corrupt
    newest checkpoint is reported through `notify` and the previous one is tried; an explicit path that
    fails verification raises."""
    if resume == "none":
        return None
    if resume != "auto":
        path = _explicit(resume)
        verify_checkpoint(path)
        return path
    candidates = [p for _, p in reversed(list_checkpoints(out_dir))]
    for i, path in enumerate(candidates):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as e:
            nxt = f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates) else "no older checkpoint left"
            notify(f"warning: checkpoint {path} is corrupt ({e}); {nxt}")
    return None


# --- checksums ------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _checksum_file(rank: int) -> str:
    return f"checksums-rank{rank}.json"


def _train_state_file(rank: int) -> str:
    return f"train_state-rank{rank}.json"


def _own_files(ckpt: Path, rank: int) -> list[Path]:
    """The files this rank wrote: its DCP data files (DCP names them `__<rank>_<i>.distcp`), its train state,
    and on rank 0 DCP's metadata."""
    own = sorted(ckpt.glob(f"__{rank}_*.distcp")) + [ckpt / _train_state_file(rank)]
    return own + [ckpt / METADATA] if rank == 0 else own


def _hash_files(files: list[Path]) -> dict[str, str]:
    return {p.name: _sha256(p) for p in files}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def is_legacy(ckpt: Path) -> bool:
    """Written before checksums and JSON train states: its train state is a pickle (`.pt`)."""
    return not (ckpt / _checksum_file(0)).exists() and (ckpt / "train_state-rank0.pt").exists()


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against its checksum, the work spread over the ranks (rank r verifies the files saved
    by ranks r, r + world, ...); every rank raises the same `CorruptCheckpoint` naming the first bad file."""
    if is_legacy(ckpt):
        return  # written before checksums: nothing to verify against (it is still read safely)
    rank, world = _rank(), _world()
    error = None
    try:
        marker = read_marker(ckpt)
        if "ranks" not in marker and not (ckpt / _checksum_file(0)).exists():
            return  # a plain DCP checkpoint from elsewhere (no checksums to verify; still read safely)
        n_saved = marker.get("ranks", 1)  # how many ranks saved it, hence wrote a checksums file
        for saver in range(rank, n_saved, world):
            sums = _read_json(ckpt / _checksum_file(saver))
            for name, digest in sorted(sums.items()):
                f = ckpt / name
                if not f.is_file():
                    raise CorruptCheckpoint(f"{f}: missing")
                if _sha256(f) != digest:
                    raise CorruptCheckpoint(f"{f}: checksum mismatch (the file changed after it was saved)")
    except CorruptCheckpoint as e:
        error = str(e)
    errors = _gather_errors(error)
    if errors:
        raise CorruptCheckpoint(errors[0])


# --- reading DCP without running code ------------------------------------------------------------------
def read_train_state(ckpt: Path) -> dict[str, Any]:
    """This rank's train state (rank 0's when resuming on more ranks than saved: only its RNG differs)."""
    if is_legacy(ckpt):
        rank_file = ckpt / f"train_state-rank{_rank()}.pt"
        return read_legacy_train_state(rank_file if rank_file.exists() else ckpt / "train_state-rank0.pt")
    rank_file = ckpt / _train_state_file(_rank())
    state = _read_json(rank_file if rank_file.exists() else ckpt / _train_state_file(0))
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpoint(f"{rank_file}: not a train state")
    return state


# --- saving ---------------------------------------------------------------------------------------------
def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(what DCP writes/reads: model + optimizer *state* tensors, the optimizer's full state dict). The
    param groups — hyperparameters — stay out: a resume takes them from its config."""
    with quiet_dcp():
        model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}, optim_sd


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _error_chain(e: BaseException) -> list[BaseException]:
    """`e` and what caused it: DCP's per-rank failures, `raise from` and "during handling" links (torch.save
    turns a failed write into a RuntimeError whose context is the OSError)."""
    out: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    return out


def _describe_save_error(e: BaseException, step: int, tmp: Path) -> str:
    chain = _error_chain(e)
    cause = next((c for c in chain if isinstance(c, OSError) and c.errno == errno.ENOSPC),
                 next((c for c in chain if isinstance(c, OSError)), chain[-1]))
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"no space left on device while saving step {step} to {tmp.parent}"
    what = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}"
    return f"saving step {step} to {tmp.parent} failed ({what})"


class Checkpointer:
    """Writes checkpoints `step-<N>` atomically, optionally in the background, and prunes old ones.

    With `async_save`, `save` returns once the state is staged (copied to CPU memory): DCP writes it from a
    background thread while training continues, over a dedicated gloo group so its collectives never
    interleave with the training ones; the same thread then checksums this rank's files. The checkpoint
    becomes visible (marker + rename) in `poll`, at the first step boundary where every rank's write has
    finished, or in `wait`. One save is in flight at most.

    Pruning keeps the `keep_last` newest *saves* and never removes `protect` (the checkpoint this run
    resumed from). A failed save raises `CheckpointError` on every rank after removing its temporary
    directory; the checkpoints already published are untouched.
    """

    def __init__(self, out_dir: str | Path, keep_last: int, async_save: bool = False,
                 device: torch.device | None = None, protect: Path | None = None) -> None:
        self.out_dir, self.keep_last, self.async_save = Path(out_dir), keep_last, async_save
        self.protect = protect.resolve() if protect is not None else None
        self.device = device or torch.device("cpu")  # where the training group's collectives run
        self._pending: tuple[cf.Future, Path, Path, int, str] | None = None
        distributed = _world() > 1
        self._group = dist.new_group(backend="gloo") if async_save and distributed else None
        self._hasher = cf.ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        # In one process DCP's writer thread warns once that torch.distributed is off (outside `quiet_dcp`,
        # which cannot cover another thread): left visible, since a library must not filter warnings globally.

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], config_yaml: str) -> Path | None:
        """Write `step-<step>`; returns its path, or None while an async write is still in flight."""
        self.wait()
        root = checkpoint_root(self.out_dir)
        final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
        rank = _rank()
        error = None
        try:
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left by a crash during an earlier attempt at this step
                    shutil.rmtree(tmp)
                tmp.mkdir()
        except OSError as e:
            error = _describe_save_error(e, step, tmp)
        self._raise_if_failed(error, tmp)  # also the barrier: tmp exists everywhere from here on
        # DCP's collective write comes first: a rank that fails in it fails on every rank, so no rank is left
        # waiting; this rank's own files (train state, checksums) follow, and `_finalize` agrees on the outcome.
        own_state = {**train_state, "rng": rng_state()}
        try:
            tensors, _ = _tensor_state(model, optimizer)
            with quiet_dcp():
                if self.async_save:
                    future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group)
                    assert self._hasher is not None
                    done = self._hasher.submit(self._write_own_files, future, tmp, rank, own_state)
                    self._pending = (done, tmp, final, step, config_yaml)
                    return None
                dcp.save(tensors, checkpoint_id=str(tmp))
            sums = self._write_own_files(None, tmp, rank, own_state)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a failed save must not leave a tmp dir
            error = _describe_save_error(e, step, tmp)
            sums = {}
        return self._finalize(tmp, final, step, config_yaml, sums, error)

    @staticmethod
    def _write_own_files(dcp_future: Any, tmp: Path, rank: int, own_state: dict[str, Any]) -> dict[str, str]:
        """After DCP's write: this rank's train state, then the checksums of everything this rank wrote."""
        if dcp_future is not None:
            dcp_future.result()
        _write_json(tmp / _train_state_file(rank), own_state)
        return _hash_files(_own_files(tmp, rank))

    def poll(self) -> Path | None:
        """Publish the in-flight checkpoint if every rank has finished writing it (call at step boundaries)."""
        if self._pending is None:
            return None
        # Asked on the training group, from this thread: the writer thread may be using the gloo group.
        busy = torch.tensor([0.0 if self._pending[0].done() else 1.0], device=self.device)
        if _world() > 1:
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return self.wait() if busy.item() == 0.0 else None

    def wait(self) -> Path | None:
        """Block until the in-flight checkpoint is written, then publish it."""
        if self._pending is None:
            return None
        future, tmp, final, step, config_yaml = self._pending
        self._pending = None
        error, sums = None, {}
        try:
            sums = future.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            error = _describe_save_error(e, step, tmp)
        return self._finalize(tmp, final, step, config_yaml, sums, error)

    def _raise_if_failed(self, error: str | None, tmp: Path) -> None:
        """Collective: if any rank failed, remove the temporary directory and raise the first error everywhere."""
        errors = _gather_errors(error, self._group)
        if not errors:
            return
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(self._group)
        ckpts = list_checkpoints(self.out_dir)
        last = f"the last good checkpoint is step {ckpts[-1][0]} ({ckpts[-1][1]})" if ckpts else \
            "no checkpoint was written before"
        raise CheckpointError(f"{errors[0]}; {last}")

    def _finalize(self, tmp: Path, final: Path, step: int, config_yaml: str, sums: dict[str, str],
                  error: str | None) -> Path:
        rank = _rank()
        if error is None and rank != 0:
            try:
                _write_json(tmp / _checksum_file(rank), sums)
            except OSError as e:
                error = _describe_save_error(e, step, tmp)
        self._raise_if_failed(error, tmp)
        if rank == 0:
            try:
                self._publish(tmp, final, step, config_yaml, sums)
            except OSError as e:
                error = _describe_save_error(e, step, tmp)
        self._raise_if_failed(error, tmp)
        return final

    def _publish(self, tmp: Path, final: Path, step: int, config_yaml: str, sums: dict[str, str]) -> None:
        """Rank 0, once every rank's files and checksums are in `tmp`: config, checksums, marker, rename, prune."""
        (tmp / "config.yaml").write_text(config_yaml)
        sums = {**sums, "config.yaml": _sha256(tmp / "config.yaml")}
        covered = set(sums)
        for other in tmp.glob("checksums-rank*.json"):
            covered |= set(_read_json(other))
        for f in tmp.iterdir():  # anything DCP wrote under a name we did not expect is checksummed too
            if f.is_file() and f.name not in covered and not f.name.startswith("checksums-rank"):
                sums[f.name] = _sha256(f)
        _write_json(tmp / _checksum_file(0), sums)
        fsync_dir(tmp)
        seq = 1 + max((save_sequence(p) for _, p in list_checkpoints(self.out_dir)), default=0)
        (tmp / COMPLETE).write_text(f"step {step}\nsave {seq}\nranks {_world()}\n")
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point: the checkpoint exists complete, or not at all
        fsync_dir(final.parent)
        kept = list_checkpoints(self.out_dir)
        for _, old in kept[: max(0, len(kept) - self.keep_last)]:
            if old.resolve() != self.protect and old.resolve() != final.resolve():
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the model's and the optimizer's tensors in place and return this rank's train state (RNG
    already restored). The optimizer's param groups (lr, weight decay, betas, ...) stay as the caller built
    them from its config. Verify the files first (`verify_checkpoint`, or `find_resume`)."""
    path = Path(path)
    tensors, optim_sd = _tensor_state(model, optimizer)
    load_dcp_tensors(path, tensors)
    with quiet_dcp():
        set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={**optim_sd, "state": tensors["optim"]["state"]})
    train_state = read_train_state(path)
    set_rng_state(train_state.pop("rng"))
    return train_state


