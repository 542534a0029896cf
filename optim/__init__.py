"""Optimizers for Chogori: parameter grouping, the optimizer registry (AdamW now, Muon later) and
resumable LR schedules. The trainer needs only :func:`build_optimizer` and :func:`build_lr_scheduler`."""

from optim.builder import (
    OptimizerFactory,
    build_optimizer,
    param_group_dicts,
    register_optimizer,
    registered_optimizers,
)
from optim.param_groups import GROUP_KINDS, ParamGroups, canonical_name, describe_groups, split_params
from optim.schedules import DECAY_SHAPES, SCHEDULES, LRSchedule, build_lr_scheduler

__all__ = [
    "DECAY_SHAPES",
    "GROUP_KINDS",
    "SCHEDULES",
    "LRSchedule",
    "OptimizerFactory",
    "ParamGroups",
    "build_lr_scheduler",
    "build_optimizer",
    "canonical_name",
    "describe_groups",
    "param_group_dicts",
    "register_optimizer",
    "registered_optimizers",
    "split_params",
]
