"""The LR schedule (optim/lr_schedule.py, a pure function of the step) applied to an optimizer as a resumable
``LambdaLR``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from optim.lr_schedule import DECAY_SHAPES, DEFAULTS, SCHEDULES, LRSchedule

__all__ = ["DECAY_SHAPES", "DEFAULTS", "SCHEDULES", "LRSchedule", "build_lr_scheduler"]


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, total_steps: int, last_step: int = 0
) -> LambdaLR:
    """A ``LambdaLR`` applying :meth:`LRSchedule.from_config` to every param group, positioned at
    ``last_step`` (the number of steps already taken; a resume passes the checkpoint's step).

    Each group's ``lr`` at call time is its base LR (it becomes ``initial_lr``, the key LR schedulers read):
    a resume therefore follows the schedule of *its* config from the checkpoint's step on, whatever LR the
    saved run used.

    The lambda handed to ``LambdaLR`` is a plain function, so ``scheduler.state_dict()`` stores
    ``lr_lambdas: [None, ...]``: the state dict holds only numbers (it loads with
    ``torch.load(weights_only=True)`` and through ``torch.distributed.checkpoint``) and loading it
    never overrides the schedule built from the current config.
    """
    schedule = LRSchedule.from_config(cfg, total_steps)

    def lr_lambda(step: int) -> float:
        return schedule(step)

    if last_step < 0:
        raise ValueError(f"last_step must be >= 0, got {last_step}")
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    # LambdaLR's constructor takes one step from last_epoch: last_step - 1 lands on last_step.
    return LambdaLR(optimizer, lr_lambda=lr_lambda, last_epoch=last_step - 1)
