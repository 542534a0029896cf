"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3), reporting each head's max pre-softmax logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import RMSNorm, apply_rope
from models.stats import is_recomputing

# The latent norms use a fixed eps in DeepSeek's reference code and in transformers, whatever
# `rms_norm_eps` says; matching it keeps logits identical for configs with another rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """MLA: queries (optionally through a low-rank `q_lora_rank` bottleneck) and a shared compressed KV
    latent of `kv_lora_rank` plus one rotary key shared by all heads.

    After every forward, `max_logit` ([num_heads], float32, no grad) holds the running max over the calls
    since the last `reset_max_logit()` of each head's scaled logit q.k * scale over the attended (causal)
    pairs. QK-Clip reads it after the optimizer step. The eager path takes the max from the score matrix it
    already has; the SDPA path, whose fused kernel hides the scores, computes it in a second no-grad pass.
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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, S, hidden]. `mask`: optional bool [B, 1, S, S], True where attention is allowed (it must
        already be causal, e.g. from `document_mask`); None means plain causal attention."""
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

        if cfg.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
            with torch.no_grad():
                self._track_max_logit(torch.matmul(q, k.transpose(-2, -1)) * self.scale, mask)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            scores = self._track_max_logit(scores, mask)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h * d_v))

    def _track_max_logit(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mask disallowed logits with -inf and fold the per-head max of the allowed ones into `max_logit`
        (not again in an activation-checkpointing recompute; the max is computed there all the same, so the
        recompute runs the same ops as the forward, which selective checkpointing relies on)."""
        if mask is None:
            s_q, s_k = scores.shape[-2:]
            mask = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).tril(s_k - s_q)
        scores = scores.masked_fill(~mask, float("-inf"))
        with torch.no_grad():
            current = scores.detach().amax(dim=(0, 2, 3)).float()
            if not is_recomputing():
                torch.maximum(self.max_logit, current, out=self.max_logit)
        return scores
