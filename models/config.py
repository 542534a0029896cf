"""The architecture of a DeepSeek-V3 / Kimi-K2 network, with the field names of `transformers`.

Every field keeps the name it has in the released `config.json` of DeepSeek-V3 and Kimi K2, so a
config exported by Chogori loads in `transformers`, vLLM and SGLang, and a released config loads here.
Fields that exist only for training (balance loss, bias update speed, capacity) are marked below and are
not written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def closest_key(name: str, valid: list[str]) -> str | None:
    """The valid key most like `name`, for 'did you mean' messages."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_message(name: str, valid: list[str], where: str) -> str:
    hint = closest_key(name, valid)
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    return f"unknown key '{name}' in {where}{suggestion} (valid keys: {', '.join(sorted(valid))})"


@dataclass
class ModelConfig:
    # --- size -------------------------------------------------------------------------------------
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the first `first_k_dense_replace` dense layers
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1  # layers [0, k) use a dense FFN, the rest are MoE
    # --- attention (MLA) --------------------------------------------------------------------------
    num_attention_heads: int = 64
    num_key_value_heads: int | None = None  # MLA: null or equal to num_attention_heads
    q_lora_rank: int | None = 1536  # None: queries are projected directly (no low-rank q)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 50000.0
    # YaRN, in the released layout: {"type": "yarn", "factor": 32.0, "original_max_position_embeddings":
    # 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    # --- mixture of experts -----------------------------------------------------------------------
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    n_group: int = 1  # experts are split into n_group groups; a token may use only topk_group of them
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # --- misc -------------------------------------------------------------------------------------
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # DeepSeek-V3 paper: all weights N(0, 0.006)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # --- training-only (not part of the released config.json) ------------------------------------
    aux_loss_alpha: float = 1e-4  # weight of the sequence-wise balance loss (DeepSeek-V3: 1e-4)
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free bias update
    capacity_factor: float | None = None  # None: dropless; else drop tokens over capacity
    # sdpa: the fused path (flex_attention on CUDA, SDPA + a chunked max logit elsewhere), no [S, S] per head;
    # eager: the full score matrix, the reference the tests compare against
    attn_impl: str = "sdpa"
    # A checkpoint in the released layout (config.json + safetensors) whose weights a new run starts from
    # (continued pretraining) instead of the random init; a resumed run takes its own checkpoint's weights.
    init_from: str | None = None

    TRAINING_ONLY = ("aux_loss_alpha", "bias_update_speed", "capacity_factor", "attn_impl", "init_from")

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # --- derived sizes ----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)**2 as DeepSeek-V3 does."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            factor = self.rope_scaling["factor"]
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError `model.<field>: <what is wrong and what is allowed>` for the first bad field."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"{self.first_k_dense_replace} must lie in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, "intermediate_size",
                 f"must be > 0 when there are dense layers, got {self.intermediate_size}")
        need(self.num_key_value_heads in (None, self.num_attention_heads), "num_key_value_heads",
             f"MLA needs null or num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             f"must be a positive int or null, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        need(self.hidden_act == "silu", "hidden_act", f"must be 'silu', got '{self.hidden_act}'")
        need(self.scoring_func == "sigmoid", "scoring_func", f"must be 'sigmoid', got '{self.scoring_func}'")
        need(self.attn_impl in ("eager", "sdpa"), "attn_impl", f"must be 'eager' or 'sdpa', got '{self.attn_impl}'")
        # NaN fails every comparison below, so these also refuse NaN.
        for name in ("rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("aux_loss_alpha", "bias_update_speed"):
            need(getattr(self, name) >= 0, name, f"must be >= 0 (0 disables it), got {getattr(self, name)}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(value is None or 0 <= value < self.vocab_size, name,
                 f"must be null or in [0, vocab_size={self.vocab_size}), got {value}")
        if self.num_moe_layers > 0:
            e, k = self.n_routed_experts, self.num_experts_per_tok
            need(e > 0, "n_routed_experts", f"must be > 0 when there are MoE layers, got {e}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size",
                 f"must be > 0 when there are MoE layers, got {self.moe_intermediate_size}")
            need(0 < k <= e, "num_experts_per_tok", f"{k} must lie in [1, n_routed_experts={e}]")
            need(self.n_group >= 1 and e % self.n_group == 0, "n_group",
                 f"n_routed_experts={e} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"{self.topk_group} must lie in [1, n_group={self.n_group}]")
            if self.n_group > 1:
                need(e // self.n_group >= 2, "n_group", f"{self.n_group} leaves fewer than 2 experts per group "
                     "(groups are scored by their top-2 experts); lower it")
            need(k <= self.topk_group * (e // self.n_group), "num_experts_per_tok",
                 f"{k} exceeds the experts in topk_group={self.topk_group} groups "
                 f"({self.topk_group * (e // self.n_group)}); raise topk_group or lower num_experts_per_tok")
            need(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
            need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                 f"must be null (dropless) or > 0, got {self.capacity_factor}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind == "yarn", "rope_scaling", f"type must be 'yarn' (or rope_scaling null), got {kind!r}")
            need("factor" in self.rope_scaling and "original_max_position_embeddings" in self.rope_scaling,
                 "rope_scaling", "needs 'factor' and 'original_max_position_embeddings'")

    # --- (de)serialization ------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, ignore_unknown: bool = False) -> ModelConfig:
        """Build from a dict; an unknown key is an error naming the closest valid key."""
        valid = cls.field_names()
        kwargs = {}
        for key, value in d.items():
            if key in valid:
                kwargs[key] = value
            elif not ignore_unknown:
                raise ConfigError(unknown_key_message(key, valid, "model config"))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

