"""Where metrics go: a readable console line, JSONL in the run directory (always), wandb when enabled.

Only rank 0 writes. JSONL is the source of truth (plots and reports read it, it needs no network);
wandb mirrors it for dashboards and runs `offline` with no account.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from train.config import ExperimentConfig, to_dict


def format_step_line(rec: dict[str, Any], total_steps: int) -> str:
    """One line a person can scan: step, loss, lr, grad norm, throughput."""
    parts = [f"step {rec['step']:>{len(str(total_steps))}}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if rec.get("balance_loss"):
        parts.append(f"aux {rec['balance_loss']:.2e}")
    parts += [f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s"]
    if "max_logit" in rec:
        parts.append(f"max-logit {rec['max_logit']:.1f}")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, cfg: ExperimentConfig, out_dir: Path, *, rank: int = 0, resumed_step: int = 0) -> None:
        self.enabled = rank == 0
        self.total_steps = cfg.train.steps
        self._wandb = None
        self._file = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if resumed_step and path.exists():
            _truncate_after(path, resumed_step)  # drop records of steps that will be replayed
        self._file = path.open("a", buffering=1)
        if cfg.logging.wandb.mode != "disabled":
            self._wandb = _init_wandb(cfg, out_dir)

    def log(self, rec: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        rec = {**rec, "time": round(time.time(), 3)}
        assert self._file is not None
        self._file.write(json.dumps(_jsonable(rec)) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                            step=rec["step"])
        if echo:
            if rec.get("split") == "val":
                line = f"eval step {rec['step']} | val loss {rec['val_loss']:.4f} | val ppl {rec['val_ppl']:.2f}"
            else:
                line = format_step_line(rec, self.total_steps)
            print(line, flush=True)

    def event(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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
    """Keep only records of steps <= `step`, so a resumed run's JSONL has every step exactly once."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(s + "\n" for s in kept))


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out
