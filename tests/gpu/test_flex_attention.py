"""flex_attention on CUDA (the fused training default, `attn_impl: sdpa`) against the dense eager reference:
per-head max logits (QK-Clip's input, from `AuxRequest(max_scores=True)`) and outputs, under causal and
document masking, at the tiny preset's head dims and at DeepSeek-V3 / K2's (qk 192, v 128)."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig
from models.attention import AttentionMask, MLAttention, flex_attention_fn
from models.layers import RotaryEmbedding
from tests.model_helpers import gen, randomize_

pytestmark = pytest.mark.gpu

HEAD_DIMS = {  # (qk_nope, qk_rope, v)
    "tiny-dims": dict(qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "k2-dims": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}


def layer_config(attn_impl: str, dims: dict) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                       first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                       n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       max_position_embeddings=1024, attn_impl=attn_impl, **dims)


def documents(b: int, s: int, seed: int) -> torch.Tensor:
    """[B, S] ids of packed documents of random lengths (ids restart per row, as the loader's do)."""
    cuts = torch.rand(b, s, generator=gen(seed)) < 6 / s
    cuts[:, 0] = False
    return cuts.cumsum(dim=1)


@pytest.fixture
def cuda_flex(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("flex_attention's max_scores run on CUDA only (on CPU it raises NotImplementedError); the CPU "
                    "fused path is tested against the same reference in tests/test_attention_memory.py")
    assert flex_attention_fn() is not None, "this torch has no AuxRequest(max_scores): the fused path falls back"


# dtype -> (max-logit rtol, output rtol). fp32: both sum fp32 products, in another order. bf16: eager rounds its
# scores to bf16 twice (q @ k^T, then * scale) and its probabilities once; flex keeps them in fp32 — a bf16 ulp
# is 2^-7 relative, so 1e-2 holds any single rounding difference and flags anything larger.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}


# (head dims, document masking, dtype, sequence length): every combination at S = 256 (two whole 128-blocks),
# and the partial last block (S = 200) with documents. Each is one more compiled flex kernel (a few seconds).
CASES = [(dims, docs, dtype, 256) for dims in HEAD_DIMS for docs in (False, True)
         for dtype in (torch.float32, torch.bfloat16)]
CASES += [("k2-dims", True, dtype, 200) for dtype in (torch.float32, torch.bfloat16)]
CASE_IDS = [f"{dims}-{'documents' if docs else 'causal'}-{str(dtype)[6:]}-S{seq}" for dims, docs, dtype, seq in CASES]


@pytest.mark.usefixtures("cuda_flex")
@pytest.mark.parametrize("dims, docs, dtype, seq", CASES, ids=CASE_IDS)
def test_flex_max_logits_and_output_equal_dense_reference(device, dims, docs, dtype, seq) -> None:
    """Same weights and inputs through the flex path and the eager one (which holds [B, H, S, S]), over two
    forwards (the running max): per-head max logits and outputs agree; q and k are bitwise the same in both, so
    only the attention core differs. In fp32 the input gradients agree as well."""
    eager = MLAttention(layer_config("eager", HEAD_DIMS[dims]))
    randomize_(eager, seed=3, std=0.15)
    fused = MLAttention(layer_config("sdpa", HEAD_DIMS[dims]))
    fused.load_state_dict(eager.state_dict())
    for layer in (eager, fused):  # weights in `dtype`, the max-logit buffer fp32 (as under FSDP2's bf16 policy)
        layer.to(device, dtype)
        layer.max_logit = layer.max_logit.float()
    rope = RotaryEmbedding(eager.cfg).to(device)(torch.arange(seq, device=device), dtype)
    b = 2
    rtol_max, rtol_out = TOLERANCES[dtype]
    for seed in (5, 6):
        x = (torch.randn(b, seq, 128, generator=gen(seed)) * (seed - 3)).to(device, dtype)
        mask = AttentionMask(documents(b, seq, seed).to(device) if docs else None)
        x_e, x_f = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_f = eager(x_e, rope, mask), fused(x_f, rope, mask)
        scale = out_e.detach().float().abs().max().item()
        torch.testing.assert_close(out_f.float(), out_e.float(), rtol=rtol_out, atol=rtol_out * scale)
        torch.testing.assert_close(fused.max_logit, eager.max_logit, rtol=rtol_max, atol=rtol_max)
        if dtype == torch.float32:
            grad = torch.randn(out_e.shape, generator=gen(seed + 10)).to(device)
            out_e.backward(grad)
            out_f.backward(grad)
            g_scale = x_e.grad.abs().max().item()
            torch.testing.assert_close(x_f.grad, x_e.grad, rtol=1e-4, atol=1e-4 * g_scale)
    assert torch.isfinite(fused.max_logit).all() and (fused.max_logit > 1.0).all()  # a real signal


@pytest.mark.usefixtures("cuda_flex")
def test_flex_path_is_taken(device) -> None:
    """The fused layer really runs flex_attention on CUDA (not the SDPA + chunked-max fallback)."""
    fused = MLAttention(layer_config("sdpa", HEAD_DIMS["tiny-dims"])).to(device)
    randomize_(fused, seed=1)
    calls = []
    fallback = fused._sdpa_chunked
    fused._sdpa_chunked = lambda *a, **k: calls.append("fallback") or fallback(*a, **k)  # this layer only
    x = torch.randn(1, 128, 128, device=device)
    rope = RotaryEmbedding(fused.cfg).to(device)(torch.arange(128, device=device), torch.float32)
    fused(x, rope)
    assert not calls and torch.isfinite(fused.max_logit).all()
