"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3), reporting each head's max pre-softmax logit."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import RMSNorm, apply_rope
from models.stats import is_recomputing

# The latent norms use a fixed eps in DeepSeek's reference code and in transformers, whatever
# `rms_norm_eps` says; matching it keeps logits identical for configs with another rms_norm_eps.
LATENT_NORM_EPS = 1e-6

# Score elements ([B, H, C, S] logits, or B*C*S mask entries) one query chunk of the fused path may hold while
# it takes the max logit (and, with documents, runs SDPA). The chunk is a fixed budget, not a fraction of S*S,
# so the extra memory grows with S only through the O(S) rows it indexes. On CPU 2**20 (4 MiB of float32)
# keeps the tiny preset (B*H*S = 4096) at one chunk and S >= 1449 below one [S, S] matrix even at B = H = 1.
# On CUDA the fallback (no flex_attention) takes 2**26 (256 MiB), where each chunk costs a kernel launch.
CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}


# BLAS multiplies a few-row operand with other kernels (another summation order: 1 ulp off the full [S, S]
# matmul for chunks of 1-3 rows on this CPU's BLAS); 16 rows keep the chunked max bitwise equal to the eager one.
MIN_CHUNK_ROWS = 16


def query_chunk(b: int, h: int, s: int, device: torch.device) -> int:
    """Query rows per chunk so that a [B, H, C, S] score chunk stays within the device's element budget."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return min(s, max(MIN_CHUNK_ROWS, budget // (b * h * s)))


# --- mask_mods for flex_attention: plain functions of index tensors, so CPU tests can call them directly ------
def causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def document_mask_mod(document_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Causal within each document of `document_ids` ([B, S])."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return mask_mod


class AttentionMask:
    """Which keys each query may attend to: causal, and only within its own document when `document_ids`
    ([B, S]) are given. It holds the O(B*S) ids, never a dense [S, S] mask: each path builds what it needs —
    rows of the mask for a query chunk, or (CUDA) a flex_attention BlockMask, built on first use and then
    shared by every layer of the forward (and its activation-checkpointing recompute)."""

    def __init__(self, document_ids: torch.Tensor | None = None) -> None:
        self.document_ids = document_ids
        self._block_mask: object | None = None
        self._block_mask_key: tuple | None = None

    def rows(self, q0: int, q1: int, s_k: int, device: torch.device) -> torch.Tensor:
        """bool [B or 1, 1, q1 - q0, s_k], True where query q0 + i may attend to key j."""
        allowed = torch.arange(q0, q1, device=device)[:, None] >= torch.arange(s_k, device=device)[None, :]
        if self.document_ids is None:
            return allowed[None, None]
        ids = self.document_ids
        return (allowed & (ids[:, q0:q1, None] == ids[:, None, :s_k]))[:, None]

    def block_mask(self, b: int, s: int, device: torch.device) -> object:
        """The flex_attention BlockMask (causal, or causal within documents) for [B, *, S, S] attention."""
        key = (b, s, device)
        if self._block_mask is None or self._block_mask_key != key:
            from torch.nn.attention.flex_attention import create_block_mask

            if self.document_ids is None:  # one mask broadcast over the batch
                self._block_mask = create_block_mask(causal_mask_mod, None, None, s, s, device=device)
            else:
                mod = document_mask_mod(self.document_ids.to(device))
                self._block_mask = create_block_mask(mod, b, None, s, s, device=device)
            self._block_mask_key = key
        return self._block_mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kwargs: object) -> torch.Tensor:
    """F.scaled_dot_product_attention with one head dim for q, k and v: MLA's v_head_dim (128) is not its
    qk_head_dim (192), and SDPA's fused kernels (flash on CPU and CUDA) take only equal dims — otherwise SDPA
    falls back to its math backend, which materializes [B, H, S, S]. Zero columns added to v (or to q and k)
    change no score and give zero output columns, sliced off."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_v < d_qk:
        v = F.pad(v, (0, d_qk - d_v))
    elif d_v > d_qk:
        q, k = F.pad(q, (0, d_v - d_qk)), F.pad(k, (0, d_v - d_qk))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)[..., :d_v]


@functools.cache
def flex_kernel_options() -> dict[str, str]:
    """Pin the Triton backend where the option exists: the FLASH backend (which AUTO may choose) raises on
    `max_scores`; the Triton kernel returns them."""
    from torch.nn.attention.flex_attention import FlexKernelOptions

    return {"BACKEND": "TRITON"} if "BACKEND" in getattr(FlexKernelOptions, "__annotations__", {}) else {}


@functools.cache
def flex_attention_fn() -> Callable[..., object] | None:
    """torch.compile'd flex_attention if this torch can return per-row max scores (`AuxRequest.max_scores`),
    else None. Compiled because un-compiled flex_attention runs an unfused reference that materializes the
    scores — the memory this path exists to avoid."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    except ImportError:
        return None
    if "max_scores" not in getattr(AuxRequest, "_fields", ()):
        return None
    return torch.compile(flex_attention, dynamic=False)


class MLAttention(nn.Module):
    """MLA: queries (optionally through a low-rank `q_lora_rank` bottleneck) and a shared compressed KV
    latent of `kv_lora_rank` plus one rotary key shared by all heads.

    After every forward, `max_logit` ([num_heads], float32, no grad) holds the running max over the calls
    since the last `reset_max_logit()` of each head's scaled logit q.k * scale over the attended pairs
    (causal, and same-document under document masking). QK-Clip reads it after the optimizer step.

    `attn_impl: sdpa` (the fused path, the training default) never holds an [S, S] matrix per head: on CUDA
    with flex_attention, one kernel gives the output and each query row's max score; elsewhere SDPA gives the
    output and the max is taken under no_grad over query chunks of `query_chunk` rows. `attn_impl: eager`
    computes the full [B, H, S, S] scores (the reference the tests compare against).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d_qk = cfg.num_attention_heads, cfg.qk_head_dim
        self.num_heads = h
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, h * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale()
        self.register_buffer("max_logit", torch.full((h,), float("-inf")), persistent=False)

    @torch.no_grad()
    def reset_max_logit(self) -> None:
        self.max_logit.fill_(float("-inf"))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask | None = None
    ) -> torch.Tensor:
        """x: [B, S, hidden]. `mask`: which pairs may attend (causal, optionally within documents); None means
        plain causal attention."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, d_nope, d_rope, d_v = self.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, h, d_nope + d_rope).transpose(1, 2)
        q_nope, q_rope = q.split([d_nope, d_rope], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, d_rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, h, d_nope + d_v).transpose(1, 2)
        k_nope, v = kv.split([d_nope, d_v], dim=-1)

        cos, sin = rope
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(b, 1, s, d_rope), cos, sin)

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, h, s, d_rope)], dim=-1)
        mask = mask if mask is not None else AttentionMask()

        if cfg.attn_impl == "eager":
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            scores = scores.masked_fill(~mask.rows(0, s, s, q.device), float("-inf"))
            self._fold_max_logit(scores.detach().amax(dim=(0, 2, 3)))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)
        elif q.is_cuda and flex_attention_fn() is not None:
            out = self._flex(q, k, v, mask)
        else:
            out = self._sdpa_chunked(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h * d_v))

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """CUDA: flex_attention with a causal (+ document) BlockMask. `max_scores` is [B, H, S] float32, each
        query row's max of the scaled (`scale` included) post-mask logits, converted to natural units by
        flex_attention itself; rows cannot be fully masked here (the diagonal is always allowed)."""
        from torch.nn.attention.flex_attention import AuxRequest

        b, _, s, _ = q.shape
        out, aux = flex_attention_fn()(
            q, k, v, block_mask=mask.block_mask(b, s, q.device), scale=self.scale,
            return_aux=AuxRequest(max_scores=True), kernel_options=flex_kernel_options(),
        )
        self._fold_max_logit(aux.max_scores.detach().amax(dim=(0, 2)))
        return out

    def _sdpa_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """SDPA for the output; the max logit over query chunks [q0, q1) against keys [0, q1) (the causal
        prefix), so the largest score tensor is [B, H, C, S] (C = `query_chunk`). Without documents SDPA runs
        once with `is_causal` (no mask tensor at all); with documents it runs per chunk with that chunk's
        [B, 1, C, q1] mask rows, built from the ids, so no [B, 1, S, S] mask exists either."""
        b, h, s, _ = q.shape
        chunk = query_chunk(b, h, s, q.device)
        docs = mask.document_ids is not None
        out = None if docs else sdpa(q, k, v, self.scale, is_causal=True)
        outs, current = [], None
        for q0 in range(0, s, chunk):
            q1 = min(s, q0 + chunk)
            # the max runs over a full-size window (the last one reaches back over rows already seen, which
            # cannot change a max) so every score matmul has `chunk` rows — see MIN_CHUNK_ROWS
            w0 = min(q0, s - chunk)
            rows = mask.rows(w0, q1, q1, q.device)
            if docs:
                outs.append(sdpa(q[:, :, q0:q1], k[:, :, :q1], v[:, :, :q1], self.scale,
                                 attn_mask=rows[:, :, q0 - w0:]))
            with torch.no_grad():
                scores = torch.matmul(q[:, :, w0:q1], k[:, :, :q1].transpose(-2, -1)) * self.scale
                chunk_max = scores.masked_fill_(~rows, float("-inf")).amax(dim=(0, 2, 3))
                current = chunk_max if current is None else torch.maximum(current, chunk_max)
        self._fold_max_logit(current)
        return torch.cat(outs, dim=2) if docs else out

    @torch.no_grad()
    def _fold_max_logit(self, current: torch.Tensor) -> None:
        """Fold this forward's per-head max ([H]) into `max_logit` — not again in an activation-checkpointing
        recompute. The max is computed there all the same, so the recompute runs the same ops as the forward,
        which selective checkpointing relies on."""
        if not is_recomputing():
            torch.maximum(self.max_logit, current.float(), out=self.max_logit)
