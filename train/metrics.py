"""Where metrics go: a readable console line, JSONL in the run directory (always), wandb when enabled.

Only rank 0 writes. JSONL is the source of truth (plots and reports read it, it needs no network): strict
JSON, a non-finite value (a NaN loss) written as null, every step exactly once however often the run was
restarted. wandb mirrors it for dashboards and runs `offline` with no account.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from train.config import ExperimentConfig, to_dict

# Dense bf16 peak TFLOP/s per device (vendor datasheets), for MFU when logging.peak_tflops is not set.
_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                ("A100", 312.0), ("L40S", 362.0))


def detect_peak_tflops(device: torch.device) -> float | None:
    """The known peak of this GPU, or None (CPU, unknown GPU): then MFU is not reported rather than guessed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by tensors on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_step_line(rec: dict[str, Any], total_steps: int) -> str:
    """One line a person can scan: step, loss, lr, grad norm, throughput."""
    parts = [f"step {rec['step']:>{len(str(total_steps))}}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if rec.get("balance_loss"):
        parts.append(f"aux {rec['balance_loss']:.2e}")
    parts += [f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if "max_logit" in rec:
        parts.append(f"max-logit {rec['max_logit']:.1f}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """h:mm:ss (days spelled out past 24 h: a 15T-token run lasts weeks)."""
    days, rest = divmod(int(max(seconds, 0)), 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{sec:02d}"


class RunClock:
    """Wall-clock time since this process's first step began, and the time left at the recent pace. The pace
    leaves out the first step (compilation, warm-up) and includes everything between steps (evaluation,
    checkpoints), so the ETA is when the run will actually end."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self._start: float | None = None  # when the first step of this process began
        self._after_first: tuple[int, float] | None = None  # (step, time) once the first step is done

    def tick(self, step: int, step_time_s: float, now: float) -> tuple[float, float | None]:
        """(elapsed seconds, seconds left or None until the pace is known) after `step` finished at `now`."""
        if self._start is None:
            self._start = now - step_time_s
        if self._after_first is None:
            self._after_first = (step, now)
            return now - self._start, None
        first_step, first_time = self._after_first
        pace = (now - first_time) / max(step - first_step, 1)
        return now - self._start, pace * (self.total_steps - step)


class MetricsLogger:
    """`resumed_step`: the step this run continues from (0: a fresh start). Records of later steps, from an
    earlier attempt in the same `out_dir`, are dropped: this run logs them again."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, *, rank: int = 0, resumed_step: int = 0) -> None:
        self.enabled = rank == 0
        self.total_steps = cfg.train.steps
        # Where lines go: stdout, flushed (logs are tailed through pipes); the trainer's progress bar swaps in its
        # own `write`, which prints above the bar.
        self.printer: Any = functools.partial(print, flush=True)
        self._clock = RunClock(self.total_steps)
        self._wandb = None
        self._tb: Any = None
        self._file = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        # Drop records of steps this run will log again — also on a fresh start (resumed_step 0) over the log
        # of a run that crashed before its first checkpoint — so every step appears exactly once.
        _truncate_after(path, resumed_step)
        self._file = path.open("a", buffering=1)
        if cfg.logging.wandb.mode != "disabled":
            self._wandb = _init_wandb(cfg, out_dir)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint (to be replayed) are dropped, as in the JSONL;
            # on a fresh start too (1: everything an earlier, crashed attempt wrote).
            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_step + 1)

    def log(self, rec: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        now = time.time()
        rec = {**rec, "time": round(now, 3)}
        assert self._file is not None
        self._file.write(json.dumps(_jsonable(rec), allow_nan=False) + "\n")
        scalars = {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._wandb is not None:  # scalars only: per-expert load lists stay in the JSONL (and the report)
            self._wandb.log(scalars, step=rec["step"])
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=rec["step"])
        timing = ""
        if rec.get("split") != "val" and "step_time_s" in rec:
            elapsed, left = self._clock.tick(rec["step"], rec["step_time_s"], now)
            timing = f" | {format_duration(elapsed)} elapsed, eta {'-' if left is None else format_duration(left)}"
        if echo:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            if rec.get("split") == "val":
                line = f"eval step {rec['step']} | val loss {rec['val_loss']:.4f} | val ppl {rec['val_ppl']:.2f}"
            else:
                line = format_step_line(rec, self.total_steps) + timing
            self.printer(f"{stamp} {line}")

    def event(self, message: str) -> None:
        if self.enabled:
            self.printer(message)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _init_wandb(cfg: ExperimentConfig, out_dir: Path) -> Any:
    import wandb

    w = cfg.logging.wandb
    id_file = out_dir / "wandb_run_id"
    # Remember the run id in the run directory so a restarted job continues the same wandb run.
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=w.project, entity=w.entity, name=w.name or out_dir.name, tags=list(w.tags), mode=w.mode,
        dir=str(out_dir), config=to_dict(cfg), id=run_id, resume="allow",
    )


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records of steps <= `step`, so a resumed run's JSONL has every step exactly once.

    Atomic: the kept lines go to a temporary file in the same directory, which is fsynced and renamed over the
    log, so a kill at any moment leaves either the old history or the truncated one, never a half-written file
    (the history can be hundreds of MB). Nothing is rewritten when nothing has to go.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a run killed during an earlier rewrite; the log itself is whole
    if not path.exists():
        return
    with path.open("rb") as src:
        keep = [_keep(line, step) for line in src]  # one parse per line; then copy without parsing
        if all(keep):
            return
        src.seek(0)
        with tmp.open("wb") as dst:
            for line, kept in zip(src, keep, strict=True):  # streamed: the history need not fit in memory
                if kept:
                    dst.write(line)
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # make the rename itself durable


def _keep(line: bytes, step: int) -> bool:
    """A complete record of a step <= `step` (a line cut short by a crash is not kept)."""
    if not line.endswith(b"\n"):
        return False
    try:
        rec = json.loads(line)
    except ValueError:  # a line garbled by a crash
        return False
    rec_step = rec.get("step", 0) if isinstance(rec, dict) else None
    return isinstance(rec_step, (int, float)) and rec_step <= step


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    """A record as strict JSON: non-finite floats (a NaN loss, an overflowed norm) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
