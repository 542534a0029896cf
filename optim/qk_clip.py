"""QK-Clip (Kimi K2 report, sec. 2.1, "MuonClip"): keep every attention head's max logit at or below tau.

After each optimizer step, for every attention head ``h`` whose max pre-softmax logit since the last reset,
``S_h``, exceeds ``tau``: ``gamma_h = tau / S_h``, and the head's weights are rescaled in place so that every
one of its logits is multiplied by exactly ``gamma_h`` (its max becomes ``tau``):

- its query rows ``q_nope`` (head-specific, no rotary) by ``sqrt(gamma_h)``,
- its key rows ``k_nope`` (head-specific, up-projected from the KV latent) by ``sqrt(gamma_h)``,
- its query rows ``q_rope`` by ``gamma_h``,
- the rotary key is one key *shared* by all heads (``kv_a_proj_with_mqa``'s last ``qk_rope_head_dim``
  rows), so it is left alone; so are the values, ``o_proj``, ``q_a_proj`` and the latents.

so ``q_nope.k_nope`` scales by ``sqrt(gamma)^2`` and ``q_rope.k_rope`` by ``gamma * 1``. Heads with
``S_h <= tau`` (or a non-finite ``S_h``: no forward since the reset, or an overflow, where no finite gamma
makes sense) are not touched at all, bit for bit.

Weight layout (models/attention.py, head-major rows): the queries come from ``q_proj`` (no q-LoRA) or
``q_b_proj`` (q-LoRA), head ``h`` owning rows ``[h*(dn+dr), (h+1)*(dn+dr))``: ``dn`` nope rows then
``dr`` rope rows; ``kv_b_proj`` gives head ``h`` rows ``[h*(dn+dv), (h+1)*(dn+dv))``: ``dn`` k_nope rows
then ``dv`` value rows.

Sharded weights: a weight may be a DTensor (FSDP2 ``Shard(0)``, even or uneven, empty local shards
included; ``Replicate``; ``Shard`` of another dim). Each rank builds the per-row scale of the *full*
weight from the per-head gammas (a vector of ``heads * (dn + dr)`` numbers) and multiplies only its own
rows, found from the shard's global offset: no communication. The max logits must already be global (the
trainer all-reduces them with MAX before calling), so every rank computes the same gammas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.dtensor import is_dtensor

DEFAULT_TAU = 100.0
# Wrappers whose inner module holds the real block / model (activation checkpointing, torch.compile).
_WRAPPER_ATTRS = ("_checkpoint_wrapped_module", "_orig_mod")


@dataclass(frozen=True)
class HeadLayout:
    """What QK-Clip needs to know of one attention layer: its head count, head dims and the two projections
    whose rows it rescales."""

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_proj: nn.Module  # q_proj or q_b_proj: rows [h*(dn+dr), (h+1)*(dn+dr)) = [q_nope | q_rope] of head h
    kv_b_proj: nn.Module  # kv_b_proj: rows [h*(dn+dv), (h+1)*(dn+dv)) = [k_nope | v] of head h

    @classmethod
    def of(cls, attn: nn.Module) -> HeadLayout:
        """The layout of a `models.attention.MLAttention` (read from its config and projections)."""
        cfg = attn.cfg
        q = attn.q_proj if cfg.q_lora_rank is None else attn.q_b_proj
        return cls(attn.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, q, attn.kv_b_proj)


def clipped_heads(max_logit: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Bool mask [H] of the heads QK-Clip rescales: finite ``S_h > tau``."""
    s = max_logit.detach()
    return torch.isfinite(s) & (s > tau)


def head_gammas(max_logit: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Per-head gamma: ``tau / S_h`` for the clipped heads (`clipped_heads`), exactly 1 for the others.
    float32, [H]."""
    s = max_logit.detach().float()
    clip = clipped_heads(s, tau)
    one = torch.ones_like(s)
    return torch.where(clip, tau / torch.where(clip, s, one), one)


def head_row_scales(gamma: torch.Tensor, head_dim_1: int, head_dim_2: int, kind: Literal["q", "kv"]) -> torch.Tensor:
    """Per-row scale of a head-major weight whose head ``h`` owns ``head_dim_1 + head_dim_2`` rows.

    ``kind="q"``: rows ``[q_nope (head_dim_1 = dn) | q_rope (head_dim_2 = dr)]`` scale by
    ``[sqrt(gamma_h)] * dn + [gamma_h] * dr``.
    ``kind="kv"``: rows ``[k_nope (head_dim_1 = dn) | v (head_dim_2 = dv)]`` scale by
    ``[sqrt(gamma_h)] * dn + [1] * dv``.
    Returns a vector of ``len(gamma) * (head_dim_1 + head_dim_2)`` scales (1 exactly where gamma is 1).
    """
    if kind not in ("q", "kv"):
        raise ValueError(f"head_row_scales: kind must be 'q' or 'kv', got {kind!r}")
    if gamma.dim() != 1:
        raise ValueError(f"head_row_scales: gamma must be 1-D [num_heads], got shape {list(gamma.shape)}")
    h = gamma.shape[0]
    first = gamma.sqrt()
    second = gamma if kind == "q" else torch.ones_like(gamma)
    return torch.cat([first[:, None].expand(h, head_dim_1), second[:, None].expand(h, head_dim_2)], dim=1).reshape(-1)


def local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, global index of its first row): the rows of the full weight that this rank holds are
    ``[offset, offset + local.shape[0])``. Plain tensors: (weight, 0). DTensors: any mix of ``Replicate``
    and ``Shard(d)`` (uneven or empty shards too); ``_StridedShard`` on dim 0 (rows not contiguous) and
    ``Partial`` are rejected."""
    if not is_dtensor(weight):
        return weight, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    for placement in weight.placements:
        ok = isinstance(placement, Replicate) or (
            isinstance(placement, Shard) and not (isinstance(placement, _StridedShard) and placement.dim == 0))
        if not ok:
            raise NotImplementedError(f"qk_clip_: weight placements {tuple(weight.placements)} are not supported "
                                      "(only Replicate and Shard(d), not Partial or a strided shard of the rows)")
    local = weight.to_local()
    if weight.device_mesh.get_coordinate() is None:  # this rank is not in the mesh: it holds nothing
        return local, 0
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    if local.shape[0] != local_shape[0]:
        raise RuntimeError(f"qk_clip_: local shard has {local.shape[0]} rows but placements "
                           f"{tuple(weight.placements)} of {list(weight.shape)} give {local_shape[0]}")
    return local, int(offset[0])


@torch.no_grad()
def scale_rows_(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """``weight[r] *= scale[r]`` in place for the rows this rank holds (plain tensor or DTensor, see
    `local_rows`). ``scale`` covers all rows of the full weight. The product is taken in float32 and cast back
    to the weight's dtype, for every row: a scale of exactly 1 leaves a row bit-identical, and choosing rows on
    the host would cost a device->host sync per layer and step."""
    if scale.shape != (weight.shape[0],):
        raise ValueError(f"scale_rows_: scale has shape {list(scale.shape)}, the weight {weight.shape[0]} rows")
    local, offset = local_rows(weight)
    n = local.shape[0]
    if n == 0:
        return
    s = scale[offset:offset + n].to(local.device)
    view = (slice(None),) + (None,) * (local.dim() - 1)
    local.copy_((local.float() * s[view]).to(local.dtype))


def _unwrap(module: nn.Module) -> nn.Module:
    while True:
        inner = next((getattr(module, a) for a in _WRAPPER_ATTRS if isinstance(getattr(module, a, None),
                                                                               nn.Module)), None)
        if inner is None:
            return module
        module = inner


@torch.no_grad()
def clip_attention_(layout: HeadLayout, max_logit: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """QK-Clip one attention layer from its per-head max logits ``[H]``; returns how many heads were clipped
    (a device scalar: nothing here waits for the device)."""
    if max_logit.shape != (layout.num_heads,):
        raise ValueError(f"qk_clip_: max logits have shape {list(max_logit.shape)}, expected [{layout.num_heads}]")
    gamma = head_gammas(max_logit, tau)
    clipped = clipped_heads(max_logit, tau).sum()
    dn, dr, dv = layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim
    for module, scale in ((layout.q_proj, head_row_scales(gamma, dn, dr, "q")),
                          (layout.kv_b_proj, head_row_scales(gamma, dn, dv, "kv"))):
        scale_rows_(module.weight, scale)
        if getattr(module, "bias", None) is not None:
            scale_rows_(module.bias, scale)
    return clipped


@torch.no_grad()
def qk_clip_(model: nn.Module, max_logits: Mapping[int, torch.Tensor] | None = None,
             tau: float = DEFAULT_TAU) -> dict[int, torch.Tensor]:
    """Apply QK-Clip in place to every attention layer of `model` (a `models.Transformer`, possibly wrapped
    by activation checkpointing / torch.compile, its weights plain or FSDP2 DTensors).

    `max_logits`: ``{layer index: [num_heads] max logit}``, global over data-parallel ranks (default:
    ``model.max_logits()``, right for a single process); layers missing from it are skipped. Call after
    ``optimizer.step()``, then ``model.reset_max_logits()``. Returns ``{layer index: heads clipped}`` (device
    scalars) for every layer processed (the metrics)."""
    if not tau > 0:
        raise ValueError(f"qk_clip_: tau must be > 0, got {tau}")
    model = _unwrap(model)
    if max_logits is None:
        max_logits = model.max_logits()
    counts: dict[int, torch.Tensor] = {}
    for name, block in model.layers.items():
        idx = int(name)
        if idx not in max_logits:
            continue
        counts[idx] = clip_attention_(HeadLayout.of(_unwrap(block).self_attn), max_logits[idx], tau)
    return counts
