"""The whole network: embeddings, decoder blocks (MLA + dense FFN or MoE), final norm, LM head.

A plain single-process `nn.Module` named like `transformers`' DeepseekV3ForCausalLM (minus its `model.`
prefix), so checkpoint conversion is a rename. Parallelism (FSDP2, expert parallelism, activation
checkpointing) is applied to it from outside by parallel/.

Meta-device construction::

    with torch.device("meta"):
        model = Transformer(cfg)        # no memory allocated
    model.to_empty(device="cuda")
    model.init_weights()                # documented init, recomputes the rotary buffers
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from models.attention import AttentionMask, MLAttention
from models.config import ModelConfig
from models.layers import MLP, RMSNorm, RotaryEmbedding
from models.moe import MoE
from models.stats import StatsBuckets


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    balance_loss: torch.Tensor  # scalar, already weighted by aux_loss_alpha; 0 in eval or without MoE


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size,
                                                                                cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + y, aux


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within documents as a dense bool [B, 1, S, S], True where query i may attend to key j.
    A reference only: the model passes `AttentionMask(document_ids)`, which never builds this [S, S] tensor
    outside `attn_impl: eager`."""
    s = document_ids.shape[-1]
    return AttentionMask(document_ids).rows(0, s, s, document_ids.device)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, rotary: RotaryEmbedding,
               positions: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [B, S, H] through `blocks` in order -> (hidden states, summed balance loss). The whole
    model runs all its blocks; a pipeline stage (parallel/pipeline.py) runs its own."""
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device)
    rope = rotary(positions, x.dtype)
    # O(B*S) ids, not a dense mask; built once so the CUDA path's BlockMask is shared by all layers
    mask = AttentionMask(document_ids)
    balance = torch.zeros((), device=x.device, dtype=torch.float32)
    for block in blocks:
        x, aux = block(x, rope, mask)
        balance = balance + aux
    return x, balance


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # `_weight`: no N(0, 1) fill at construction, which init_weights overwrites anyway; on the meta device that
        # fill would import torch._dynamo (~1.3 s of every process's start-up: meta `normal_` runs a decomposition).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rotary = RotaryEmbedding(cfg)
        # A ModuleDict keyed by layer index keeps names ("layers.7") stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids: [B, S] -> logits [B, S, vocab] (in the compute dtype) and the balance loss.

        `positions` ([S] or [B, S]) are the rotary positions (default 0..S-1). `document_ids` ([B, S]) turn
        on document masking for packed sequences: a token attends only to earlier tokens of its own document
        (pass positions that restart at each document too; `data.loader.document_positions` gives both).
        """
        x, balance = run_blocks(self.layers.values(), self.embed_tokens(input_ids), self.rotary, positions,
                                document_ids)
        return ModelOutput(logits=self.lm_head(self.norm(x)), balance_loss=balance)

    # --- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | torch.Generator | None = None, *,
                     generator: torch.Generator | None = None, parameters: bool = True) -> None:
        """Init scheme (DeepSeek-V3 paper, sec. 4.2): every matrix — embeddings, attention and FFN
        projections, stacked experts, router, LM head — ~ N(0, initializer_range=0.006); norm weights 1;
        biases and the router correction bias 0. Also rebuilds the non-persistent buffers (rotary
        frequencies, statistics), which `to_empty` leaves uninitialised after meta construction.

        The random values come from `models.init.init_normal_`: a pure function of (seed, parameter name
        in the unwrapped model, global element index). Parameters may be plain tensors or DTensors
        (FSDP2, expert parallelism): each rank fills only its shard, with exactly the values the same
        rows have in a single-process init, so the weights do not depend on the world size or on the
        wrappers (activation checkpointing, torch.compile) applied to the model.

        `parameters=False` rebuilds the buffers only, for weights about to be loaded from a checkpoint.

        `seed`: the run's seed. `generator` (kept for old callers) stands for `generator.initial_seed()`.
        With neither, a seed is drawn from torch's global RNG, so `torch.manual_seed(s); Transformer(cfg)`
        stays reproducible."""
        from models.init import canonical_name, fill_, init_normal_

        if isinstance(seed, torch.Generator):  # old positional call: init_weights(generator)
            seed, generator = None, seed
        if seed is None:
            seed = generator.initial_seed() if generator is not None else int(torch.randint(2**62, (1,)))
        if (self.cfg.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None
                and self.lm_head.weight is not self.embed_tokens.weight):
            self.lm_head.weight = self.embed_tokens.weight  # `to_empty` after meta construction unties them
        std = self.cfg.initializer_range
        for name, p in self.named_parameters() if parameters else ():
            name = canonical_name(name)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                fill_(p, 1.0)
            elif p.dim() == 1:
                fill_(p, 0.0)
            else:
                init_normal_(p, name, seed, std)
        self.rotary.reset_parameters()
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
            moe.reset_stats()
        self.reset_max_logits()

    # --- statistics for the trainer / optimizer -------------------------------------------------
    # Each layer keeps its own (models/stats.py); these methods are the one place that walks the layers, so
    # the trainer and the optimizer hooks never do.
    @torch.no_grad()
    def reset_stats(self) -> None:
        """Start a step: zero the expert loads and dropped copies, forget the max logits."""
        for moe in self.moe_layers():
            moe.reset_stats()
        self.reset_max_logits()

    @torch.no_grad()
    def stats_buckets(self) -> StatsBuckets:
        """This step's statistics so far as one flat tensor per reduction op (copies)."""
        moe = dict(self._moe_items())
        loads = [m.expert_load.double() for m in moe.values()]
        dropped = [m.dropped_tokens.double().reshape(1) for m in moe.values()]
        device = self.rotary.inv_freq.device
        heads = [b.self_attn.max_logit.float() for b in self.layers.values()]
        return StatsBuckets(
            sum=torch.cat(loads + dropped) if moe else torch.zeros(0, dtype=torch.float64, device=device),
            max=torch.cat(heads) if heads else torch.zeros(0, device=device),
            moe_layers=list(moe), layers=[int(i) for i in self.layers],
            num_experts=self.cfg.n_routed_experts, num_heads=self.cfg.num_attention_heads)

    @torch.no_grad()
    def load_stats(self, buckets: StatsBuckets) -> None:
        """Take reduced statistics back (e.g. summed / maxed over data-parallel ranks), so that what reads
        the layers next (the router-bias update, QK-Clip) sees global values."""
        moe = dict(self._moe_items())
        if list(moe) != buckets.moe_layers or [int(i) for i in self.layers] != buckets.layers:
            raise ValueError("statistics of another set of layers")
        for m, load, dropped in zip(moe.values(), buckets.expert_load(), buckets.dropped(), strict=True):
            m.expert_load.copy_(load)
            m.dropped_tokens.copy_(dropped)
        for b, row in zip(self.layers.values(), buckets.max_logit(), strict=True):
            b.self_attn.max_logit.copy_(row)

    def _moe_items(self) -> Iterator[tuple[int, MoE]]:
        for name, block in self.layers.items():
            if isinstance(block.mlp, MoE):
                yield int(name), block.mlp

    def router_bias_spread(self) -> torch.Tensor:
        """[L_moe] max - min of each MoE layer's correction bias (a device tensor; no host sync)."""
        biases = [m.gate.e_score_correction_bias for _, m in self._moe_items()]
        if not biases:
            return torch.zeros(0, device=self.rotary.inv_freq.device)
        b = torch.stack(biases)
        return b.amax(dim=1) - b.amin(dim=1)

    def attention_layers(self) -> Iterator[MLAttention]:
        for block in self.layers.values():
            yield block.self_attn

    def moe_layers(self) -> Iterator[MoE]:
        for block in self.layers.values():
            if isinstance(block.mlp, MoE):
                yield block.mlp

    def max_logits(self) -> dict[int, torch.Tensor]:
        """Per-head max attention logit of each layer since the last reset (QK-Clip's input); copies."""
        return {int(i): b.self_attn.max_logit.clone() for i, b in self.layers.items()}

    def reset_max_logits(self) -> None:
        for attn in self.attention_layers():
            attn.reset_max_logit()

    @torch.no_grad()
    def update_router_biases(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """Apply the auxiliary-loss-free bias update to every MoE layer from the load seen since the last
        call. `reduce` (e.g. an all-reduce sum over data-parallel ranks, supplied by parallel/) makes the
        load global so that every rank applies the same update. Returns the load used per layer."""
        loads = {}
        for block_idx, block in self.layers.items():
            if isinstance(block.mlp, MoE):
                load = block.mlp.expert_load.clone()
                if reduce is not None:
                    load = reduce(load)
                block.mlp.update_bias(load)
                loads[int(block_idx)] = load
        return loads

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.embed_tokens is not None:
            n -= self.embed_tokens.weight.numel()
        return n
