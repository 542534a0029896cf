"""Reading the optimizer config: AdamW's hyperparameters and the torch param groups, shared by every
optimizer factory (``adamw`` in optim/builder.py, ``muon`` in optim/muon.py).

A module of its own so that the registry (optim/builder.py) can import the factories while the factories
import these helpers, with no import cycle between them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from torch import nn

from optim.param_groups import ParamGroups

DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "fused": None,
}
"""Values used for keys the config leaves out (``lr`` has none: it must be given)."""

_DECAYED_GROUPS: frozenset[str] = frozenset({"matrix", "embedding"})


def cfg_value(cfg: Mapping[str, Any] | None, key: str) -> Any:
    """``cfg[key]``, or its :data:`DEFAULTS` value when missing or null."""
    value = cfg.get(key, None) if cfg is not None else None
    return DEFAULTS.get(key) if value is None else value


def param_group_dicts(
    groups: ParamGroups, weight_decay: float, kinds: tuple[str, ...] | None = None
) -> list[dict]:
    """torch param-group dicts, one per non-empty kind (restricted to ``kinds`` if given), with weight
    decay on "matrix" and "embedding" only and the ``"group"`` tag. Shared by the factories so that
    every AdamW part treats decay the same way."""
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
    lr = cfg_value(cfg, "lr")
    if lr is None:
        raise ValueError("optimizer config needs 'lr' (the peak learning rate)")
    lr = _real("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    weight_decay = _real("weight_decay", cfg_value(cfg, "weight_decay"))
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    betas_raw = cfg_value(cfg, "betas")
    try:
        betas = tuple(_real("betas", b) for b in betas_raw)
    except TypeError:
        raise ValueError(f"betas must be a list of 2 numbers, got {betas_raw!r}") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be 2 numbers in [0, 1), got {list(betas)}")
    eps = _real("eps", cfg_value(cfg, "eps"))
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


def _real(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)
