"""Build the optimizer named in the config, through a small registry.

The trainer only ever calls :func:`build_optimizer`; which algorithm runs is the ``name`` key of the
optimizer config. Factories are registered with :func:`register_optimizer` (``adamw`` and ``muon`` at the
bottom of this module) and receive the already classified parameter groups, so the trainer never changes
when one is added. The config reading they share lives in optim/hparams.py, which the factories import
instead of this module: the registry depends on the factories, never the other way round.

Config keys read here (a plain mapping or an OmegaConf node; other keys are left for other
optimizers and ignored):

* ``name``: registered optimizer name (default ``"adamw"``).
* ``lr``: peak learning rate (required); the LR schedule multiplies it.
* ``weight_decay``: decoupled weight decay for the "matrix" and "embedding" groups (default 0.1);
  "vector" tensors (norm gains, biases) never decay: shrinking a norm gain toward 0 only fights
  the loss.
* ``betas``: two AdamW betas (default ``[0.9, 0.95]``), ``eps`` (default 1e-8).
* ``fused``: ``true`` / ``false`` / ``null``; null picks the fused kernel only when every parameter
  is on CUDA, where it is fastest; on CPU the reference loop is kept.
* ``muon`` also reads ``momentum``, ``nesterov``, ``ns_steps``, ``ns_dtype``, ``ns_triton``, ``ns_method``,
  ``ns_gram`` (optim/muon.py).
* ``offload``: ``none`` / ``cpu`` (parameters, gradients and optimizer state in host memory; AdamW groups step on
  DeepSpeed's CPU kernel, optim/host_adam.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from optim.choices import add_optimizer_name
from optim.hparams import adamw_hparams, cfg_value, param_group_dicts, resolve_fused
from optim.muon import Muon, build_muon, offload_kwargs
from optim.param_groups import ParamGroups, split_params

OptimizerFactory = Callable[[nn.Module, ParamGroups, Mapping[str, Any]], torch.optim.Optimizer]
"""``factory(model, groups, cfg) -> optimizer``: ``groups`` is :func:`split_params` of the model (only
trainable tensors); the model is passed for optimizers that need its layout (QK-Clip's heads)."""

_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory, *, overwrite: bool = False) -> None:
    """Make ``factory`` buildable as ``cfg.name == name`` (case-insensitive). Registering a taken name
    raises unless ``overwrite``, so two modules cannot silently fight over one name."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory
    add_optimizer_name(key)  # what the config check accepts


def registered_optimizers() -> list[str]:
    """The names :func:`build_optimizer` accepts, sorted."""
    return sorted(_REGISTRY)


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` for the trainable parameters of ``model``.

    Each param group carries ``"group": <kind>`` (``matrix`` / ``embedding`` / ``vector``) so logs and
    checkpoints can tell them apart. Raises ``ValueError`` for an unknown name (listing the registered
    ones), bad hyperparameters (naming the key), or a model without trainable parameters.
    """
    name = str(cfg_value(cfg, "name")).lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer name {name!r}; registered: {', '.join(registered_optimizers())}")
    groups = split_params(model)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return _REGISTRY[name](model, groups, cfg)


def _build_adamw(model: nn.Module, groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """torch.optim.AdamW over the three groups. Offloaded (`offload: cpu`), the same AdamW steps on DeepSpeed's
    CPU kernel: optim/muon.py's optimizer with AdamW groups only, which keeps torch.optim.AdamW's state (so
    checkpoints move between the two)."""
    hp = adamw_hparams(cfg)
    if cfg_value(cfg, "offload") == "cpu":
        groups_ = param_group_dicts(groups, hp["weight_decay"])
        for g in groups_:
            g["use_muon"] = False
        return Muon(groups_, **hp, **offload_kwargs(cfg))
    param_groups = param_group_dicts(groups, hp.pop("weight_decay"))
    params = [p for g in param_groups for p in g["params"]]
    fused = resolve_fused(cfg_value(cfg, "fused"), params)
    # Only pass fused when chosen: fused=False and foreach=None keeps torch's own default
    # (for-loop on CPU), which is exactly what torch.optim.AdamW(...) does without arguments.
    return torch.optim.AdamW(param_groups, **hp, **({"fused": True} if fused else {}))


register_optimizer("adamw", _build_adamw)
register_optimizer("muon", build_muon)
