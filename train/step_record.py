"""A step's metrics as one device tensor, brought to the host in one transfer, then named.

Every number of the step record (losses, grad norm, per-layer max logits, QK-Clip counts, expert-load
imbalance and shares, bias spread, dropped copies) is computed on the device; `StepRecord.to_host` packs
them into one flat float64 tensor and calls `.tolist()` once: one device->host synchronisation per step,
whatever the number of layers.
"""

from __future__ import annotations

from typing import Any

import torch

from models.stats import StatsBuckets


class StepRecord:
    """Collects named device tensors (scalars or 1-D per-layer rows) and reads them all at once."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor, list[int] | None]] = []

    def scalar(self, name: str, value: torch.Tensor) -> None:
        self._parts.append((name, value.detach().reshape(1), None))

    def per_layer(self, name: str, values: torch.Tensor, layers: list[int]) -> None:
        """`values[i]` of layer `layers[i]`, logged as `<name>/layer<L>`."""
        self._parts.append((name, values.detach().reshape(len(layers)), layers))

    def shares(self, name: str, loads: torch.Tensor, layers: list[int]) -> None:
        """Each expert's share of its layer's load ([L, E]), logged as a list per layer."""
        shares = loads.double() / loads.double().sum(dim=1, keepdim=True).clamp(min=1e-9)
        for row, layer in zip(shares, layers, strict=True):
            self._parts.append((f"{name}/layer{layer}", row, []))

    def add_stats(self, stats: StatsBuckets, clipped: torch.Tensor | None, bias_spread: torch.Tensor,
                  with_shares: bool) -> None:
        """The model's (reduced) statistics of the step, in the record's names."""
        max_logit = stats.max_logit()
        self.scalar("max_logit", max_logit.max() if max_logit.numel() else torch.tensor(float("nan")))
        self.per_layer("attn/max_logit", max_logit.amax(dim=1), stats.layers)
        if clipped is not None:
            self.scalar("qk_clip/heads_clipped", clipped.sum())
            self.per_layer("qk_clip/heads_clipped", clipped, stats.layers)
        else:
            self.scalar("qk_clip/heads_clipped", torch.zeros(()))
        if stats.moe_layers:
            load = stats.expert_load()
            imbalance = load.amax(dim=1) / load.mean(dim=1).clamp(min=1e-9)
            self.per_layer("moe/load_imbalance", imbalance, stats.moe_layers)
            if with_shares:
                self.shares("moe/expert_load", load, stats.moe_layers)
            self.per_layer("moe/bias_spread", bias_spread, stats.moe_layers)
        self.scalar("moe/dropped_tokens", stats.dropped().sum() if stats.moe_layers else torch.zeros(()))

    def to_host(self) -> dict[str, Any]:
        """One transfer; returns {name: float | list}."""
        if not self._parts:
            return {}
        device = self._parts[0][1].device
        flat = torch.cat([t.to(device=device, dtype=torch.float64) for _, t, _ in self._parts]).tolist()
        out: dict[str, Any] = {}
        i = 0
        for name, t, layers in self._parts:
            n = t.numel()
            values, i = flat[i:i + n], i + n
            if layers is None:
                out[name] = values[0]
            elif layers == []:  # a list-valued metric (expert shares)
                out[name] = [round(v, 5) for v in values]
            else:
                out.update({f"{name}/layer{layer}": v for layer, v in zip(layers, values, strict=True)})
        return out
