"""Learning-rate schedules as pure functions of the optimizer step.

A schedule is a multiplier ``f(step)`` of the peak LR (``optimizer.lr``). Because it depends on the
step alone, resuming from a checkpoint reproduces the uninterrupted run exactly: the scheduler state
is just the step counter.

Step convention: ``f(s)`` is the multiplier of update number ``s`` (0-based), i.e. what
``LambdaLR`` applies after ``s`` calls of ``scheduler.step()``.

* Warmup (``warmup_steps = W``): ``f(s) = (s + 1) / (W + 1)`` for ``s < W``; it is never 0, so the
  first update already moves the weights, and it rises linearly to the peak ``f(W) = 1``.
* After warmup, one of:

  - ``constant``: 1 forever.
  - ``cosine`` / ``linear``: decay over ``[W, total_steps]`` from 1 to ``min_lr_ratio``.
  - ``wsd`` (warmup-stable-decay; MiniCPM, Kimi K2): 1 until ``total_steps - D`` with
    ``D = round(decay_fraction * total_steps)``, then decay over the last ``D`` steps to
    ``min_lr_ratio`` with ``decay_shape`` ``linear`` (default), ``cosine`` or ``sqrt``
    (``1 - sqrt(progress)``, the "1-sqrt" cooldown). ``decay_fraction = 0`` is warmup + constant.

  Decays reach ``min_lr_ratio`` exactly at ``step == total_steps`` (the nanoGPT / torchtitan
  convention; the last update, ``total_steps - 1``, is one decay step above it) and stay there if
  training runs on.

Scheduler checkpoints hold the step count only, not the schedule's parameters: on resume the
schedule comes from the current config. This is what makes WSD useful: resume a stable-phase
checkpoint with a new ``total_steps`` and the decay starts from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

# No torch here: the config check (train.config) validates a schedule before any command imports torch.

SCHEDULES: tuple[str, ...] = ("wsd", "cosine", "linear", "constant")
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "sqrt")

DEFAULTS: dict[str, Any] = {
    "schedule": "wsd",
    "warmup_steps": 0,
    "min_lr_ratio": 0.1,
    "decay_fraction": 0.1,
    "decay_shape": "linear",
}
"""Values for schedule keys the config leaves out."""


@dataclass(frozen=True)
class LRSchedule:
    """One LR schedule; validated on construction, called as ``schedule(step) -> multiplier``."""

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        _check_int("total_steps", self.total_steps, minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_unit("min_lr_ratio", self.min_lr_ratio)
        _check_unit("decay_fraction", self.decay_fraction)
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"decay_shape must be one of {', '.join(DECAY_SHAPES)}; got {self.decay_shape!r}"
            )
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed total_steps ({self.total_steps})"
            )
        if self.schedule in ("cosine", "linear") and self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps}) "
                f"for the {self.schedule} schedule, which decays after warmup"
            )
        if self.schedule == "wsd" and self.warmup_steps > self.decay_start:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + wsd decay steps ({self.decay_steps} = "
                f"decay_fraction {self.decay_fraction} * total_steps {self.total_steps}) exceed "
                f"total_steps; lower warmup_steps or decay_fraction"
            )

    @property
    def decay_steps(self) -> int:
        """Length of the decay phase (0 for ``constant``, and for ``wsd`` with decay_fraction 0)."""
        if self.schedule == "constant":
            return 0
        if self.schedule == "wsd":
            return int(math.floor(self.decay_fraction * self.total_steps + 0.5))
        return self.total_steps - self.warmup_steps

    @property
    def decay_start(self) -> int:
        """The last step at the peak; the decay runs over ``(decay_start, total_steps]``."""
        return self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        """Multiplier of the peak LR for update ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay_steps == 0 or step <= self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start) / self.decay_steps)
        shape = self.decay_shape if self.schedule == "wsd" else self.schedule
        if shape == "linear":
            remaining = 1.0 - progress
        elif shape == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # sqrt
            remaining = 1.0 - math.sqrt(progress)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * remaining

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, total_steps: int) -> LRSchedule:
        """The schedule described by ``cfg`` (keys ``schedule``, ``warmup_steps``, ``min_lr_ratio``,
        ``decay_fraction``, ``decay_shape``; missing or null keys take :data:`DEFAULTS`; other keys
        are ignored, so the whole optimizer section can be passed)."""
        values = {}
        for key, default in DEFAULTS.items():
            value = cfg.get(key, None) if cfg is not None else None
            values[key] = default if value is None else value
        return cls(total_steps=total_steps, **values)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")


def _check_unit(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
