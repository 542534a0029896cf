"""Small helpers shared by the model test files."""

from __future__ import annotations

import torch

from models import ModelConfig


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Every matrix ~ N(0, std), every norm weight ~ 1 + N(0, 0.1): nothing trivially uniform."""
    g = gen(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or (name == "weight" and p.dim() == 1):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


def moe_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                first_k_dense_replace=0, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                routed_scaling_factor=2.5)
    return ModelConfig(**{**base, **overrides})
