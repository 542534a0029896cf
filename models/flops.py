"""Matmul FLOPs per token of the network, counted analytically from its config.

The trainer's MFU (train/trainer.py) and the planner (`python -m tools.plan`) use this one count.

    flops_breakdown(cfg, seq_len, causal=True) -> dict[part, int]   # forward, by part (FLOP_PARTS)
    flops_per_token(cfg, seq_len, training=True, causal=True) -> int

Convention: 2 FLOPs per multiply-add, matmuls only (norms, RoPE, softmax, SiLU, routing top-k and the
residual adds are left out: they are memory-bound and well under 1% of the matmul FLOPs at K2 size).
Attention is causal-aware: query i attends to i keys, so a token sees on average (S+1)/2 keys of a
length-S sequence. PaLM / Megatron count all S keys; `causal=False` gives that count, which is also what
the eager kernel executes (it computes the full S x S score matrix and masks it). Training = forward +
backward = 3 x forward (backward of a matmul is two matmuls of the same size: one for the input
gradient, one for the weight gradient). No activation-checkpointing recompute: model FLOPs, for MFU.
"""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig
from models.transformer import Transformer

# Forward FLOPs per token, in table order.
FLOP_PARTS: tuple[str, ...] = (
    "attention_proj", "attention_core", "dense_ffn", "router", "shared_experts", "routed_experts", "lm_head",
)


def _cfg_of(cfg_or_model: ModelConfig | Transformer) -> ModelConfig:
    return cfg_or_model if isinstance(cfg_or_model, ModelConfig) else cfg_or_model.cfg


def flops_breakdown(cfg: ModelConfig | Transformer, seq_len: int, *, causal: bool = True) -> dict[str, int]:
    """Forward matmul FLOPs per token, by part (see FLOP_PARTS), summed over all layers.

    causal=True: a token attends on average to (S+1)/2 keys (query i sees keys 1..i), so the score and
    value matmuls cost 2*h*(d_qk+d_v)*(S+1)/2 = h*(d_qk+d_v)*(S+1) per layer. causal=False counts all S
    keys (PaLM / Megatron convention, and what an unfused masked kernel computes)."""
    cfg = _cfg_of(cfg)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    hid, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = hid * h * cfg.qk_head_dim
    else:
        q = hid * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = hid * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim
                                                                                     + cfg.v_head_dim)
    attn_proj = 2 * (q + kv + h * cfg.v_head_dim * hid)
    keys_x2 = seq_len + 1 if causal else 2 * seq_len  # 2 * (mean keys per query)
    attn_core = h * (cfg.qk_head_dim + cfg.v_head_dim) * keys_x2

    n_dense, n_moe = cfg.first_k_dense_replace, cfg.num_moe_layers
    swiglu = 2 * 3 * hid  # gate, up, down: three matmuls of hid x width per unit of width
    return {
        "attention_proj": cfg.num_hidden_layers * attn_proj,
        "attention_core": cfg.num_hidden_layers * attn_core,
        "dense_ffn": n_dense * swiglu * cfg.intermediate_size,
        "router": n_moe * 2 * hid * cfg.n_routed_experts,
        "shared_experts": n_moe * swiglu * cfg.moe_intermediate_size * cfg.n_shared_experts,
        "routed_experts": n_moe * swiglu * cfg.moe_intermediate_size * cfg.num_experts_per_tok,
        "lm_head": 2 * hid * cfg.vocab_size,
    }


def layer_flops(cfg: ModelConfig | Transformer, seq_len: int, *, causal: bool = True) -> tuple[list[int], int]:
    """Forward matmul FLOPs per token of each layer (a dense layer and an MoE layer differ) and of the LM head:
    what a pipeline split balances. Sums to `flops_per_token(..., training=False)`."""
    cfg = _cfg_of(cfg)
    one = dataclasses.replace(cfg, num_hidden_layers=1, first_k_dense_replace=1)
    dense = flops_breakdown(one, seq_len, causal=causal)
    moe = flops_breakdown(dataclasses.replace(one, first_k_dense_replace=0), seq_len, causal=causal)
    head = dense.pop("lm_head")
    moe.pop("lm_head")
    per_layer = [sum((moe if cfg.is_moe_layer(i) else dense).values()) for i in range(cfg.num_hidden_layers)]
    return per_layer, head


def flops_per_token(cfg: ModelConfig | Transformer, seq_len: int, *, training: bool = True,
                    causal: bool = True) -> int:
    """Matmul FLOPs per token at sequence length `seq_len`: forward, or forward+backward (3x) when
    training. Model FLOPs (no activation-checkpointing recompute), the numerator of MFU."""
    fwd = sum(flops_breakdown(cfg, seq_len, causal=causal).values())
    return 3 * fwd if training else fwd
