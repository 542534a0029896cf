"""Unit behaviour of models/: config validation, RMSNorm, RoPE/YaRN, max-logit tracking, meta-device
construction, SDPA vs eager, causality. The router and MoE live in test_moe.py.

References are written independently here (mostly float64 python loops) rather than reusing the code under
test. Equivalence with `transformers` lives in test_hf.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models import ConfigError, ModelConfig, Transformer
from models.attention import MLAttention
from models.layers import RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq
from tests.model_helpers import gen, moe_config, randomize_

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}



# =============================================================================================== config
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_routed_experts=9, n_group=2, topk_group=1), "n_group"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_group=2, topk_group=0), "topk_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),  # 1 group = 2 experts
        (dict(n_group=8, topk_group=2), "n_group"),  # groups of a single expert
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "original_max_position_embeddings": 16}),
         "rope_scaling"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
    ],
)
def test_config_rejects_bad_field(tiny_config, overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**overrides)


def test_config_validation_also_runs_on_replace(tiny_config):
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="topk_group"):
        cfg.replace(n_group=2, topk_group=3)


def test_config_moe_checks_skipped_without_moe_layers(tiny_config):
    # All layers dense: the (otherwise invalid) expert-group settings are irrelevant and accepted.
    cfg = tiny_config(first_k_dense_replace=3, n_routed_experts=9, n_group=2)
    assert cfg.num_moe_layers == 0 and not any(cfg.is_moe_layer(i) for i in range(3))


def test_config_from_dict_unknown_key_names_closest(tiny_config):
    d = tiny_config().to_dict()
    d["n_routed_expert"] = d.pop("n_routed_experts")
    with pytest.raises(ConfigError, match="did you mean 'n_routed_experts'"):
        ModelConfig.from_dict(d)
    d.pop("n_routed_expert")
    with pytest.raises(ConfigError, match="unknown key 'qqq'"):
        ModelConfig.from_dict({**d, "qqq": 1})
    assert ModelConfig.from_dict({**d, "qqq": 1}, ignore_unknown=True).n_routed_experts == 384  # default


def test_config_dict_round_trip(tiny_config):
    cfg = tiny_config(rope_scaling=YARN, capacity_factor=1.25)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.qk_head_dim == 16 and cfg.num_moe_layers == 2


def test_softmax_scale_yarn_mscale(tiny_config):
    plain = tiny_config()
    assert plain.softmax_scale() == pytest.approx(16**-0.5, rel=1e-12)
    cfg = tiny_config(rope_scaling=YARN)
    m = 0.1 * 0.8 * math.log(4.0) + 1.0
    assert cfg.softmax_scale() == pytest.approx(16**-0.5 * m * m, rel=1e-12)
    # no mscale_all_dim, or factor <= 1: no correction
    assert tiny_config(rope_scaling={**YARN, "mscale_all_dim": 0}).softmax_scale() == pytest.approx(16**-0.5)
    assert tiny_config(rope_scaling={**YARN, "factor": 1.0}).softmax_scale() == pytest.approx(16**-0.5)


# ============================================================================================== RMSNorm
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_float64_reference(dtype, tol):
    g = gen(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=g))
    norm.to(dtype)
    x = (3 * torch.randn(4, 7, 48, generator=g)).to(dtype)
    x64, w64 = x.double(), norm.weight.detach().double()
    ref = w64 * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # eps matters for small inputs; zero input stays zero
    small = torch.full((1, 48), 1e-3, dtype=dtype)
    torch.testing.assert_close(norm(small).double(), w64 * small.double() / math.sqrt(1e-6 + 1e-5),
                               rtol=tol, atol=0)
    assert torch.equal(norm(torch.zeros(2, 48, dtype=dtype)), torch.zeros(2, 48, dtype=dtype))


# ================================================================================================= RoPE
def _rope_cfg(**kw) -> ModelConfig:
    return moe_config(qk_rope_head_dim=16, **kw)


def test_apply_rope_matches_complex_rotation_of_interleaved_pairs():
    """DeepSeek rotates pairs (x0, x1), (x2, x3)...: x_pair * e^{i theta}; apply_rope writes the rotated
    pairs de-interleaved (real parts, then imaginary parts)."""
    cfg = _rope_cfg()
    rotary = RotaryEmbedding(cfg)
    pos = torch.arange(20)
    cos, sin = rotary(pos, torch.float64)
    x = torch.randn(2, 3, 20, 16, generator=gen(1), dtype=torch.float64)
    ang = pos[:, None].double() * rope_inv_freq(cfg)[0].double()
    z = torch.view_as_complex(x.reshape(2, 3, 20, 8, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, rtol=1e-6, atol=1e-6)


def test_apply_rope_preserves_norm_and_is_relative():
    cfg = _rope_cfg()
    rotary = RotaryEmbedding(cfg)
    assert rotary.attention_factor == 1.0
    g = gen(2)
    x = torch.randn(1, 2, 64, 16, generator=g, dtype=torch.float64)
    cos, sin = rotary(torch.arange(64), torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)

    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def dot(m: int, n: int) -> float:
        cm, sm = rotary(torch.tensor([m]), torch.float64)
        cn, sn = rotary(torch.tensor([n]), torch.float64)
        return float((apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum())

    for delta in (0, 1, 5, 17):
        values = [dot(m + delta, m) for m in (0, 3, 40, 200)]
        assert max(values) - min(values) < 1e-4, (delta, values)
    assert abs(dot(5, 0) - dot(0, 0)) > 1e-3  # and it does depend on the distance


def test_apply_rope_batched_positions():
    """cos/sin of shape [B, S, d/2] (per-sequence positions) broadcast over heads like [S, d/2]."""
    cfg = _rope_cfg(rope_scaling=YARN)
    rotary = RotaryEmbedding(cfg)
    x = torch.randn(2, 3, 10, 16, generator=gen(3))
    positions = torch.stack([torch.arange(10), torch.arange(10) + 7])
    cos, sin = rotary(positions, torch.float32)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        cb, sb = rotary(positions[b], torch.float32)
        torch.testing.assert_close(out[b:b + 1], apply_rope(x[b:b + 1], cb, sb), rtol=0, atol=0)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},  # Kimi K2
        {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},  # DeepSeek-V3
        {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.9,
         "mscale_all_dim": 0.7},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
         "beta_slow": 2, "truncate": False},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
    ],
    ids=["plain", "k2", "dsv3", "mscale", "no-truncate", "attention-factor"],
)
@pytest.mark.parametrize("rope_dim", [16, 64])
def test_rope_inv_freq_matches_transformers(rope_scaling, rope_dim):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.hf import to_hf_config

    max_pos = 4096
    if rope_scaling:
        max_pos = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
    cfg = _rope_cfg(rope_scaling=rope_scaling, rope_theta=50000.0, max_position_embeddings=max_pos).replace(
        qk_rope_head_dim=rope_dim)
    hf_cfg = DeepseekV3Config(**to_hf_config(cfg, torch.float32))
    if rope_scaling is None:
        ref = 1.0 / (50000.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
        ref_factor = 1.0
    else:
        ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv_freq, factor = rope_inv_freq(cfg)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (rope_dim // 2,)
    torch.testing.assert_close(inv_freq.double(), ref.double(), rtol=1e-6, atol=0)
    assert float(factor) == pytest.approx(float(ref_factor), rel=1e-9)
    if rope_scaling is not None:  # YaRN really interpolates the low frequencies
        plain = rope_inv_freq(cfg.replace(rope_scaling=None))[0]
        assert float(inv_freq[-1]) == pytest.approx(float(plain[-1]) / rope_scaling["factor"], rel=1e-5)
        assert float(inv_freq[0]) == pytest.approx(float(plain[0]), rel=1e-6)


# ============================================================================================ max logit
def mla_reference(attn: MLAttention, x: torch.Tensor, positions: torch.Tensor,
                  causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 MLA written from the paper, with DeepSeek's interleaved (complex) RoPE layout.
    Returns (output, scores [B, H, S, S] with the future masked to -inf when `causal`)."""
    cfg = attn.cfg
    w = {n: p.detach().double() for n, p in attn.named_parameters()}
    b, s, _ = x.shape
    h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = x.double()

    def rms(v, weight):
        return weight * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    q = x @ w["q_proj.weight"].T if cfg.q_lora_rank is None else (
        rms(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"]) @ w["q_b_proj.weight"].T)
    q = q.view(b, s, h, dn + dr)
    latent, k_rope = (x @ w["kv_a_proj_with_mqa.weight"].T).split([cfg.kv_lora_rank, dr], -1)
    kv = (rms(latent, w["kv_a_layernorm.weight"]) @ w["kv_b_proj.weight"].T).view(b, s, h, dn + dv)
    inv_freq, att = rope_inv_freq(cfg)
    ang = positions.double()[:, None] * inv_freq.double()
    rot = torch.polar(torch.full_like(ang, att), ang)  # [S, dr/2]

    def rope(t):  # [..., S, (H,) dr] interleaved pairs
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], dr // 2, 2).contiguous())
        return torch.view_as_real(z * (rot if t.dim() == 3 else rot[:, None])).flatten(-2)

    qr, kr = rope(q[..., dn:]), rope(k_rope)  # [B, S, H, dr], [B, S, dr]
    scale = (dn + dr) ** -0.5
    if cfg.rope_scaling and cfg.rope_scaling.get("mscale_all_dim"):
        m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1.0
        scale *= m * m
    scores = (torch.einsum("bihd,bjhd->bhij", q[..., :dn], kv[..., :dn])
              + torch.einsum("bihd,bjd->bhij", qr, kr)) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), kv[..., dn:]).reshape(b, s, h * dv)
    return out @ w["o_proj.weight"].T, scores


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None, rope_scaling=YARN)],
                         ids=["qlora", "yarn"])
def test_max_logit_matches_float64_recomputation(tiny_config, overrides):
    cfg = tiny_config(**overrides)
    attn = MLAttention(cfg)
    randomize_(attn, seed=24, std=0.3)
    rotary = RotaryEmbedding(cfg)
    positions = torch.arange(24)
    x = torch.randn(2, 24, 32, generator=gen(25))
    assert torch.all(attn.max_logit == float("-inf"))
    out = attn(x, rotary(positions, torch.float32))
    ref_out, ref_scores = mla_reference(attn, x, positions)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    ref_max = ref_scores.amax(dim=(0, 2, 3))
    assert attn.max_logit.dtype == torch.float32 and attn.max_logit.shape == (4,)
    torch.testing.assert_close(attn.max_logit.double(), ref_max, rtol=1e-5, atol=1e-5)
    # the causal mask matters here: over all pairs the max would be larger for some head
    unmasked = mla_reference(attn, x, positions, causal=False)[1].amax(dim=(0, 2, 3))
    assert (unmasked - ref_max).max() > 1e-3

    # running max over two forwards, then reset
    x2 = 2.0 * torch.randn(2, 24, 32, generator=gen(26))
    attn(x2, rotary(positions, torch.float32))
    ref_max2 = mla_reference(attn, x2, positions)[1].amax(dim=(0, 2, 3))
    torch.testing.assert_close(attn.max_logit.double(), torch.maximum(ref_max, ref_max2),
                               rtol=1e-5, atol=1e-5)
    attn.reset_max_logit()
    assert torch.all(attn.max_logit == float("-inf"))
    attn(x2, rotary(positions, torch.float32))
    torch.testing.assert_close(attn.max_logit.double(), ref_max2, rtol=1e-5, atol=1e-5)


def test_transformer_max_logits_and_reset(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    ids = torch.randint(0, 128, (2, 10), generator=gen(27))
    logits = model.max_logits()
    assert sorted(logits) == [0, 1, 2] and all(torch.all(v == float("-inf")) for v in logits.values())
    with torch.no_grad():
        model(ids)
    first = {i: v.clone() for i, v in model.max_logits().items()}
    assert all(torch.isfinite(v).all() for v in first.values())
    model.reset_max_logits()
    assert all(torch.all(v == float("-inf")) for v in model.max_logits().values())
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(first[i], v) for i, v in model.max_logits().items())


# ============================================================================================= meta init
def test_meta_construction_matches_eager(tiny_config):
    cfg = tiny_config(initializer_range=0.02, rope_scaling=YARN)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(generator=gen(28))
    eager = Transformer(cfg)
    assert [(n, p.shape, p.dtype) for n, p in meta.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in eager.named_parameters()]
    assert [(n, b.shape, b.dtype) for n, b in meta.named_buffers()] == [
        (n, b.shape, b.dtype) for n, b in eager.named_buffers()]

    for name, p in meta.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
    experts = meta.layers["1"].mlp.experts.gate_up_proj
    assert experts.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(experts.mean().item()) < 1e-3
    assert meta.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(meta.rotary.inv_freq, eager.rotary.inv_freq, rtol=0, atol=0)
    assert meta.rotary.attention_factor == eager.rotary.attention_factor
    for moe in meta.moe_layers():
        assert torch.all(moe.gate.e_score_correction_bias == 0) and torch.all(moe.expert_load == 0)
        assert moe.dropped_tokens.item() == 0
    assert all(torch.all(v == float("-inf")) for v in meta.max_logits().values())

    # same generator -> same weights -> same logits
    eager.init_weights(generator=gen(28))
    for (n, a), (_, b) in zip(meta.named_parameters(), eager.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 128, (2, 20), generator=gen(29))
    with torch.no_grad():
        out = meta(ids).logits
        assert torch.isfinite(out).all()
        assert torch.equal(out, eager(ids).logits)
    # a different seed gives different weights
    eager.init_weights(generator=gen(30))
    assert not torch.equal(eager.lm_head.weight, meta.lm_head.weight)


def test_meta_construction_keeps_tied_embeddings(tiny_config):
    cfg = tiny_config(tie_word_embeddings=True)
    eager = Transformer(cfg)
    assert eager.lm_head.weight is eager.embed_tokens.weight
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(generator=gen(31))
    assert meta.lm_head.weight is meta.embed_tokens.weight


# ================================================================================ sdpa / causal / misc
def test_sdpa_matches_eager(tiny_config):
    cfg = tiny_config(rope_scaling=YARN, n_group=2, topk_group=1, initializer_range=0.15)
    torch.manual_seed(0)
    eager = Transformer(cfg).eval()
    sdpa = Transformer(cfg.replace(attn_impl="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 128, (2, 40), generator=gen(32))
    le, ls = eager(ids).logits, sdpa(ids).logits
    torch.testing.assert_close(ls, le, rtol=1e-5, atol=1e-5)
    for i, v in eager.max_logits().items():
        torch.testing.assert_close(sdpa.max_logits()[i], v, rtol=1e-6, atol=1e-6)
    labels = torch.randint(0, 128, (2, 40), generator=gen(33))
    F.cross_entropy(le.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(ls.flatten(0, 1), labels.flatten()).backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), sdpa.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_network_is_causal(tiny_config, attn_impl):
    cfg = tiny_config(attn_impl=attn_impl, initializer_range=0.15)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 128, (2, 24), generator=gen(34))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=1e-6, atol=1e-6)
    assert (a[:, 15:] - b[:, 15:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


def test_explicit_positions(tiny_config):
    cfg = tiny_config(rope_scaling=YARN)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 128, (2, 16), generator=gen(35))
    with torch.no_grad():
        default = model(ids).logits
        torch.testing.assert_close(model(ids, positions=torch.arange(16)).logits, default, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, positions=torch.arange(16).expand(2, 16)).logits, default,
                                   rtol=1e-6, atol=1e-6)
        # RoPE is relative: shifting every position by the same offset changes nothing...
        shifted = model(ids, positions=torch.stack([torch.arange(16) + 5, torch.arange(16) + 300])).logits
        torch.testing.assert_close(shifted, default, rtol=1e-4, atol=1e-4)
        # ...but a gap after token 8 changes the logits from there on, and only there
        gap = torch.arange(16)
        gap[8:] += 3
        gapped = model(ids, positions=gap).logits
    torch.testing.assert_close(gapped[:, :8], default[:, :8], rtol=1e-5, atol=1e-5)
    assert (gapped[:, 8:] - default[:, 8:]).abs().max() > 1e-3


def test_tied_embeddings_share_storage(tiny_config):
    model = Transformer(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Transformer(tiny_config())
    assert model.num_params() == untied.num_params() - 128 * 32
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 128 * 32


def test_deepcopy_and_train_step_are_finite(tiny_config):
    """A few optimizer steps on the tiny model in train mode keep everything finite and lower the loss."""
    cfg = tiny_config(aux_loss_alpha=1e-2, initializer_range=0.05)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 16), generator=gen(36))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.balance_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_biases()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert not torch.equal(clone.lm_head.weight, model.lm_head.weight)
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())
