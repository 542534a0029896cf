"""The DeepSeek-V3 Mixture-of-Experts layer: sigmoid router with group-limited top-k and the
auxiliary-loss-free correction bias, stacked routed experts run as one grouped GEMM, a shared expert.

The token path is split into seams so expert parallelism can be applied from outside (parallel/):
`route` -> `permute` (one sort of the token copies by expert) -> `experts(tokens, counts, gates, token_idx)`,
which gathers the copies, runs the grouped GEMMs, applies the gates and sums each token's copies back
(`sum_copies` is that sum, standalone). Expert parallelism hooks only that call: its pre-hook gathers the
copies and sends them by all-to-all, the local experts run on what arrives, and its post-hook sends the rows
back, applies the gates and sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.dtensor import local
from models.layers import MLP
from models.stats import is_recomputing


class Router(nn.Module):
    """Sigmoid scores; top-k chosen on `scores + e_score_correction_bias` within the best `topk_group`
    groups; gating weights are the *unbiased* scores of the chosen experts (DeepSeek-V3, eq. 16-20).

    The bias is a buffer: it is never trained by gradients, only nudged by `MoE.update_bias`.

    `force_balanced` (off by default; set it with `forced_balanced_routing`, for benchmarks only) replaces the
    top-k choice with a fixed balanced one: token t's k experts are (t*k + j) mod E, j < k, so every expert gets
    the same number of copies whenever T*k is a multiple of E. The gating weights are still the router's
    scores gathered at those experts, so the FLOPs and the backward are those of a real step.
    """

    force_balanced: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (scores [T, E] fp32, topk_idx [T, k], topk_weight [T, k] fp32)."""
        cfg = self.cfg
        # DeepSeek-V3 scores in fp32: a bf16 GEMM here flips near-tied top-k choices for many tokens. `.float()`
        # alone is not enough, since autocast would run F.linear in bf16 anyway, so autocast is off for the
        # scoring; the weight is cast up too, so a bf16 copy of it (a bf16 parameter policy) still meets an fp32 GEMM.
        # (Only where autocast exists for the device: torch.autocast rejects e.g. "meta" outright.)
        no_autocast = torch.amp.is_autocast_available(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False) if no_autocast else nullcontext():
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        if self.force_balanced:
            topk_idx = balanced_topk(x.shape[0], cfg.num_experts_per_tok, cfg.n_routed_experts, x.device)
        else:
            topk_idx = self._choose(scores)
        weight = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, weight * cfg.routed_scaling_factor

    @torch.no_grad()
    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The natural top-k: biased scores, group-limited."""
        cfg = self.cfg
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            top_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)
        return choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices


def balanced_topk(num_tokens: int, k: int, num_experts: int, device: torch.device | str) -> torch.Tensor:
    """[T, k] expert ids (t*k + j) mod E: consecutive, so distinct per token while k <= E, and every expert
    gets exactly T*k/E copies when E divides T*k."""
    return torch.arange(num_tokens * k, device=device).view(num_tokens, k) % num_experts


@contextmanager
def forced_balanced_routing(model: nn.Module) -> Iterator[None]:
    """Every `Router` in `model` routes with `balanced_topk` inside the block (the routing peers' MFU figures
    assume); the previous setting is restored on exit."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    before = [r.force_balanced for r in routers]
    for r in routers:
        r.force_balanced = True
    try:
        yield
    finally:
        for r, b in zip(routers, before, strict=True):
            r.force_balanced = b


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands (x: [N, K]; w: [G, out, in], or [N, out] for a weight
    gradient): it rejects other dtypes (e.g. float64) and rows whose stride is not a multiple of 16 bytes
    (e.g. hidden 36 in fp32)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    if x.dtype not in dtypes:
        return False
    dims = [x.shape[-1], w.shape[-1]] + ([w.shape[-2]] if w.ndim == 3 else [])
    return all(d * x.element_size() % 16 == 0 for d in dims)


@torch.library.custom_op("chogori::grouped_mm", mutates_args=())
def _grouped_mm_any_dtype(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` as an op of its own for torch.compile: torch 2.13's fake-tensor rule for it accepts
    only bf16 operands, although the CPU kernel runs fp32 and fp16 too. (A custom op rather than
    `torch.compiler.disable`: no graph break, and no import of torch._dynamo, 1.3 s, in every eager process.)"""
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_any_dtype.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.ndim == 3:  # rows [N, K] times a [K, out] block per group -> [N, out]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # a weight gradient: [G, out, in]


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None = None,
                   transpose: bool = True) -> torch.Tensor:
    """Row block g of `x` (counts[g] rows, blocks in order) times w[g].T (`transpose`: the forward of a layer
    stored [G, out, in]) or times w[g] (not `transpose`: its input gradient). `offs`: the int32 cumulative
    counts, when the caller has them already.

    One `torch._grouped_mm` call where this build has it (CUDA bf16 and CPU both do in torch >= 2.8) and
    the kernel accepts the operands (fp32/bf16/fp16 on CPU, bf16 on CUDA, rows 16-byte aligned);
    otherwise a loop over the groups, which is the same math.
    """
    if _grouped_mm_ok(x, w):
        if not transpose and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # oneDNN's CPU bf16 GEMM is ~5x slower on an untransposed right operand (bench/moe_layer.py); a
            # transposed copy of the weights costs far less. CUDA's grouped GEMM takes either layout as is.
            w = w.transpose(-2, -1).contiguous().transpose(-2, -1)
        return _grouped_mm(x, w.transpose(-2, -1) if transpose else w, _offsets(counts, offs))
    out, start = [], 0
    for g, n in enumerate(counts.tolist()):
        out.append(x[start:start + n] @ (w[g].t() if transpose else w[g]))
        start += n
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-2] if transpose else w.shape[-1])


def grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor,
                        offs: torch.Tensor | None = None) -> torch.Tensor:
    """The [G, out, in] weight gradient of `grouped_matmul(x, w, counts)` given its output gradient `dy`:
    block g is dy_g.T @ x_g, a contraction over group g's rows (zeros for a group without rows)."""
    if _grouped_mm_ok(x, dy):
        return _grouped_mm(dy.t(), x, _offsets(counts, offs))
    out, start = [], 0
    for n in counts.tolist():
        out.append(dy[start:start + n].t() @ x[start:start + n])
        start += n
    return torch.stack(out) if out else dy.new_zeros(0, dy.shape[-1], x.shape[-1])


def _offsets(counts: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    return torch.cumsum(counts, 0, dtype=torch.int32) if offs is None else offs


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # Under compile on CPU bf16 as well: inductor, tracing `_grouped_mm` itself, drops the transposed weight copy
    # `grouped_matmul` makes for oneDNN (a no-op re-layout to it), and the step ran 2x slower (bench/moe_layer.py
    # --compile); the custom op keeps its operands' strides.
    if torch.compiler.is_compiling() and (a.dtype != torch.bfloat16 or a.device.type == "cpu"):
        return _grouped_mm_any_dtype(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


class _ExpertFFN(torch.autograd.Function):
    """The routed experts' SwiGLU per expert block g: y_g = (silu(x_g Wg_g^T) * (x_g Wu_g^T) * r) Wd_g^T, with
    gate and up stacked as one [G, 2I, H] weight, so both projections are one grouped GEMM each way.

    With `token_idx` the function also does the permutation around it: the rows are gathered from the tokens
    `x` [T, H] (row i is x[token_idx[i]]) and the outputs summed back onto their tokens, returning [T, H]; without
    it `x` is the sorted rows themselves and the output is per row (expert parallelism, where the rows arrive by
    all-to-all and return the same way).

    Written out because autograd would keep the gathered rows, silu(gate), the product, the scaled product and
    the rows summed back for the backward, and run each step as its own pass both ways. This keeps only x and the
    [N, 2I] projection (the rest is recomputed in the backward), applies the routing weight r to the [N, I]
    activation rather than to the [N, H] output (the same sum, fewer bytes: I < H in every preset), and orders
    the backward for its peak: the weight gradients pile up, so each is made when the fewest [N, *] intermediates
    (and, on CPU in bf16, transposed weight copies) are alive."""

    @staticmethod
    def forward(ctx, x, token_idx, scale, counts, gate_up, down):  # type: ignore[override]
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x if token_idx is None else x.index_select(0, token_idx)  # (1.6-2.4x faster than x[idx] on CPU)
        gu = grouped_matmul(rows, gate_up, counts, offs)
        del rows
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g).mul_(u)
        if scale is not None:
            h.mul_(scale.unsqueeze(-1).to(h.dtype))
        ctx.save_for_backward(x, token_idx, scale, counts, offs, gate_up, down, gu)
        y = grouped_matmul(h, down, counts, offs)
        return y if token_idx is None else y.new_zeros(x.shape).index_add_(0, token_idx, y)

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        x, token_idx, scale, counts, offs, gate_up, down, gu = ctx.saved_tensors
        dy = d_out.contiguous() if token_idx is None else d_out.index_select(0, token_idx)
        g, u = gu.chunk(2, dim=-1)
        silu = F.silu(g)
        act = silu * u
        dh = grouped_matmul(dy, down, counts, offs, transpose=False)
        d_scale = None
        if scale is not None:
            if ctx.needs_input_grad[2]:
                d_scale = torch.linalg.vecdot(dh, act).to(scale.dtype)
            dh.mul_(scale.unsqueeze(-1).to(dh.dtype))
        if torch.compiler.is_compiling():  # dynamo rejects a non-contiguous out= (a graph break); inductor fuses this
            d_gu = torch.cat([torch.ops.aten.silu_backward(dh * u, g), dh * silu], dim=-1)
        else:  # eager: both halves written in place, no [N, I] temporaries and no concatenation pass
            d_gu = torch.empty_like(gu)
            d_g, d_u = d_gu.chunk(2, dim=-1)
            torch.mul(dh, silu, out=d_u)
            torch.ops.aten.silu_backward.grad_input(dh.mul_(u), g, grad_input=d_g)
            del d_g, d_u
        del silu, dh
        # The input gradient first (summed onto the tokens, its [N, H] rows are gone before the weight gradients),
        # then the larger weight gradient, then down's.
        d_rows = grouped_matmul(d_gu, gate_up, counts, offs, transpose=False)
        dx = d_rows if token_idx is None else d_rows.new_zeros(x.shape).index_add_(0, token_idx, d_rows)
        del d_rows
        rows = x if token_idx is None else x.index_select(0, token_idx)
        d_gate_up = grouped_weight_grad(d_gu, rows, counts, offs)
        del rows, d_gu
        h = act if scale is None else act.mul_(scale.unsqueeze(-1).to(act.dtype))
        return dx, None, d_scale, None, d_gate_up, grouped_weight_grad(dy, h, counts, offs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked so that one grouped GEMM runs them all and expert parallelism shards them on
    dim 0: `gate_up_proj` [E, 2, I, H] (gate and up, nn.Linear's [out, in] each) and `down_proj` [E, H, I].

    Gate and up share one tensor so that they are one [E, 2I, H] GEMM operand (a view, no copy), and the
    leading [E, 2] keeps them 2E separate matrices to the optimizer (Muon orthogonalizes each on its own) and to
    checkpoint export (`gate_proj` and `up_proj` per expert)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None,
                token_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Without `token_idx`: x [N, H] token copies sorted by expert, counts [E_local] rows per expert, scale an
        optional [N] weight per row (the routing weight) -> [N, H], one output row per input row.

        With `token_idx` [N] (the token of each sorted copy): x is the tokens [T, H] -> [T, H], each token's
        weighted sum over its copies; the copies are gathered and summed inside (`_ExpertFFN`).

        Under expert parallelism the weights are DTensors sharded on the expert dim; the GEMMs run on this
        rank's local experts: the dispatch hooks of parallel/ have already gathered the copies and brought this
        rank's here (and call this without `token_idx`)."""
        gate_up, down = local(self.gate_up_proj), local(self.down_proj)
        return _ExpertFFN.apply(x, token_idx, scale, counts, gate_up.flatten(1, 2), down)


@dataclass
class Dispatch:
    """Where each routed token copy went: enough to undo the permutation and weight the outputs."""

    token_idx: torch.Tensor  # [N] source token of each sorted copy
    weight: torch.Tensor  # [N] gating weight of each sorted copy
    counts: torch.Tensor  # [E] copies per expert (after capacity drops)
    dropped: torch.Tensor | int  # copies dropped by the capacity factor (0 when dropless); a device scalar


def permute(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int,
            capacity: int | None = None) -> Dispatch:
    """Sort token copies by expert (stable, so token order is kept inside an expert); with a capacity,
    keep each expert's first `capacity` copies in token order and drop the rest — deterministic."""
    k = topk_idx.shape[1]
    flat = topk_idx.flatten()
    order = torch.argsort(flat, stable=True)
    # A scatter-add, not torch.bincount: CUDA's bincount reads the input's max on the host to size its output (a
    # device->host sync per MoE layer), and torch.compile sees a data-dependent output shape (a graph break unless
    # dynamic output shapes are captured); this has neither.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    dropped = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        keep = rank_in_expert < capacity
        dropped = (~keep).sum()
        order = order[keep]  # a data-dependent size: the one host sync of capacity dropping (dropless has none)
        counts = counts.clamp(max=capacity)
    return Dispatch(token_idx=order // k, weight=topk_weight.flatten()[order], counts=counts, dropped=dropped)


def sum_copies(y: torch.Tensor, token_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, H]: row t is the sum of the rows y[i] with token_idx[i] == t."""
    return _SumCopies.apply(y, token_idx, num_tokens)


class _SumCopies(torch.autograd.Function):
    """out[t] = sum of the rows y[i] with token_idx[i] == t. `index_add_` under autograd would keep y itself for
    its backward (an [N, H] activation per MoE layer); the backward needs only the indices."""

    @staticmethod
    def forward(ctx, y, token_idx, num_tokens):  # type: ignore[override]
        ctx.save_for_backward(token_idx)
        return y.new_zeros(num_tokens, y.shape[-1]).index_add_(0, token_idx, y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (token_idx,) = ctx.saved_tensors
        return grad.index_select(0, token_idx), None, None


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), without alpha:
    sum_i f_i * P_i per sequence, averaged over sequences, where f_i = E/(k*S) * (tokens choosing i) and
    P_i is the mean over the sequence of the normalized scores s_i / sum_j s_j."""
    tokens, num_experts = scores.shape
    seq = tokens // batch
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, seq, num_experts).mean(dim=1)
    hits = torch.zeros(batch, num_experts, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, topk_idx.view(batch, seq * k), torch.ones_like(topk_idx, dtype=scores.dtype).view(
        batch, seq * k))
    f = hits * (num_experts / (k * seq))
    return (f * probs).sum(dim=-1).mean()


class MoE(nn.Module):
    """Routed experts + shared experts. Returns (output, balance loss * aux_loss_alpha).

    While training it accumulates `expert_load` (token copies per expert, since the last bias update) and
    `dropped_tokens`, once per forward: not again when activation checkpointing recomputes it
    (`models.stats.recomputing`). `update_bias` applies the auxiliary-loss-free rule and clears the load.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts
            else None
        )
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, s, hdim = x.shape
        flat = x.reshape(-1, hdim)
        scores, topk_idx, topk_weight = self.gate(flat)
        capacity = None
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * flat.shape[0] * cfg.num_experts_per_tok
                                 / cfg.n_routed_experts)
        d = permute(topk_idx, topk_weight, cfg.n_routed_experts, capacity)
        # The experts gather the copies, apply the gates and sum each token's copies back themselves.
        y = self.experts(flat, d.counts, d.weight, d.token_idx).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)

        aux = scores.new_zeros(())
        if self.training:
            if not is_recomputing():
                with torch.no_grad():
                    self.expert_load += d.counts.to(self.expert_load.dtype)
                    self.dropped_tokens += d.dropped
            if cfg.aux_loss_alpha > 0:
                aux = cfg.aux_loss_alpha * sequence_balance_loss(scores, topk_idx, b, cfg.num_experts_per_tok)
        return y.view(b, s, hdim), aux

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None, speed: float | None = None) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2): b_i += gamma * sign(mean_load - load_i).

        `load` defaults to this layer's own `expert_load`; under data/expert parallelism the caller passes
        the load summed over all ranks so every rank applies the same update.
        """
        load = self.expert_load if load is None else load
        speed = self.cfg.bias_update_speed if speed is None else speed
        bias = self.gate.e_score_correction_bias
        bias += speed * torch.sign(load.float().mean() - load.float()).to(bias.device)
        self.expert_load.zero_()

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.expert_load.zero_()
        self.dropped_tokens.zero_()

