"""Optimizers for Chogori: parameter grouping, the optimizer registry (AdamW, Muon) and
resumable LR schedules. The trainer needs only :func:`build_optimizer` and :func:`build_lr_scheduler`."""

from optim.builder import (
    OptimizerFactory,
    build_optimizer,
    param_group_dicts,
    register_optimizer,
    registered_optimizers,
)
from optim.muon import MUON_DEFAULTS, Muon, build_muon
from optim.newton_schulz import NS_COEFFICIENTS, zeropower_via_newtonschulz5
from optim.param_groups import GROUP_KINDS, ParamGroups, canonical_name, describe_groups, split_params
from optim.schedules import DECAY_SHAPES, SCHEDULES, LRSchedule, build_lr_scheduler

__all__ = [
    "DECAY_SHAPES",
    "GROUP_KINDS",
    "MUON_DEFAULTS",
    "NS_COEFFICIENTS",
    "SCHEDULES",
    "LRSchedule",
    "Muon",
    "OptimizerFactory",
    "ParamGroups",
    "build_lr_scheduler",
    "build_muon",
    "build_optimizer",
    "canonical_name",
    "describe_groups",
    "param_group_dicts",
    "register_optimizer",
    "registered_optimizers",
    "split_params",
    "zeropower_via_newtonschulz5",
]
