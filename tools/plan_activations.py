"""Activation memory of one micro-batch, counted analytically from the model config, and measured.

**What "activation memory" means here**: the bytes of every tensor the forward of one micro-batch (model and
loss, as the trainer computes it) leaves allocated for the backward, at the moment the forward ends (the
peak of what the forward holds), excluding parameters and buffers. Each storage counts once, however many
views or autograd nodes share it. The backward then adds, transiently, one block's recomputed activations
(under `selective` / `full`) and the gradients; those are reported apart, not in the figure.

Under each `parallel.activation_checkpointing` policy (parallel/fsdp.py):

- `none`: autograd keeps what each op needs: the inputs of every matmul, the fp32 copies RMSNorm makes, SwiGLU's
  gate / SiLU / up / product, SDPA's q, k, v, output and log-sum-exp, the router's fp32 scores, the experts'
  gate and up projections (their SiLU and product are recomputed), the int64 routing indices.
- `selective`: per block, the block's input (kept by the checkpoint) and the outputs of mm / addmm / bmm /
  SDPA / grouped GEMM / all-to-all (kept by selective checkpointing); everything else is recomputed.
- `full`: per block, only its input.

Outside the blocks (every policy): the rotary cos/sin, the final RMSNorm's saved tensors, the LM head's input
and the loss's fp32 log-softmax [tokens, vocab].

`activation_memory` is the count; `measure_activation_bytes` runs a real forward of models.Transformer on the
CPU (with parallel.fsdp.apply_activation_checkpointing applied) and adds up the storages created during the
forward that are still alive after it — what tests/test_plan.py compares the count with.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.config import ModelConfig

POLICIES: tuple[str, ...] = ("none", "selective", "full")
FP32, INT64, INT32 = 4, 8, 4


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes held for backward after the forward of one micro-batch on one rank."""

    policy: str
    tokens: int  # micro_batch * seq_len
    dense_layer: int  # one dense-FFN block
    moe_layer: int  # one MoE block (balanced routing: tokens * k copies on this rank)
    outside: int  # rotary tables, final norm, LM head input, loss log-softmax
    total: int
    recompute_block: int  # transient in backward: the largest block's `none` activations, re-run (0 for none)
    parts: dict[str, int] = field(default_factory=dict)  # named terms of one dense and one MoE block


def _norm(t: int, d: int, c: int) -> int:
    """RMSNorm over [t, d] in compute bytes c: the fp32 input (its `.float()` copy, or the input itself in
    fp32), the rsqrt [t, 1] and the normalized input cast back to c (the gain multiplies it)."""
    return t * d * FP32 + t * FP32 + t * d * c


def activation_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, policy: str, compute_bytes: int = 2,
                      ep: int = 1, training: bool = True) -> ActivationEstimate:
    """Analytic activation bytes of one micro-batch of `micro_batch` x `seq_len` tokens under `policy`, with
    activations in `compute_bytes` (2: bf16, FSDP2's param_dtype; 4: fp32). Routing is assumed balanced and
    dropless (each rank's grouped GEMMs see tokens * k copies); `ep` > 1 adds, under `none`, one more copy of
    the routed rows and two int64 orders per MoE layer (measured on a gloo expert-parallel run)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{policy}'")
    c = compute_bytes
    b, s = micro_batch, seq_len
    t = b * s
    hid, h, v = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    dn, dr, dv, rkv, rq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    dqk = dn + dr
    hd = max(dqk, dv)  # SDPA runs at one head dim: the smaller of v / (q, k) is zero-padded to it
    k = cfg.num_experts_per_tok
    e = cfg.n_routed_experts
    n = t * k  # routed token copies on this rank (balanced)
    moe_i, shared_i = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    eager = cfg.attn_impl == "eager"

    attn: dict[str, int] = {}
    dense: dict[str, int] = {}
    moe: dict[str, int] = {}
    if policy == "none":
        attn["input_layernorm"] = _norm(t, hid, c)
        attn["normed input (q/kv down-projection input)"] = t * hid * c
        if rq is not None:
            attn["q_a_layernorm + q_b input"] = _norm(t, rq, c) + t * rq * c
        # in fp32 the norm's input is a view of kv_a's output, which keeps the rotary key columns too
        kv_a = _norm(t, rkv, c) + (t * dr * FP32 if c == FP32 else 0)
        attn["kv_a_layernorm + kv_b input"] = kv_a + t * rkv * c
        kv_storage = t * h * (dn + dv) * c  # kv_b's output; v is a view of it
        if eager:
            attn["q, k"] = 2 * t * h * dqk * c
            attn["v (the matmul's contiguous copy)"] = t * h * dv * c
            attn["causal mask (bool S x S)"] = s * s
            attn["softmax fp32 + probs"] = b * h * s * s * (FP32 + (c if c != FP32 else 0))
        else:
            qk = t * h * hd * c
            attn["q, k (rope applied, padded to one head dim)"] = 2 * qk
            attn["v (padded copy, or kv_b output)"] = t * h * dqk * c if dv < dqk else kv_storage
            attn["sdpa output + logsumexp"] = t * h * hd * c + t * h * FP32
        attn["o_proj input"] = t * h * dv * c
        attn["post_attention_layernorm"] = _norm(t, hid, c)
        dense["FFN input"] = t * hid * c
        dense["SwiGLU gate, silu, up, product"] = 4 * t * cfg.intermediate_size * c
        if c != FP32:
            moe["router fp32 input + fp32 weight copy"] = t * hid * FP32 + e * hid * FP32
        moe["router scores (fp32)"] = t * e * FP32
        moe["top-k ids, weights"] = t * k * INT64 + (t * k * FP32 + t * FP32 if cfg.norm_topk_prob else 0)
        if training and cfg.aux_loss_alpha > 0:
            moe["balance loss (score sums, f)"] = t * FP32 + b * e * FP32
        moe["sort order, token ids, sorted weights"] = n * (INT64 + INT64 + FP32)
        moe["expert gate, up (SiLU and the product are recomputed in the backward)"] = 2 * n * moe_i * c
        moe["grouped-GEMM counts, offsets"] = (e // ep) * (INT64 + INT32)
        if cfg.n_shared_experts or c == FP32:
            moe["FFN input"] = t * hid * c
        if cfg.n_shared_experts:
            moe["shared expert gate, silu, up, product"] = 4 * t * shared_i * c
        # Without EP the experts gather the token copies and sum them back inside (models.moe._ExpertFFN): no copy
        # is kept. With EP (measured on a gloo EP run, tests): the gathered copies around the all-to-all, the rows
        # the experts received, the rows returned (the combine scales them by their gates on the source rank), and
        # 2 regroup orders.
        if ep > 1:
            moe["EP: copies sent, rows received, rows returned, regroup orders"] = 3 * n * hid * c + 2 * n * INT64
    else:
        attn["block input (kept by the checkpoint)"] = t * hid * c
        if policy == "selective":
            q_proj = t * rq * c + t * h * dqk * c if rq is not None else t * h * dqk * c
            attn["q projections (mm outputs)"] = q_proj
            attn["kv projections (mm outputs)"] = t * (rkv + dr) * c + t * h * (dn + dv) * c
            if eager:
                attn["scores, p.v (bmm outputs)"] = b * h * s * s * c + t * h * dv * c
            else:
                attn["sdpa output + logsumexp"] = t * h * hd * c + t * h * FP32
            attn["o_proj output"] = t * hid * c
            dense["gate, up, down (mm outputs)"] = 2 * t * cfg.intermediate_size * c + t * hid * c
            moe["router scores (mm output, fp32)"] = t * e * FP32
            moe["expert gate, up, down (grouped GEMM outputs)"] = 2 * n * moe_i * c + n * hid * c
            if cfg.n_shared_experts:
                moe["shared gate, up, down (mm outputs)"] = 2 * t * shared_i * c + t * hid * c
            if ep > 1:  # selective keeps the all-to-alls' results (parallel/fsdp.py): the recompute sends nothing
                moe["EP: all-to-all results (split sizes, rows received, rows returned)"] = e * INT64 + 2 * n * hid * c

    dense_layer = sum(attn.values()) + sum(dense.values())
    moe_layer = sum(attn.values()) + sum(moe.values())
    outside = {
        "rotary cos/sin": s * dr * c,
        "final norm": _norm(t, hid, c),
        "LM head input": t * hid * c,
        "loss log-softmax (fp32)": t * v * FP32,
    }
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.num_moe_layers
    total = n_dense * dense_layer + n_moe * moe_layer + sum(outside.values())
    recompute = 0
    if policy != "none":
        base = activation_memory(cfg, micro_batch, seq_len, "none", c, ep, training)
        recompute = max(base.dense_layer if n_dense else 0, base.moe_layer if n_moe else 0)
    parts = {f"attention: {k_}": v_ for k_, v_ in attn.items()}
    parts.update({f"dense FFN: {k_}": v_ for k_, v_ in dense.items()})
    parts.update({f"MoE: {k_}": v_ for k_, v_ in moe.items()})
    parts.update({f"outside blocks: {k_}": v_ for k_, v_ in outside.items()})
    return ActivationEstimate(policy=policy, tokens=t, dense_layer=dense_layer, moe_layer=moe_layer,
                              outside=sum(outside.values()), total=total, recompute_block=recompute, parts=parts)


# --- measurement --------------------------------------------------------------------------------------------
class _StorageTracker(TorchDispatchMode):
    """Records (a weak reference to) the storage of every tensor an op returns, once per storage."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.device.type != "meta":
                st = x.untyped_storage()
                key = id(st)
                if key in self.exclude:
                    continue
                seen = self.storages.get(key)
                if seen is None or seen[0]() is not st:  # new, or an id reused after the old storage died
                    self.storages[key] = (weakref.ref(st), st.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.storages.values() if ref() is not None)


def measure_activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, policy: str,
                             dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Bytes of the storages created by a real forward (model + the trainer's loss) that are alive once it
    ends, parameters and buffers excluded — what the forward leaves for the backward. The model runs on the
    CPU in `dtype` (bf16 stands for FSDP2's bf16 param_dtype: activations in bf16, the router and norms
    upcasting to fp32 as they do on the GPU) with `policy` applied by parallel.fsdp."""
    from models.transformer import Transformer
    from parallel.fsdp import apply_activation_checkpointing

    torch.manual_seed(seed)
    model = Transformer(cfg).to(dtype)
    apply_activation_checkpointing(model, policy)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    return measure_forward_bytes(model, ids, torch.randint(0, cfg.vocab_size, (micro_batch, seq_len)))


def measure_forward_bytes(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """`measure_activation_bytes` for a model already built and wrapped (e.g. expert-parallel on a real
    process group): bytes alive after `model(ids)` and the loss, parameters, buffers and inputs excluded."""
    held = [t.untyped_storage() for t in (*model.parameters(), *model.buffers(), ids, targets)]
    held += [t.to_local().untyped_storage() for t in model.parameters() if hasattr(t, "to_local")]
    tracker = _StorageTracker({id(st) for st in held})
    with tracker:
        out = model(ids)
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        loss = lm + out.balance_loss
        del out, lm
    gc.collect()
    nbytes = tracker.alive_bytes()
    del loss  # frees the graph; no backward is needed to know what it would have read
    return nbytes
