"""Optimizers for Chogori: parameter grouping, the optimizer registry (AdamW, Muon) and
resumable LR schedules. The trainer needs only :func:`build_optimizer` and :func:`build_lr_scheduler`.

The names below load on first use, so that the torch-free modules (`optim.choices`, `optim.lr_schedule`: what the
config check needs) can be imported without torch."""

from __future__ import annotations

import importlib

_HOMES = {
    "OptimizerFactory": "optim.builder", "build_optimizer": "optim.builder", "param_group_dicts": "optim.builder",
    "register_optimizer": "optim.builder", "registered_optimizers": "optim.builder",
    "MUON_DEFAULTS": "optim.muon", "Muon": "optim.muon", "build_muon": "optim.muon",
    "NS_COEFFICIENTS": "optim.newton_schulz", "zeropower_via_newtonschulz5": "optim.newton_schulz",
    "GROUP_KINDS": "optim.param_groups", "ParamGroups": "optim.param_groups", "canonical_name": "optim.param_groups",
    "describe_groups": "optim.param_groups", "split_params": "optim.param_groups",
    "DECAY_SHAPES": "optim.lr_schedule", "SCHEDULES": "optim.lr_schedule", "LRSchedule": "optim.lr_schedule",
    "build_lr_scheduler": "optim.schedules",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'optim' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
