"""Router, MoE layer, balance loss and the auxiliary-loss-free bias update, against independent references
(mostly float64 python loops written here, not the code under test)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, Transformer
from models.moe import (
    GroupedExperts,
    MoE,
    Router,
    forced_balanced_routing,
    grouped_matmul,
    grouped_weight_grad,
    permute,
    sequence_balance_loss,
    sum_copies,
)
from tests.model_helpers import gen, moe_config, randomize_

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead


# =============================================================================================== router
def _hand_router(**overrides) -> tuple[Router, Callable[[list[float]], torch.Tensor]]:
    """Router with hidden == E and weight = I, so the scores are sigmoid(x): we choose them directly."""
    cfg = moe_config(hidden_size=8, n_routed_experts=8, **overrides)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))

    def x_for(scores: list[float]) -> torch.Tensor:
        return torch.logit(torch.tensor([scores], dtype=torch.float64)).float()

    return router, x_for


def test_router_group_limited_topk_by_hand():
    router, x_for = _hand_router(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.0)
    #               group 0      group 1      group 2       group 3
    scores = [0.95, 0.10, 0.62, 0.60, 0.90, 0.05, 0.50, 0.52]
    # group scores (sum of top-2): 1.05, 1.22, 0.95, 1.02 -> groups 1 and 0 are kept.
    # Unrestricted top-3 would be {0, 4, 2}; expert 4 lies in dropped group 2.
    s, idx, w = router(x_for(scores))
    assert sorted(idx[0].tolist()) == [0, 2, 3]
    torch.testing.assert_close(s[0], torch.tensor(scores), rtol=1e-6, atol=1e-6)
    chosen = torch.tensor([scores[i] for i in idx[0].tolist()])
    torch.testing.assert_close(w[0], 2.0 * chosen / chosen.sum(), rtol=1e-6, atol=1e-7)
    assert w.sum().item() == pytest.approx(2.0, rel=1e-6)

    # The bias enters the group choice too: lift group 2 above group 0.
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0.2, 0, 0, 0]))
    _, idx, w = router(x_for(scores))
    assert sorted(idx[0].tolist()) == [2, 3, 4]  # groups 1 (1.22) and 2 (1.15) now
    chosen = torch.tensor([scores[i] for i in idx[0].tolist()])  # weights from the *unbiased* scores
    torch.testing.assert_close(w[0], 2.0 * chosen / chosen.sum(), rtol=1e-6, atol=1e-7)


def test_router_bias_changes_selection_not_weights():
    router, x_for = _hand_router(num_experts_per_tok=2, routed_scaling_factor=1.5, norm_topk_prob=False)
    scores = [0.9, 0.8, 0.1, 0.2, 0.3, 0.15, 0.25, 0.05]
    _, idx, w = router(x_for(scores))
    assert sorted(idx[0].tolist()) == [0, 1]
    with torch.no_grad():
        router.e_score_correction_bias[5] = 1.0
    s, idx, w = router(x_for(scores))
    order = idx[0].tolist()
    assert sorted(order) == [0, 5]
    # not normalized: weight = routed_scaling_factor * unbiased score
    torch.testing.assert_close(w[0], 1.5 * torch.tensor([scores[i] for i in order]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s[0], torch.tensor(scores), rtol=1e-6, atol=1e-6)  # scores are unbiased too


def route_reference(scores: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> list[list[int]]:
    """Per-token python reference of DeepSeek-V3's node-limited routing."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    size = e // cfg.n_group
    out = []
    for row in (scores.double() + bias.double()).tolist():
        groups = sorted(range(cfg.n_group), key=lambda gi: -sum(sorted(row[gi * size:(gi + 1) * size])[-2:]))
        allowed = [i for gi in groups[:cfg.topk_group] for i in range(gi * size, (gi + 1) * size)]
        out.append(sorted(sorted(allowed, key=lambda i: -row[i])[:k]))
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_random_matches_reference(norm_topk_prob):
    cfg = moe_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, hidden_size=32,
                     norm_topk_prob=norm_topk_prob)
    router = Router(cfg)
    g = gen(4)
    with torch.no_grad():
        router.weight.copy_(0.3 * torch.randn(16, 32, generator=g))
        router.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=g))
    x = torch.randn(200, 32, generator=g)
    s, idx, w = router(x)
    assert s.dtype == torch.float32 and w.dtype == torch.float32
    ref_scores = torch.sigmoid(x.double() @ router.weight.detach().double().T)
    torch.testing.assert_close(s.double(), ref_scores, rtol=1e-5, atol=1e-6)
    assert [sorted(r) for r in idx.tolist()] == route_reference(s, router.e_score_correction_bias, cfg)
    # bias really matters in this case (so the check above covers bias-affected routing)
    assert route_reference(s, torch.zeros(16), cfg) != route_reference(s, router.e_score_correction_bias, cfg)
    gathered = ref_scores.gather(1, idx)
    expect = gathered / gathered.sum(-1, keepdim=True) if norm_topk_prob else gathered
    torch.testing.assert_close(w.double(), cfg.routed_scaling_factor * expect, rtol=1e-5, atol=1e-6)
    # gradients reach the router weight only through the gating weights, never through the bias buffer
    w.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not router.e_score_correction_bias.requires_grad


def test_router_bf16_input_scores_in_fp32():
    cfg = moe_config()
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.2, generator=gen(5))
    x = torch.randn(10, 32, generator=gen(6))
    s32, i32, w32 = router(x)
    s16, i16, w16 = router(x.bfloat16())
    assert s16.dtype == torch.float32 and w16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, rtol=2e-2, atol=2e-2)


def test_router_chooses_as_fp32_under_bf16_autocast():
    """DeepSeek-V3-scale routing (384 experts, top-8, 8 groups keep 4): under bf16 autocast the router still
    scores in fp32, so from the same bf16 hidden states it picks the expert sets an fp32 router picks. (With
    autocast running the scoring GEMM in bf16, about 12% of these tokens got a different set.)"""
    cfg = moe_config(hidden_size=256, n_routed_experts=384, num_experts_per_tok=8, n_group=8, topk_group=4)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(384, 256, generator=gen(1)) / 16)
        router.e_score_correction_bias.copy_(0.01 * torch.randn(384, generator=gen(2)))
    x = torch.randn(4096, 256, generator=gen(3)).bfloat16()
    _, idx32, _ = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16, idx16, w16 = router(x)
    agree = (idx32.sort(-1).values == idx16.sort(-1).values).all(-1).float().mean().item()
    assert agree >= 0.999, agree
    assert s16.dtype == torch.float32 and w16.dtype == torch.float32


# ================================================================================================== MoE
def moe_reference(params: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig,
                  capacity: int | None = None) -> torch.Tensor:
    """Naive per-token MoE (routing + experts + shared expert), differentiable in `params` and `x`.
    Router and gating weights are fp32 whatever the input dtype, as in DeepSeek-V3 and transformers."""
    scores = torch.sigmoid(F.linear(x.float(), params["gate.weight"].float()))
    chosen = route_reference(scores.detach(), bias, cfg)
    used = [0] * cfg.n_routed_experts
    rows = []
    for t, experts in enumerate(chosen):
        w = scores[t, experts]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = (w * cfg.routed_scaling_factor).to(x.dtype)
        y = x.new_zeros(x.shape[1])
        for j, e in enumerate(experts):
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue  # dropped: token order decides, the first `capacity` copies are kept
            gate, up = params["experts.gate_up_proj"][e]
            h = F.silu(gate @ x[t]) * (up @ x[t])
            y = y + w[j] * (params["experts.down_proj"][e] @ h)
        if cfg.n_shared_experts:
            sx = F.silu(params["shared_experts.gate_proj.weight"] @ x[t]) * (
                params["shared_experts.up_proj.weight"] @ x[t])
            y = y + params["shared_experts.down_proj.weight"] @ sx
        rows.append(y)
    return torch.stack(rows)


def make_moe(cfg: ModelConfig, seed: int = 0, bias_std: float = 0.05) -> MoE:
    moe = MoE(cfg)
    randomize_(moe, seed)
    with torch.no_grad():
        bias = bias_std * torch.randn(cfg.n_routed_experts, generator=gen(seed + 1))
        moe.gate.e_score_correction_bias.copy_(bias)
    return moe


def _check_moe_against_reference(moe: MoE, x: torch.Tensor, rtol: float, atol: float, capacity=None,
                                 router_rtol: float = 2e-5) -> None:
    """Output and gradients vs the naive loop; `router_rtol` for the gradients that flow through the
    fp32 router (the router weight and the input)."""
    cfg = moe.cfg
    x = x.clone().requires_grad_()
    y, aux = moe(x)
    g = torch.randn(y.shape, generator=gen(99), dtype=y.dtype)
    (y * g).sum().backward()

    params = {n: p.detach().double().clone().requires_grad_() for n, p in moe.named_parameters()}
    x64 = x.detach().double().clone().requires_grad_()
    ref = moe_reference(params, x64.view(-1, x.shape[-1]), moe.gate.e_score_correction_bias, cfg, capacity)
    (ref.view(y.shape) * g.double()).sum().backward()

    ref = ref.view(y.shape).detach()
    assert (y.double() - ref).abs().max().item() <= rtol * ref.abs().max().item() + atol
    grads = {n: (p.grad, params[n].grad) for n, p in moe.named_parameters()}
    grads["input"] = (x.grad, x64.grad)
    for n, (ours, ref) in grads.items():
        tol = router_rtol if n in ("input", "gate.weight") else rtol
        scale = ref.abs().max().item()
        assert (ours.double() - ref).abs().max().item() <= tol * scale + atol, n


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_group=4, topk_group=2, num_experts_per_tok=3),
     dict(norm_topk_prob=False, n_shared_experts=2), dict(n_shared_experts=0)],
    ids=["plain", "groups", "unnormalized-2shared", "no-shared"],
)
def test_moe_grouped_path_matches_naive_loop_float64(overrides):
    # Everything but the fp32 gating weights is float64; their fp32 rounding (e.g. the order of the
    # normalizing sum) bounds the agreement at ~1e-7 relative.
    moe = make_moe(moe_config(**overrides)).double()
    x = torch.randn(2, 16, 32, generator=gen(7), dtype=torch.float64)
    _check_moe_against_reference(moe, x, rtol=1e-6, atol=1e-9)


def test_moe_float32_grouped_gemm_matches_float64_reference():
    """fp32 on CPU runs torch._grouped_mm (when available): same math as the loop, to fp32 accuracy."""
    moe = make_moe(moe_config(n_group=2, topk_group=1))
    x = torch.randn(2, 16, 32, generator=gen(8))
    _check_moe_against_reference(moe, x, rtol=2e-5, atol=2e-6)


def test_moe_unaligned_sizes_work():
    """Sizes the grouped-GEMM kernel rejects (rows not 16-byte aligned) fall back to the loop."""
    moe = make_moe(moe_config(hidden_size=36, moe_intermediate_size=10, num_attention_heads=2))
    x = torch.randn(2, 8, 36, generator=gen(9))
    _check_moe_against_reference(moe, x, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_matmul_with_empty_groups(dtype):
    g = gen(10)
    x = torch.randn(7, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 32, 16, generator=g).to(dtype).requires_grad_()
    counts = torch.tensor([3, 0, 4, 0])
    y = grouped_matmul(x, w, counts)
    y.float().square().sum().backward()
    ref = torch.cat([x[:3].double() @ w[0].double().T, x[3:].double() @ w[2].double().T])
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    assert torch.all(w.grad[1] == 0) and torch.all(w.grad[3] == 0) and w.grad[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_input_and_weight_gradients_with_empty_groups(dtype):
    """The backward's two grouped products against float64 per-group matmuls: dy_g @ w_g (transpose=False; on CPU
    bf16 through the transposed weight copy) and dy_g^T @ x_g, zeros for a group without rows."""
    g = gen(11)
    counts = torch.tensor([3, 0, 4, 0])
    x, dy = torch.randn(7, 16, generator=g).to(dtype), torch.randn(7, 32, generator=g).to(dtype)
    w = torch.randn(4, 32, 16, generator=g).to(dtype)
    blocks = [(0, 3, 0), (3, 7, 2)]
    ref_dx = torch.cat([dy[a:b].double() @ w[e].double() for a, b, e in blocks])
    ref_dw = torch.zeros(4, 32, 16, dtype=torch.float64)
    for a, b, e in blocks:
        ref_dw[e] = dy[a:b].double().T @ x[a:b].double()
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grouped_matmul(dy, w, counts, transpose=False).double(), ref_dx, rtol=tol, atol=tol)
    dw = grouped_weight_grad(dy, x, counts)
    assert dw.shape == (4, 32, 16) and dw.dtype == dtype
    torch.testing.assert_close(dw.double(), ref_dw, rtol=tol, atol=tol)
    assert torch.all(dw[1] == 0) and torch.all(dw[3] == 0)


def test_expert_ffn_backward_passes_gradcheck():
    """The hand-written backward of the experts' SwiGLU (with the routing weights applied inside) against finite
    differences in float64, with an expert that gets no rows; without weights; and in the token form (copies
    gathered from the tokens and summed back inside)."""
    g = gen(12)
    experts = GroupedExperts(3, 6, 4).double()
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_()
    gate_up = torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def run(x, scale, gate_up, down):
        weights = {"gate_up_proj": gate_up, "down_proj": down}
        return torch.func.functional_call(experts, weights, (x, counts, scale))

    def run_plain(x, gate_up, down):
        return run(x, None, gate_up, down)

    tokens = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    token_idx = torch.tensor([0, 2, 1, 2, 0])  # each row's token: gathered and summed back inside

    def run_tokens(tokens, scale, gate_up, down):
        weights = {"gate_up_proj": gate_up, "down_proj": down}
        return torch.func.functional_call(experts, weights, (tokens, counts, scale, token_idx))

    with torch.no_grad():
        y = run(x, scale, gate_up, down)
        gate, up = gate_up[[0, 0, 2, 2, 2]].unbind(1)
        w_down = down[[0, 0, 2, 2, 2]]
        h = F.silu(torch.einsum("nih,nh->ni", gate, x)) * torch.einsum("nih,nh->ni", up, x) * scale[:, None]
        torch.testing.assert_close(y, torch.einsum("nhi,ni->nh", w_down, h))
    assert torch.autograd.gradcheck(run, (x, scale, gate_up, down))
    assert torch.autograd.gradcheck(run_plain, (x, gate_up, down))
    with torch.no_grad():  # the token form is the row form on the gathered rows, summed per token
        rows = run(tokens[token_idx], scale, gate_up, down)
        torch.testing.assert_close(run_tokens(tokens, scale, gate_up, down),
                                   torch.zeros(3, 6, dtype=torch.float64).index_add_(0, token_idx, rows))
    assert torch.autograd.gradcheck(run_tokens, (tokens, scale, gate_up, down))


def test_permute_and_sum_copies_round_trip():
    topk_idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    weight = torch.arange(8, dtype=torch.float32).view(4, 2) + 1
    d = permute(topk_idx, weight, num_experts=4)
    assert d.counts.tolist() == [3, 2, 3, 0] and d.dropped == 0
    assert d.token_idx.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]  # stable: token order inside each expert
    assert d.weight.tolist() == [2, 3, 7, 4, 6, 1, 5, 8]
    y = torch.ones(8, 3)
    out = sum_copies(y * d.weight.unsqueeze(-1), d.token_idx, num_tokens=4)  # gated copies back on their tokens
    torch.testing.assert_close(out, weight.sum(-1, keepdim=True).expand(4, 3))

    d = permute(topk_idx, weight, num_experts=4, capacity=2)
    assert d.counts.tolist() == [2, 2, 2, 0] and d.dropped == 2
    assert d.token_idx.tolist() == [0, 1, 1, 2, 0, 2]  # expert 0 drops token 3, expert 2 drops token 3


def _skewed_moe(capacity_factor) -> MoE:
    # A huge bias on experts 0 and 1: every token picks exactly them (extreme imbalance).
    moe = make_moe(moe_config(capacity_factor=capacity_factor), seed=11)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    return moe


def test_moe_capacity_drops_deterministically():
    moe = _skewed_moe(capacity_factor=1.0).double()
    x = torch.randn(2, 12, 32, generator=gen(12), dtype=torch.float64)
    tokens, k, e = 24, 2, 8
    capacity = math.ceil(1.0 * tokens * k / e)  # 6 per expert; experts 0 and 1 each get 24 copies
    moe.train()
    y1, _ = moe(x)
    assert moe.dropped_tokens.item() == 2 * (tokens - capacity)
    assert moe.expert_load.tolist() == [capacity, capacity, 0, 0, 0, 0, 0, 0]
    y2, _ = moe(x)
    assert torch.equal(y1, y2)
    assert moe.dropped_tokens.item() == 4 * (tokens - capacity)  # accumulates over forwards
    moe.eval()
    _check_moe_against_reference(moe, x, rtol=1e-6, atol=1e-9, capacity=capacity)
    moe.reset_stats()
    assert moe.dropped_tokens.item() == 0 and moe.expert_load.sum().item() == 0


def test_moe_dropless_under_extreme_imbalance():
    moe = _skewed_moe(capacity_factor=None).double().train()
    x = torch.randn(2, 12, 32, generator=gen(13), dtype=torch.float64)
    moe(x)
    assert moe.dropped_tokens.item() == 0
    assert moe.expert_load.tolist() == [24, 24, 0, 0, 0, 0, 0, 0]
    moe.eval()
    _check_moe_against_reference(moe, x, rtol=1e-6, atol=1e-9)


def test_forced_balanced_routing_balances_exactly_and_is_off_by_default():
    """The benchmark-only option: every expert gets T*k/E copies, token t's experts are (t*k + j) mod E, the
    gating weights are still the router's scores there (so gradients reach it); outside the block, and by
    default, routing is the natural one, bit for bit."""
    moe = _skewed_moe(capacity_factor=1.0).train()  # natural routing would send every token to experts 0, 1
    cfg = moe.cfg
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(2, 12, 32, generator=gen(16))
    flat = x.view(-1, 32)
    assert not Router.force_balanced and not moe.gate.force_balanced
    s0, idx0, w0 = moe.gate(flat)
    y0, _ = moe(x)
    moe.reset_stats()
    with forced_balanced_routing(moe):
        s, idx, w = moe.gate(flat)
        y, _ = moe(x)
    assert idx.tolist() == [[(t * k + j) % e for j in range(k)] for t in range(flat.shape[0])]
    assert moe.expert_load.tolist() == [flat.shape[0] * k / e] * e  # imbalance max/mean exactly 1
    assert moe.dropped_tokens.item() == 0  # a capacity of exactly T*k/E drops nothing
    gathered = s.double().gather(1, idx)
    expect = gathered / gathered.sum(-1, keepdim=True) if cfg.norm_topk_prob else gathered
    torch.testing.assert_close(w.double(), cfg.routed_scaling_factor * expect)
    y.square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # restored: the same natural routing and output as before the block
    assert not moe.gate.force_balanced
    s1, idx1, w1 = moe.gate(flat)
    assert torch.equal(idx1, idx0) and torch.equal(w1, w0) and torch.equal(s1, s0)
    assert set(idx0.flatten().tolist()) == {0, 1}
    torch.testing.assert_close(moe(x)[0], y0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moe_expert_with_zero_tokens(dtype):
    moe = make_moe(moe_config(), seed=14).to(dtype)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[3] = -10.0  # nobody picks expert 3
        moe.gate.e_score_correction_bias[6] = -10.0  # nor expert 6
    x = torch.randn(2, 10, 32, generator=gen(15), dtype=dtype)
    _, idx, _ = moe.gate(x.view(-1, 32))
    assert not (idx == 3).any() and not (idx == 6).any()
    y, _ = moe(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(moe.experts, name).grad
        assert torch.isfinite(grad).all()
        assert torch.all(grad[3] == 0) and torch.all(grad[6] == 0)
        assert all(grad[e].abs().sum() > 0 for e in set(idx.flatten().tolist()))


# ========================================================================================= balance loss
def balance_loss_reference(scores: torch.Tensor, chosen: list[list[int]], batch: int, k: int) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 per sequence, averaged over the sequences (float64)."""
    scores = scores.double()
    tokens, e = scores.shape
    seq = tokens // batch
    total = scores.new_zeros(())
    for b in range(batch):
        count = [0] * e
        for t in range(b * seq, (b + 1) * seq):
            for i in chosen[t]:
                count[i] += 1
        f = torch.tensor([e / (k * seq) * c for c in count], dtype=torch.float64)
        s = scores[b * seq:(b + 1) * seq]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        total = total + (f * p).sum()
    return total / batch


def test_balance_loss_matches_paper_formula():
    cfg = moe_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, aux_loss_alpha=0.01)
    moe = make_moe(cfg, seed=16).train()
    x = torch.randn(3, 10, 32, generator=gen(17))
    _, aux = moe(x)
    scores64 = torch.sigmoid(x.view(-1, 32).double() @ moe.gate.weight.detach().double().T)
    chosen = route_reference(scores64, moe.gate.e_score_correction_bias, cfg)
    ref = 0.01 * balance_loss_reference(scores64, chosen, batch=3, k=4)
    assert aux.item() == pytest.approx(ref.item(), rel=1e-5)
    assert aux.item() > 0

    # the standalone function agrees too (without alpha)
    s, idx, _ = moe.gate(x.view(-1, 32))
    assert sequence_balance_loss(s, idx, 3, 4).item() == pytest.approx(ref.item() / 0.01, rel=1e-5)

    # perfectly balanced routing and uniform scores give exactly 1
    e, k, seq = 4, 2, 4
    uniform = torch.full((seq, e), 0.5)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert sequence_balance_loss(uniform, idx, 1, k).item() == pytest.approx(1.0, rel=1e-6)


def test_balance_loss_zero_in_eval_and_has_router_gradient():
    cfg = moe_config(aux_loss_alpha=0.01)
    moe = make_moe(cfg, seed=18)
    x = torch.randn(2, 8, 32, generator=gen(19))
    moe.eval()
    _, aux = moe(x)
    assert aux.item() == 0.0
    moe.train()
    _, aux = moe(x)
    aux.backward()
    grad = moe.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # and it is the gradient of the paper's formula with the selection held fixed
    w64 = moe.gate.weight.detach().double().requires_grad_()
    scores64 = torch.sigmoid(x.view(-1, 32).double() @ w64.T)
    chosen = route_reference(scores64.detach(), moe.gate.e_score_correction_bias, cfg)
    (0.01 * balance_loss_reference(scores64, chosen, 2, cfg.num_experts_per_tok)).backward()
    torch.testing.assert_close(grad.double(), w64.grad, rtol=1e-4, atol=1e-9)
    # no balance loss with alpha = 0
    moe0 = make_moe(moe_config(aux_loss_alpha=0.0), seed=18).train()
    assert moe0(x)[1].item() == 0.0


def test_transformer_balance_loss_sums_layers(tiny_config):
    cfg = tiny_config(aux_loss_alpha=0.01)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen(20))
    per_layer = []
    hooks = [moe.register_forward_hook(lambda m, i, o: per_layer.append(o[1].detach()))
             for moe in model.moe_layers()]
    model.train()
    out = model(ids)
    for h in hooks:
        h.remove()
    assert len(per_layer) == 2 and all(a > 0 for a in per_layer)
    assert out.balance_loss.item() == pytest.approx(sum(a.item() for a in per_layer), rel=1e-6)
    model.eval()
    assert model(ids).balance_loss.item() == 0.0


# =========================================================================================== bias update
def test_update_bias_moves_by_exactly_gamma():
    cfg = moe_config(n_routed_experts=4, num_experts_per_tok=2, bias_update_speed=1e-3)
    moe = make_moe(cfg, bias_std=0.0)
    moe.update_bias(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    assert torch.equal(moe.gate.e_score_correction_bias, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(torch.tensor([0.0, 10.0, 2.0, 4.0]), speed=0.5)  # mean 4: under, over, under, equal
    torch.testing.assert_close(moe.gate.e_score_correction_bias - before, torch.tensor([0.5, -0.5, 0.5, 0.0]),
                               rtol=0, atol=1e-7)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_expert_load_accumulates_in_train_only_and_resets():
    cfg = moe_config(bias_update_speed=0.01)
    moe = make_moe(cfg, seed=21)
    x = torch.randn(2, 8, 32, generator=gen(22))
    moe.eval()
    moe(x)
    assert moe.expert_load.sum().item() == 0
    moe.train()
    moe(x)
    _, idx, _ = moe.gate(x.view(-1, 32))
    counts = torch.bincount(idx.flatten(), minlength=8).float()
    assert torch.equal(moe.expert_load, counts) and counts.sum().item() == 16 * 2
    moe(x)
    assert torch.equal(moe.expert_load, 2 * counts)
    bias0 = moe.gate.e_score_correction_bias.clone()
    moe.update_bias()  # uses its own accumulated load
    expected = 0.01 * torch.sign(2 * counts.mean() - 2 * counts)
    torch.testing.assert_close(moe.gate.e_score_correction_bias - bias0, expected, rtol=0, atol=1e-7)
    assert moe.expert_load.sum().item() == 0


def test_transformer_update_router_biases_uses_reduced_load(tiny_config):
    cfg = tiny_config(bias_update_speed=1e-2)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 8), generator=gen(23)))
    local = {i: m.expert_load.clone() for i, m in zip((1, 2), model.moe_layers(), strict=True)}
    assert all(v.sum() == 16 * 2 for v in local.values())
    global_load = torch.tensor([0.0, 9.0, 3.0, 3.0, 3.0, 1.0, 5.0, 0.0])  # mean 3
    seen = []

    def reduce(load: torch.Tensor) -> torch.Tensor:
        seen.append(load.clone())
        return load * 0 + global_load  # pretend the other ranks made the global load this

    loads = model.update_router_biases(reduce)
    assert sorted(loads) == [1, 2] and all(torch.equal(v, global_load) for v in loads.values())
    assert [torch.equal(s, local[i]) for s, i in zip(seen, (1, 2), strict=True)] == [True, True]
    expected = 1e-2 * torch.tensor([1.0, -1, 0, 0, 0, 1, -1, 1])
    for moe in model.moe_layers():
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected, rtol=0, atol=1e-8)
        assert moe.expert_load.sum().item() == 0
