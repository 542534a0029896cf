"""Small building blocks: RMSNorm, rotary embedding with YaRN, the SwiGLU feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as DeepSeek-V3 does (weight applied after the cast)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims and the cos/sin scale (YaRN's attention factor).

    YaRN (arXiv 2309.00071) blends interpolated and extrapolated frequencies with a linear ramp over the
    dimensions whose wavelength lies between `beta_fast` and `beta_slow` rotations of the original context.
    Computed on the host (dim/2 floats), whatever device the model is being built on.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    ys = cfg.rope_scaling
    if ys is None:
        return inv_freq, 1.0

    factor = float(ys["factor"])
    original_max = ys["original_max_position_embeddings"]
    beta_fast, beta_slow = ys.get("beta_fast") or 32, ys.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if ys.get("attention_factor") is not None:
        attention_factor = float(ys["attention_factor"])
    elif ys.get("mscale") and ys.get("mscale_all_dim"):
        attention_factor = mscale(factor, ys["mscale"]) / mscale(factor, ys["mscale_all_dim"])
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if ys.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Produces cos/sin for positions; the cache is tiny (dim/2 floats) so meta-init just recomputes it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        # Placed where the module is built (e.g. `with torch.device("meta")`) only now: the arithmetic on the meta
        # device would run torch's reference decompositions, which import torch._dynamo (~1.3 s of start-up).
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def reset_parameters(self) -> None:
        inv_freq, self.attention_factor = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [S] or [B, S] int -> cos, sin of shape [..., S, dim/2] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim, DeepSeek's released layout.

    The result is written de-interleaved (all rotated evens, then all rotated odds), as transformers does;
    queries and keys get the same permutation, so q.k is unchanged and logits match exactly.
    x: [B, H, S, d]; cos/sin: [S, d/2] or [B, S, d/2].
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
