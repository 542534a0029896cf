"""What runs after `optimizer.step()`: the router-bias update and QK-Clip, as torch optimizer post-step hooks.

Registered once where the optimizer is built (`register_post_step_hooks`), in this order: the aux-loss-free
router-bias update, then QK-Clip. Both read the model's statistics, which the trainer has already reduced
over the ranks that see different tokens (`Transformer.load_stats`), so every rank applies the same update.
A skipped step (non-finite loss or gradient norm) never calls `optimizer.step()`, so it runs neither.
Each hook is a small object that can be called and tested on its own; none waits for the device.
"""

from __future__ import annotations

from typing import Any

import torch

from models import Transformer
from optim.qk_clip import qk_clip_


class RouterBiasUpdate:
    """DeepSeek-V3's auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i) per MoE layer."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
        self.model.update_router_biases()


class QKClipHook:
    """K2's QK-Clip from the step's per-head max logits; `clipped` holds the heads rescaled per layer at the
    last call (a device tensor, read with the step's metrics)."""

    def __init__(self, model: Transformer, tau: float) -> None:
        self.model, self.tau = model, tau
        self.clipped: torch.Tensor | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any = (), kwargs: Any = None) -> None:
        counts = qk_clip_(self.model, self.model.max_logits(), tau=self.tau)
        self.clipped = torch.stack([counts[i] for i in sorted(counts)]) if counts else None


def register_post_step_hooks(optimizer: torch.optim.Optimizer, model: Transformer,
                             qk_clip_tau: float | None) -> tuple[RouterBiasUpdate, QKClipHook | None]:
    """Register the post-step hooks on `optimizer` (QK-Clip only when `qk_clip_tau` is set); returns them."""
    bias = RouterBiasUpdate(model)
    optimizer.register_step_post_hook(bias)
    clip = None
    if qk_clip_tau is not None:
        clip = QKClipHook(model, qk_clip_tau)
        optimizer.register_step_post_hook(clip)
    return bias, clip
