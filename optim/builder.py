"""Build the optimizer named in the config, through a small registry.

The trainer only ever calls :func:`build_optimizer`; which algorithm runs is the ``name`` key of the
optimizer config. New optimizers (Muon, arriving later) add themselves with :func:`register_optimizer`
and receive the already classified parameter groups, so the trainer never changes when one is added.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch
from torch import nn

from optim.param_groups import ParamGroups, split_params

OptimizerFactory = Callable[[nn.Module, ParamGroups, Mapping[str, Any]], torch.optim.Optimizer]
"""``factory(model, groups, cfg) -> optimizer``: ``groups`` is :func:`split_params` of the model (only
trainable tensors); the model is passed for optimizers that need its layout (QK-Clip's heads)."""

DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "fused": None,
}
"""Values used for keys the config leaves out (``lr`` has none: it must be given)."""

_DECAYED_GROUPS: frozenset[str] = frozenset({"matrix", "embedding"})

_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory, *, overwrite: bool = False) -> None:
    """Make ``factory`` buildable as ``cfg.name == name`` (case-insensitive). Registering a taken name
    raises unless ``overwrite``, so two modules cannot silently fight over one name."""
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def registered_optimizers() -> list[str]:
    """The names :func:`build_optimizer` accepts, sorted."""
    return sorted(_REGISTRY)


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` for the trainable parameters of ``model``.

    Each param group carries ``"group": <kind>`` (``matrix`` / ``embedding`` / ``vector``) so logs and
    checkpoints can tell them apart. Raises ``ValueError`` for an unknown name (listing the registered
    ones), bad hyperparameters (naming the key), or a model without trainable parameters.
    """
    name = str(_get(cfg, "name")).lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer name {name!r}; registered: {', '.join(registered_optimizers())}")
    groups = split_params(model)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return _REGISTRY[name](model, groups, cfg)


def param_group_dicts(
    groups: ParamGroups, weight_decay: float, kinds: tuple[str, ...] | None = None
) -> list[dict]:
    """torch param-group dicts, one per non-empty kind (restricted to ``kinds`` if given), with weight
    decay on "matrix" and "embedding" only and the ``"group"`` tag. Shared with later optimizers so
    their AdamW part treats decay the same way."""
    out = []
    for kind, named in groups.items():
        if (kinds is not None and kind not in kinds) or not named:
            continue
        out.append(
            {
                "params": [p for _, p in named],
                "weight_decay": weight_decay if kind in _DECAYED_GROUPS else 0.0,
                "group": kind,
            }
        )
    return out


def adamw_hparams(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validated ``lr``, ``weight_decay``, ``betas``, ``eps`` from ``cfg`` (defaults from
    :data:`DEFAULTS`); a bad value raises ``ValueError`` naming the key."""
    lr = _get(cfg, "lr")
    if lr is None:
        raise ValueError("optimizer config needs 'lr' (the peak learning rate)")
    lr = _real("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    weight_decay = _real("weight_decay", _get(cfg, "weight_decay"))
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    betas_raw = _get(cfg, "betas")
    try:
        betas = tuple(_real("betas", b) for b in betas_raw)
    except TypeError:
        raise ValueError(f"betas must be a list of 2 numbers, got {betas_raw!r}") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be 2 numbers in [0, 1), got {list(betas)}")
    eps = _real("eps", _get(cfg, "eps"))
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}


def resolve_fused(value: Any, params: list[nn.Parameter]) -> bool:
    """``fused`` config value -> bool: null means fused exactly when every parameter is on CUDA
    (``DTensor.device`` is the local device, so FSDP2-sharded models resolve correctly)."""
    if value is None:
        return bool(params) and all(p.device.type == "cuda" for p in params)
    if not isinstance(value, bool):
        raise ValueError(f"fused must be true, false or null, got {value!r}")
    return value


def _build_adamw(model: nn.Module, groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """torch.optim.AdamW over the three groups (all on AdamW until Muon takes the matrices)."""
    hp = adamw_hparams(cfg)
    param_groups = param_group_dicts(groups, hp.pop("weight_decay"))
    params = [p for g in param_groups for p in g["params"]]
    fused = resolve_fused(_get(cfg, "fused"), params)
    # Only pass fused when chosen: fused=False and foreach=None keeps torch's own default
    # (for-loop on CPU), which is exactly what torch.optim.AdamW(...) does without arguments.
    return torch.optim.AdamW(param_groups, **hp, **({"fused": True} if fused else {}))


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg[key]``, or its default when missing or null."""
    value = cfg.get(key, None) if cfg is not None else None
    return DEFAULTS.get(key) if value is None else value


def _real(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _build_muon(model: nn.Module, groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Muon on the "matrix" group, AdamW on the others (optim/muon.py; imported here, at build time,
    because optim.muon imports this module). Extra keys: momentum, nesterov, ns_steps, ns_dtype."""
    from optim.muon import build_muon

    return build_muon(model, groups, cfg)


register_optimizer("adamw", _build_adamw)
register_optimizer("muon", _build_muon)
