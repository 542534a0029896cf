"""Equivalence with `transformers`' DeepseekV3ForCausalLM through the released on-disk checkpoint layout, and
the layout itself (names, dtypes, sharding, atomic replace).

All in float32 with eager attention; logits must agree to 1e-4 (they typically agree to ~1e-6). Nothing is
downloaded: every checkpoint is written to tmp_path.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import models.hf as hf_mod
from models import ModelConfig, Transformer
from models.hf import (
    HFCheckpointError,
    check_hf_config,
    export_hf,
    from_hf_config,
    import_hf,
    read_hf_tensors,
    to_hf_config,
    to_hf_tensors,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add overhead

LOGIT_TOL = 1e-4


def yarn(factor: float, original: int, mscale: float = 1.0, mscale_all_dim: float = 1.0) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


BASE = dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, moe_intermediate_size=16, n_group=1, topk_group=1, routed_scaling_factor=2.5,
            rope_theta=10000.0, max_position_embeddings=128, initializer_range=0.15)

# (id, overrides, sequence length)
CASES = [
    # YaRN with mscale != mscale_all_dim (cos/sin attention factor and softmax-scale correction both != 1),
    # q_lora, expert groups with topk_group < n_group; seq longer than original_max_position_embeddings.
    ("yarn-qlora-groups", dict(rope_scaling=yarn(4.0, 16, mscale=0.9, mscale_all_dim=0.8),
                               n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2), 40),
    # no q_lora, 2 dense layers first, unnormalized top-k, 2 shared experts, plain RoPE
    ("noqlora-dense2-unnorm-2shared", dict(q_lora_rank=None, first_k_dense_replace=2, norm_topk_prob=False,
                                           n_shared_experts=2, num_hidden_layers=4), 24),
    # released-style YaRN (mscale == mscale_all_dim == 1), 3 dense layers, 2 groups keep 1
    ("yarn-dense3-groups", dict(rope_scaling=yarn(8.0, 16), first_k_dense_replace=3, num_hidden_layers=4,
                                n_group=2, topk_group=1, routed_scaling_factor=2.827), 48),
    # every layer MoE (Kimi-style, no groups), no q_lora, unnormalized, tied embeddings
    ("allmoe-tied", dict(first_k_dense_replace=0, num_hidden_layers=2, q_lora_rank=None, norm_topk_prob=False,
                         n_shared_experts=2, tie_word_embeddings=True, routed_scaling_factor=1.0), 16),
]
CASE_IDS = [c[0] for c in CASES]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def released(cfg: ModelConfig) -> ModelConfig:
    """What a checkpoint can carry of `cfg`: training-only fields at their defaults, kv heads explicit."""
    defaults = ModelConfig()
    return cfg.replace(num_key_value_heads=cfg.num_attention_heads,
                       **{k: getattr(defaults, k) for k in ModelConfig.TRAINING_ONLY})


def make_config(overrides: dict) -> ModelConfig:
    cfg = ModelConfig(**{**BASE, **overrides})
    if cfg.rope_scaling:  # keep transformers quiet: max positions = factor * original
        cfg = cfg.replace(max_position_embeddings=int(cfg.rope_scaling["factor"]
                                                      * cfg.rope_scaling["original_max_position_embeddings"]))
    return cfg


@torch.no_grad()
def perturb_(named_params, named_buffers, seed: int) -> None:
    """Norm weights 1 + N(0, 0.2) and correction biases N(0, 0.1): nothing left at its trivial init, so a
    mixed-up norm or an ignored bias shows in the logits."""
    g = gen(seed)
    for name, p in named_params:
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    for name, b in named_buffers:
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make_ours(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(generator=gen(seed))
    perturb_(model.named_parameters(), model.named_buffers(), seed + 1)
    return model.eval()


def make_hf(cfg: ModelConfig, seed: int = 0) -> DeepseekV3ForCausalLM:
    hf_cfg = DeepseekV3Config(**to_hf_config(cfg, torch.float32))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    assert isinstance(model, DeepseekV3ForCausalLM) and model.config._attn_implementation == "eager"
    perturb_(model.named_parameters(), model.named_buffers(), seed + 1)
    return model.eval()


def load_hf(path) -> DeepseekV3ForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                       output_loading_info=True)
    assert isinstance(model, DeepseekV3ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def token_ids(cfg: ModelConfig, seq: int, seed: int = 123, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def hf_name(ours: str) -> str:
    return ours if ours == "lm_head.weight" else f"model.{ours}"


def hf_param_view(hf_params: dict[str, torch.Tensor], ours: str, cfg: ModelConfig) -> torch.Tensor:
    """The HF in-memory tensor that corresponds to our parameter `ours` (HF fuses gate/up experts)."""
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", ours)
    if m:  # HF stores gate_up_proj [E, 2I, H] (gate rows first), ours [E, 2, I, H]: the same values
        layer, proj = m.groups()
        theirs = hf_params[f"model.layers.{layer}.mlp.experts.{proj}"]
        return theirs if proj == "down_proj" else theirs.view(theirs.shape[0], 2, -1, theirs.shape[-1])
    return hf_params[hf_name(ours)]


# ================================================================================== ours -> transformers
@pytest.mark.parametrize("overrides, seq", [c[1:] for c in CASES], ids=CASE_IDS)
def test_export_loads_in_transformers_with_same_logits(tmp_path, overrides, seq):
    cfg = make_config(overrides)
    ours = make_ours(cfg, seed=1)
    export_hf(ours, tmp_path / "ckpt", dtype=torch.float32)
    hf = load_hf(tmp_path / "ckpt")

    # the loaded weights are exactly ours
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(hf_param_view(hf_params, name, cfg), p), name
    for moe_idx, moe in enumerate(ours.moe_layers()):
        layer = cfg.first_k_dense_replace + moe_idx
        hf_bias = hf.model.layers[layer].mlp.gate.e_score_correction_bias
        assert hf_bias.dtype == torch.float32 and torch.equal(hf_bias, moe.gate.e_score_correction_bias)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    ids = token_ids(cfg, seq)
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids).logits, hf(ids).logits
    assert ours_logits.shape == hf_logits.shape == (2, seq, cfg.vocab_size)
    assert ours_logits.abs().max() > 1.0  # a real signal, not near-zero logits
    assert max_diff(ours_logits, hf_logits) <= LOGIT_TOL

    # explicit (per-sequence, offset) positions agree as well
    pos = torch.stack([torch.arange(seq) + 3, torch.arange(seq) + 11])
    with torch.no_grad():
        assert max_diff(ours(ids, positions=pos).logits, hf(ids, position_ids=pos).logits) <= LOGIT_TOL


def test_equivalence_is_sensitive_to_bias_and_yarn(tmp_path):
    """The comparisons above would notice a dropped correction bias or ignored YaRN: both move the logits
    far more than the tolerance."""
    cfg = make_config(CASES[0][1])
    ours = make_ours(cfg, seed=2)
    ids = token_ids(cfg, 40)
    with torch.no_grad():
        ref = ours(ids).logits
        saved = [m.gate.e_score_correction_bias.clone() for m in ours.moe_layers()]
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        assert max_diff(ours(ids).logits, ref) > 100 * LOGIT_TOL
        for m, b in zip(ours.moe_layers(), saved, strict=True):
            m.gate.e_score_correction_bias.copy_(b)
        plain = Transformer(cfg.replace(rope_scaling=None)).eval()
        plain.load_state_dict(ours.state_dict())
        assert max_diff(plain(ids).logits, ref) > 100 * LOGIT_TOL


# ================================================================================== transformers -> ours
@pytest.mark.parametrize("overrides, seq", [c[1:] for c in CASES], ids=CASE_IDS)
def test_import_of_transformers_checkpoint(tmp_path, overrides, seq):
    cfg = make_config(overrides)
    hf = make_hf(cfg, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf").eval()

    # the config survives transformers' rewrite (rope_parameters etc.)
    assert ours.cfg == released(cfg)

    # bit-identical tensors: vs transformers' own file and vs its in-memory parameters
    on_disk = read_hf_tensors(tmp_path / "hf")
    exported = dict(to_hf_tensors(ours.state_dict()))
    if cfg.tie_word_embeddings:
        exported.pop("lm_head.weight")
        on_disk.pop("lm_head.weight", None)
        assert ours.lm_head.weight is ours.embed_tokens.weight
    assert exported.keys() == on_disk.keys()
    for name, t in on_disk.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(hf_param_view(hf_params, name, cfg), p), name
    assert ours.rotary.inv_freq.dtype == torch.float32

    ids = token_ids(cfg, seq, seed=4)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= LOGIT_TOL


def test_import_keeps_fp32_router_of_bf16_checkpoint(tmp_path):
    """transformers (like the released checkpoints) saves a bf16 model with its router weights in fp32: the
    import keeps those bits, keeps the other tensors bf16, and an explicit dtype does not round the router."""
    cfg = make_config(CASES[0][1])
    hf = make_hf(cfg, seed=12).to(torch.float32)
    with torch.no_grad():  # fp32 router values that bf16 cannot hold, so rounding them would show
        for layer in hf.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.weight.add_(1e-3 * torch.randn(layer.mlp.gate.weight.shape, generator=gen(13)))
    bf16 = AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager", dtype=torch.bfloat16)
    bf16.load_state_dict(hf.state_dict())
    bf16.save_pretrained(tmp_path / "hf")
    on_disk = read_hf_tensors(tmp_path / "hf")
    gates = {k: t for k, t in on_disk.items() if k.endswith("mlp.gate.weight")}
    assert len(gates) == cfg.num_moe_layers and all(t.dtype == torch.float32 for t in gates.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in gates.values())
    assert on_disk["model.embed_tokens.weight"].dtype == torch.bfloat16

    for dtype in (None, torch.bfloat16):
        ours = import_hf(tmp_path / "hf", dtype=dtype)
        state = ours.state_dict()
        for name, t in gates.items():
            assert state[name.removeprefix("model.")].dtype == torch.float32, name
            assert torch.equal(state[name.removeprefix("model.")], t), name
        assert ours.embed_tokens.weight.dtype == torch.bfloat16
        assert all(m.experts.gate_up_proj.dtype == torch.bfloat16 for m in ours.moe_layers())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # transformers' zero-width MLP
def test_import_of_transformers_checkpoint_without_shared_experts(tmp_path):
    """With n_shared_experts 0 transformers still builds (and saves) a zero-width shared expert; the import
    skips its empty tensors and gives transformers' logits. Our own export of such a model round-trips."""
    cfg = make_config(dict(n_shared_experts=0, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                           topk_group=2))
    hf = make_hf(cfg, seed=14)
    hf.save_pretrained(tmp_path / "hf")
    on_disk = read_hf_tensors(tmp_path / "hf")
    empty = {k for k, t in on_disk.items() if ".shared_experts." in k}
    assert empty and all(on_disk[k].numel() == 0 for k in empty)  # what transformers writes today

    ours = import_hf(tmp_path / "hf").eval()
    assert ours.cfg == released(cfg)
    assert all(m.shared_experts is None for m in ours.moe_layers())
    exported = dict(to_hf_tensors(ours.state_dict()))
    assert exported.keys() == on_disk.keys() - empty
    assert all(torch.equal(exported[k], on_disk[k]) for k in exported)
    ids = token_ids(cfg, 24, seed=15)
    with torch.no_grad():
        ours_logits = ours(ids).logits
        assert max_diff(ours_logits, hf(ids).logits) <= LOGIT_TOL

    export_hf(ours, tmp_path / "ours", dtype=torch.float32)
    assert not any(".shared_experts." in k for k in read_hf_tensors(tmp_path / "ours"))
    back = import_hf(tmp_path / "ours").eval()
    src = ours.state_dict()
    assert back.state_dict().keys() == src.keys()
    assert all(torch.equal(t, src[k]) for k, t in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours_logits)


def test_gradients_match_transformers(tmp_path):
    """d(cross-entropy)/d(every parameter) agrees with transformers (eval mode: our balance loss is 0)."""
    cfg = make_config(CASES[0][1])
    ours = make_ours(cfg, seed=5)
    export_hf(ours, tmp_path / "ckpt", dtype=torch.float32)
    hf = load_hf(tmp_path / "ckpt")
    ids = token_ids(cfg, 40, seed=6)
    labels = torch.randint(0, cfg.vocab_size, ids.shape, generator=gen(7))

    out = ours(ids)
    assert out.balance_loss.item() == 0.0
    F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten()).backward()

    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        theirs = hf_param_view(hf_grads, name, cfg)
        scale = theirs.abs().max().item()
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert max_diff(p.grad, theirs) <= 1e-4 * scale + 1e-9, (name, max_diff(p.grad, theirs), scale)
        checked += scale > 0
    assert checked > 30  # router, experts, MLA projections, norms, embeddings all carry gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_bit_exact_with_transformers(dtype):
    """Same rounding as DeepseekV3RMSNorm (normalize in fp32, cast, then scale) so bf16 runs match too."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from models.layers import RMSNorm

    ours, theirs = RMSNorm(64, eps=1e-6), DeepseekV3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen(40)))
        theirs.weight.copy_(ours.weight)
    ours.to(dtype), theirs.to(dtype)
    x = (4 * torch.randn(3, 5, 64, generator=gen(41))).to(dtype)
    assert torch.equal(ours(x), theirs(x))


# ========================================================================================= file layout
def test_export_layout(tmp_path):
    cfg = make_config(CASES[0][1])
    ours = make_ours(cfg, seed=8)
    out = export_hf(ours, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert out == tmp_path / "ckpt"

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["num_nextn_predict_layers"] == 0
    assert config["rope_scaling"] == cfg.rope_scaling and config["n_group"] == 4 and config["topk_group"] == 2
    assert not set(ModelConfig.TRAINING_ONLY) & config.keys()
    assert from_hf_config(config) == released(cfg)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    names, total = {}, 0
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / fname), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                names[key] = t.dtype
                total += t.numel() * t.element_size()
                assert index["weight_map"][key] == fname
    assert names.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == total

    # per-expert names for every routed expert of every MoE layer; nothing stacked
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for j in range(cfg.n_routed_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight" in names
        assert names[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] == torch.float32
        assert f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight" in names
    assert not [k for k in names if re.search(r"\.mlp\.experts\.(gate|up|down)_proj", k)]
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense first layer
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names and "model.norm.weight" in names
    expert_keys = sum(1 for k in names if ".experts." in k)
    assert expert_keys == 3 * cfg.n_routed_experts * cfg.num_moe_layers
    assert {d for k, d in names.items() if not k.endswith("e_score_correction_bias")} == {torch.bfloat16}
    assert len(names) == len(dict(to_hf_tensors(ours.state_dict())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = make_config(CASES[0][1])
    ours = make_ours(cfg, seed=9)
    export_hf(ours, tmp_path / "ckpt", dtype=dtype)
    back = import_hf(tmp_path / "ckpt")
    assert back.cfg == released(cfg)
    src = ours.state_dict()
    for name, t in back.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and torch.equal(t, src[name]), name
        elif name.endswith("mlp.gate.weight"):  # the router is imported in fp32, holding the file's values
            assert t.dtype == torch.float32 and torch.equal(t, src[name].to(dtype).float()), name
        else:
            assert t.dtype == dtype and torch.equal(t, src[name].to(dtype)), name
    # buffers that are not in the checkpoint stay float32 and are rebuilt exactly
    assert back.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(back.rotary.inv_freq, ours.rotary.inv_freq)
    for moe in back.moe_layers():
        assert moe.expert_load.dtype == torch.float32 and torch.all(moe.expert_load == 0)
    for v in back.max_logits().values():
        assert v.dtype == torch.float32 and torch.all(v == float("-inf"))

    ids = token_ids(cfg, 40, seed=10)
    with torch.no_grad():
        if dtype == torch.float32:
            assert torch.equal(back(ids).logits, ours(ids).logits)
        else:  # same as casting our own parameters to bf16
            cast = make_ours(cfg, seed=9)
            for p in cast.parameters():
                p.data = p.data.to(dtype)
            assert torch.equal(back(ids).logits, cast(ids).logits)

    # re-export of the imported model (dtype=None keeps the parameters' dtype) is the same checkpoint
    export_hf(back, tmp_path / "again", dtype=None)
    a, b = read_hf_tensors(tmp_path / "ckpt"), read_hf_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]


def test_sharded_export(tmp_path):
    cfg = make_config(CASES[1][1])
    ours = make_ours(cfg, seed=11)
    max_bytes = 16 * 1024
    out = export_hf(ours, tmp_path / "ckpt", dtype=torch.float32, max_shard_bytes=max_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 4
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    expected = dict(to_hf_tensors(ours.state_dict()))
    assert index["weight_map"].keys() == expected.keys()
    for fname in files:
        with safe_open(str(out / fname), framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
            assert size <= max_bytes or len(keys) == 1, (fname, size)
            assert all(index["weight_map"][k] == fname for k in keys)

    hf = load_hf(out)
    back = import_hf(out)
    ids = token_ids(cfg, 24, seed=12)
    with torch.no_grad():
        ref = ours(ids).logits
        assert max_diff(hf(ids).logits, ref) <= LOGIT_TOL
        assert torch.equal(back(ids).logits, ref)


def test_export_replaces_existing_directory(tmp_path, monkeypatch):
    cfg = make_config(CASES[3][1])
    first, second = make_ours(cfg, seed=13), make_ours(cfg, seed=14)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.safetensors").write_text("junk")
    (target / "config.json").write_text("{}")

    def siblings() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir())

    export_hf(first, target, dtype=torch.float32)
    assert not (target / "stale.safetensors").exists()
    assert siblings() == ["ckpt"]  # no temporary or backup directory left behind
    assert torch.equal(import_hf(target).lm_head.weight, first.lm_head.weight)

    # a backup left by an export that crashed between its two renames does not block the next export
    (tmp_path / ".ckpt.old" / "sub").mkdir(parents=True)
    (tmp_path / ".ckpt.old" / "sub" / "f").write_text("x")
    export_hf(second, target, dtype=torch.float32)
    assert siblings() == ["ckpt"]
    assert torch.equal(import_hf(target).lm_head.weight, second.lm_head.weight)

    # a failure while writing leaves the previous checkpoint untouched and no temporary directory
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(first, target, dtype=torch.float32)
    assert siblings() == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# ========================================================================================= conversions
def _write_hf_dir(path, cfg, tensors):
    path.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    return path


def test_import_skips_mtp_layers_and_checks_tensors(tmp_path):
    cfg = make_config(CASES[3][1])
    ours = make_ours(cfg, seed=15)
    tensors = dict(to_hf_tensors(ours.state_dict()))
    extra = dict(tensors)
    # a released checkpoint's multi-token-prediction layer (index num_hidden_layers) is ignored
    mtp = cfg.num_hidden_layers
    extra[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(4, 4)
    extra[f"model.layers.{mtp}.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 4)
    back = import_hf(_write_hf_dir(tmp_path / "mtp", cfg, extra))
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.5.up_proj.weight"}
    with pytest.raises(HFCheckpointError, match="experts.5.up_proj.weight' is missing"):
        import_hf(_write_hf_dir(tmp_path / "missing", cfg, missing))
    with pytest.raises(HFCheckpointError, match="not part of this model: \\['something.else'\\]"):
        import_hf(_write_hf_dir(tmp_path / "unexpected", cfg, {**tensors, "something.else": torch.zeros(1)}))
    fp8 = {**tensors, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv": torch.ones(1, 1)}
    with pytest.raises(HFCheckpointError, match="FP8-quantized weights .* dequantize them to bf16 first"):
        import_hf(_write_hf_dir(tmp_path / "fp8", cfg, fp8))
    wrong = {**tensors, "model.norm.weight": torch.zeros(cfg.hidden_size + 1)}
    with pytest.raises(HFCheckpointError, match="'model.norm.weight' has shape \\[" + str(cfg.hidden_size + 1)):
        import_hf(_write_hf_dir(tmp_path / "shape", cfg, wrong))


def test_check_hf_config_names_every_difference(tmp_path):
    cfg = make_config(CASES[3][1])
    export_hf(make_ours(cfg, seed=1), tmp_path / "hf", dtype=torch.float32)
    check_hf_config(cfg.replace(bos_token_id=1, aux_loss_alpha=0.5, init_from="x"), tmp_path / "hf")  # free fields
    other = cfg.replace(hidden_size=cfg.hidden_size * 2, rope_theta=cfg.rope_theta + 1)
    with pytest.raises(HFCheckpointError, match="model.hidden_size is .*model.rope_theta is") as err:
        check_hf_config(other, tmp_path / "hf")
    assert "config.json" in str(err.value)


def test_from_hf_config_released_style():
    """A config.json in the released Kimi-K2 style (rope_scaling, quantization, MTP fields) maps to ours."""
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "auto_map": {"AutoConfig": "x"},
        "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_nextn_predict_layers": 0, "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "ep_size": 1,
        "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "use_cache": True, "pad_token_id": 163839, "bos_token_id": 163584, "eos_token_id": [163585],
        "rope_theta": 50000.0,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.48.3",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"},
    }
    cfg = from_hf_config(released)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (61, 384, 8)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.num_attention_heads) == (1536, 512, 64)
    assert cfg.rope_scaling["factor"] == 32.0 and cfg.rope_theta == 50000.0 and cfg.eos_token_id == 163585
    assert cfg.aux_loss_alpha == ModelConfig().aux_loss_alpha  # the released inference field is not ours
    # the same through transformers' own (rope_parameters) rewrite
    hf_dict = DeepseekV3Config(**to_hf_config(cfg)).to_dict()
    assert "rope_parameters" in hf_dict
    again = from_hf_config(hf_dict)
    assert again.rope_scaling["factor"] == 32.0 and again.rope_theta == 50000.0
    assert again.replace(rope_scaling=None) == cfg.replace(rope_scaling=None)
    assert {k: v for k, v in again.rope_scaling.items()} == cfg.rope_scaling


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_document_masking_equals_each_document_alone_in_transformers(tmp_path, attn_impl):
    """Packed documents with `document_ids` (and positions restarting per document) give, token for token,
    the logits transformers gives each document run on its own; the max-logit tracker sees only allowed
    pairs."""
    from data.loader import document_positions

    cfg = make_config({}).replace(attn_impl=attn_impl)
    ours = make_ours(cfg, seed=3)
    export_hf(ours, tmp_path / "ckpt", dtype=torch.float32)
    hf = load_hf(tmp_path / "ckpt")
    eos = cfg.vocab_size - 1
    g = gen(5)
    docs = [torch.randint(0, eos, (n,), generator=g).tolist() + [eos] for n in (6, 1, 9, 4)]
    packed = torch.tensor([sum(docs, [])[:-1]])  # the window ends just before the last EOS
    positions, document_ids = document_positions(packed, eos)
    assert document_ids[0].tolist() == sum(([i] * len(d) for i, d in enumerate(docs)), [])[:-1]
    with torch.no_grad():
        ours.reset_max_logits()
        masked = ours(packed, positions=positions, document_ids=document_ids).logits[0]
        packed_max = torch.stack(list(ours.max_logits().values()))
        plain = ours(packed).logits[0]
        start, alone_max = 0, None
        for d in docs:
            ids = torch.tensor([d[: packed.shape[1] - start]])
            n = ids.shape[1]
            expected = hf(ids).logits[0]
            assert max_diff(masked[start : start + n], expected) <= LOGIT_TOL, (start, n)
            ours.reset_max_logits()
            ours(ids)
            m = torch.stack(list(ours.max_logits().values()))
            alone_max = m if alone_max is None else torch.maximum(alone_max, m)
            start += n
    torch.testing.assert_close(packed_max, alone_max, rtol=1e-5, atol=1e-5)
    assert max_diff(masked[6:], plain[6:]) > 1e-2  # without the mask, later documents see earlier ones
