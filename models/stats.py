"""Per-step statistics the network reports (expert loads, dropped token copies, per-head max attention logits),
counted once per forward whatever the activation-recompute policy.

The layers keep them in non-persistent buffers on the device; `Transformer` resets them in one call, packs
them into one flat tensor per reduction op (`StatsBuckets`) for the trainer to reduce over the right ranks,
and takes the reduced values back, so the optimizer's post-step hooks (router-bias update, QK-Clip) read
global numbers without the trainer knowing any layer.

Recompute: activation checkpointing runs a block's forward a second time during backward. parallel/ enters
`recomputing()` around that second run (torch's `context_fn` for checkpointing); the layers then compute as
usual but do not add to their statistics, so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_state = threading.local()  # the recompute runs in the autograd engine's thread for that device


def is_recomputing() -> bool:
    """Whether this thread is re-running a forward for activation checkpointing."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks a recompute: statistics recorded inside are not added again."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


@dataclass
class StatsBuckets:
    """All statistics of a step as two flat device tensors, one per reduction op.

    `sum`: float64 `[L_moe * E]` expert loads (token copies per expert), then `[L_moe]` dropped copies —
    additive over ranks that see different tokens. `max`: float32 `[L * H]` per-head max logits —
    a max over those ranks. `moe_layers` / `layers` are the layer indices the rows belong to (a pipeline
    stage holds only some layers)."""

    sum: torch.Tensor
    max: torch.Tensor
    moe_layers: list[int]
    layers: list[int]
    num_experts: int
    num_heads: int

    def expert_load(self) -> torch.Tensor:
        """[L_moe, E]"""
        n = len(self.moe_layers) * self.num_experts
        return self.sum[:n].view(len(self.moe_layers), self.num_experts)

    def dropped(self) -> torch.Tensor:
        """[L_moe]"""
        n = len(self.moe_layers) * self.num_experts
        return self.sum[n:n + len(self.moe_layers)]

    def max_logit(self) -> torch.Tensor:
        """[L, H]"""
        return self.max.view(len(self.layers), self.num_heads)
