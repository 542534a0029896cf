"""Logits of models.Transformer against transformers' DeepseekV3ForCausalLM on the same weights, on CUDA: in
float32 to tests/test_hf.py's 1e-4, and in bf16 — the precision both are run in there — within a bf16 tolerance.

The weights travel as users move them: a Chogori model exported (`export_hf`, bf16) and loaded by both sides
(`import_hf(dtype=bf16)` keeps the router fp32; transformers' `from_pretrained(dtype=bf16)`). Our attention is
the fused default (flex_attention on CUDA) and the eager reference; transformers' is eager.

The bf16 tolerance. Two bf16 implementations round differently, and a different rounding can flip a near-tied
expert choice, which moves that token's logits by far more than a rounding (measured: max |difference| up to
20% of max |logit| on 4-layer random models), so no elementwise bound holds. What holds is in RMS over all
logits, relative to the fp32 logits' RMS: (1) ours and transformers' differ by at most 8% (measured 1.4-4.4%),
and (2) ours is no farther from the fp32 logits than transformers' own bf16 logits are (x1.5, measured <= 1.1;
each is 2-4% away)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import ModelConfig, Transformer
from models.hf import export_hf, import_hf

pytestmark = pytest.mark.gpu

transformers = pytest.importorskip("transformers")

BF16_AGREEMENT = 0.08  # rms(ours - transformers) / rms(fp32 logits)
BF16_NO_WORSE = 1.5  # rms(ours - fp32) / rms(transformers - fp32)
FP32_TOL = 1e-4  # max |difference| of the fp32 logits, as tests/test_hf.py

# The tiny preset's dims, with group-limited routing (16 experts in 4 groups, 2 kept, top-3) and a scaling factor.
CONFIG = dict(vocab_size=320, hidden_size=128, intermediate_size=384, num_hidden_layers=4, first_k_dense_replace=1,
              num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
              v_head_dim=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
              n_shared_experts=1, moe_intermediate_size=96, routed_scaling_factor=2.5, rope_theta=10000.0,
              max_position_embeddings=512, initializer_range=0.02)


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def with_attn(model: Transformer, attn_impl: str) -> Transformer:
    """`model` (its parameters, dtypes kept) under another attention implementation."""
    other = Transformer(model.cfg.replace(attn_impl=attn_impl)).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict(), assign=True)
    return other.eval()


@pytest.mark.parametrize("seed", [1, 2])
def test_logits_equal_transformers_in_fp32_and_bf16(tmp_path: Path, device: torch.device, seed: int) -> None:
    from tests.test_hf import make_ours  # the same perturbed init (norms, correction biases) as the CPU tests

    AutoModelForCausalLM = transformers.AutoModelForCausalLM
    ckpt = tmp_path / "ckpt"
    export_hf(make_ours(ModelConfig(**CONFIG), seed=seed), ckpt, dtype=torch.bfloat16)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(7)).to(device)

    logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=dtype).to(device)
            logits["hf", dtype] = hf.eval()(ids).logits.float()
            ours = import_hf(ckpt, dtype=dtype).to(device).eval()
            assert ours.cfg.attn_impl == "sdpa"
            assert all(m.gate.weight.dtype == torch.float32 for m in ours.moe_layers())
            logits["sdpa", dtype] = ours(ids).logits.float()
            logits["eager", dtype] = with_attn(ours, "eager")(ids).logits.float()
            del hf, ours

    ref = logits["hf", torch.float32]
    assert ref.abs().max() > 0.5  # a real signal
    for impl in ("sdpa", "eager"):
        assert (logits[impl, torch.float32] - ref).abs().max().item() <= FP32_TOL, impl
    hf16 = logits["hf", torch.bfloat16]
    hf_err = rms(hf16 - ref)
    assert 0 < hf_err  # bf16 really ran
    for impl in ("sdpa", "eager"):
        ours16 = logits[impl, torch.bfloat16]
        assert rms(ours16 - hf16) <= BF16_AGREEMENT * rms(ref), (impl, rms(ours16 - hf16) / rms(ref))
        assert rms(ours16 - ref) <= BF16_NO_WORSE * hf_err, (impl, rms(ours16 - ref), hf_err)
