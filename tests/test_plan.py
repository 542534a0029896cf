"""Tests for tools/plan.py and models/flops.py: parameter counts (vs the published numbers and
`transformers`' own model), analytic FLOPs (vs torch's FlopCounterMode on a real forward/backward),
per-GPU memory (vs hand arithmetic) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from models.config import ModelConfig
from models.flops import flops_breakdown, flops_per_token
from models.hf import to_hf_config
from models.transformer import Transformer
from tools.plan import (
    CATEGORIES,
    Layout,
    PlanError,
    count_params,
    main,
    memory_per_gpu,
)

ROOT = Path(__file__).resolve().parents[1]

# Published counts, as transformers' DeepseekV3ForCausalLM counts them (DESIGN.md).
PUBLISHED = {
    "k2-1t": (1_026_408_209_408, 32_861_477_888),
    "deepseek-v3-671b": (671_026_404_352, 37_552_282_624),
}


def preset(name: str) -> ModelConfig:
    conf = OmegaConf.load(ROOT / "configs" / f"{name}.yaml")
    return ModelConfig.from_dict(OmegaConf.to_container(conf.model, resolve=True))


def hf_meta_counts(cfg: ModelConfig) -> tuple[int, int, torch.nn.Module]:
    """Total / activated of transformers' own DeepseekV3ForCausalLM on the meta device, activated computed
    from HF's parameter names independently of tools.plan."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV3Config(**to_hf_config(cfg))
    assert getattr(hf_cfg, "num_nextn_predict_layers", 0) == 0  # no MTP modules in the count
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    total = activated = 0
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    for name, p in hf.named_parameters():
        total += p.numel()
        activated += p.numel() * k // e if ".mlp.experts." in name else p.numel()
    return total, activated, hf


# --- parameters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts_and_hf_equality(name: str) -> None:
    cfg = preset(name)
    ours = count_params(cfg)
    assert (ours.total, ours.activated) == PUBLISHED[name]
    assert sum(ours.breakdown.values()) == ours.total
    assert sum(ours.activated_breakdown.values()) == ours.activated
    hf_total, hf_activated, hf = hf_meta_counts(cfg)
    assert (hf_total, hf_activated) == PUBLISHED[name]
    # The name-based categories agree between the two naming schemes (HF fuses gate_up_proj).
    assert count_params(hf).breakdown == ours.breakdown


def test_tiny_counts_by_hand_and_hf() -> None:
    cfg = preset("tiny")
    attn = 128 * 64 + 64 * 4 * 48 + 128 * (32 + 16) + 32 * 4 * (32 + 32) + 4 * 32 * 128
    expert = 3 * 128 * 96
    norms = 4 * (128 + 128 + 64 + 32) + 128
    breakdown = {
        "embedding": 320 * 128, "attention": 4 * attn, "dense_ffn": 3 * 128 * 384, "router": 3 * 8 * 128,
        "shared_experts": 3 * expert, "routed_experts": 3 * 8 * expert, "norms": norms, "lm_head": 320 * 128,
    }
    pc = count_params(cfg)
    assert pc.breakdown == breakdown and tuple(pc.breakdown) == CATEGORIES
    assert pc.total == sum(breakdown.values()) == 1_434_112
    assert pc.activated == pc.total - 3 * 6 * expert == 770_560
    assert pc.activated_breakdown["routed_experts"] == 3 * 2 * expert
    assert hf_meta_counts(cfg)[:2] == (pc.total, pc.activated)
    # A real (non-meta) model gives the same count, and buffers (router bias) are not counted.
    real = Transformer(cfg)
    assert count_params(real) == pc
    assert pc.total == sum(p.numel() for p in real.parameters())


# --- FLOPs ------------------------------------------------------------------------------------------
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for torch._grouped_mm (the routed experts); supply one. Forward:
    [N, in] x [G, in, out]; weight grad: [in, N] x [N, out] -> [G, in, out] (ragged contraction)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    raise NotImplementedError(f"_grouped_mm {a_shape} x {b_shape}")


@pytest.mark.parametrize("variant", ["tiny", "tiny-no-q-lora"])
def test_flops_match_flop_counter(variant: str) -> None:
    """The analytic count equals the matmul FLOPs torch really runs (the eager kernel computes the full
    S x S scores, so compare with causal=False). Top-k routing sends every token to exactly k experts, so
    the routed FLOPs do not depend on which experts are chosen."""
    cfg = preset("tiny").replace(attn_impl="eager")  # the preset trains fused (sdpa); count the eager matmuls
    if variant == "tiny-no-q-lora":
        cfg = cfg.replace(q_lora_rank=None)
    torch.manual_seed(0)
    model = Transformer(cfg)
    b, s = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}

    with FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        model(ids)
    assert fwd.get_total_flops() == b * s * flops_per_token(cfg, s, training=False, causal=False)
    counts = {str(op): n for op, n in fwd.get_flop_counts()["Global"].items()}
    parts = flops_breakdown(cfg, s, causal=False)
    assert counts["aten.bmm"] == b * s * parts["attention_core"]
    if "aten._grouped_mm" in counts:  # else grouped_matmul fell back to a loop of mm (same FLOPs, in total)
        assert counts["aten._grouped_mm"] == b * s * parts["routed_experts"]

    with FlopCounterMode(display=False, custom_mapping=mapping) as both:
        out = model(ids)
        (out.logits.float().square().mean() + out.balance_loss).backward()
    assert both.get_total_flops() == b * s * flops_per_token(cfg, s, training=True, causal=False)


def test_causal_convention() -> None:
    """Causal: query i of S attends to i keys, so a token sees (S+1)/2 keys on average."""
    cfg = preset("k2-1t")
    s = 4096
    per_key = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    assert flops_breakdown(cfg, s)["attention_core"] * 2 == per_key * (s + 1)
    assert flops_breakdown(cfg, s, causal=False)["attention_core"] == per_key * s
    one_key = flops_breakdown(cfg, 1)["attention_core"]
    assert one_key == flops_breakdown(cfg, 1, causal=False)["attention_core"] == per_key
    assert flops_per_token(cfg, s) == 3 * flops_per_token(cfg, s, training=False)
    # Everything but attention is 2 FLOPs per activated matmul weight: activated minus embedding and norms.
    pc = count_params(cfg)
    parts = flops_breakdown(cfg, s)
    matmul_weights = pc.activated - pc.breakdown["embedding"] - pc.breakdown["norms"]
    assert sum(parts.values()) - parts["attention_core"] == 2 * matmul_weights


# --- memory -----------------------------------------------------------------------------------------
def test_memory_by_hand() -> None:
    cfg = preset("tiny")  # 1,434,112 params; 83,456 of them on AdamW under Muon (embed, head, norms)
    mem = memory_per_gpu(cfg, Layout(gpus=2, ep=2, optimizer="adamw"))
    assert mem.params_per_gpu == 1_434_112 / 2
    assert (mem.weights, mem.grads, mem.optimizer) == (717_056 * 4, 717_056 * 4, 717_056 * 8)
    assert mem.total == 717_056 * 16
    assert (mem.experts_per_rank, mem.expert_fsdp) == (4, 1)
    # Largest all-gathered unit: an MoE block, with 4 of its 8 experts, in bf16.
    attn, norms, expert = 51_200, 352, 36_864
    assert mem.largest_unit.startswith("layers.")
    assert mem.largest_unit_gathered == 2 * (attn + norms + 8 * 128 + expert + 4 * expert)

    non_matrix = 2 * 320 * 128 + 4 * 352 + 128
    muon = memory_per_gpu(cfg, Layout(gpus=4, ep=1, optimizer="muon", param_dtype="bf16", optim_dtype="bf16"))
    assert muon.weights == 1_434_112 / 4 * 2
    assert muon.grads == 1_434_112 / 4 * 4
    assert muon.optimizer == ((1_434_112 - non_matrix) * 1 + non_matrix * 2) / 4 * 2


def test_memory_k2_layout() -> None:
    """Fully sharded, every GPU holds total/N parameters whatever ep is; ep only changes what a block
    all-gathers (its 384/ep local experts)."""
    cfg = preset("k2-1t")
    total = PUBLISHED["k2-1t"][0]
    mem = memory_per_gpu(cfg, Layout(gpus=2048, ep=64))
    assert mem.params_per_gpu == pytest.approx(total / 2048, rel=1e-12)
    assert mem.total == pytest.approx(total / 2048 * 16, rel=1e-12)
    assert (mem.experts_per_rank, mem.expert_fsdp) == (6, 32)
    # With 6 local experts a block gathers less than the embedding (163840 x 7168, bf16) ...
    assert mem.largest_unit == "embed_tokens" and mem.largest_unit_gathered == 2 * 163_840 * 7_168
    # ... without EP a block gathers all 384 experts (> 31 GiB).
    one_ep = memory_per_gpu(cfg, Layout(gpus=2048, ep=1))
    assert one_ep.total == pytest.approx(mem.total, rel=1e-12)
    assert one_ep.largest_unit.startswith("layers.")
    assert one_ep.largest_unit_gathered > 2 * 384 * 3 * 2_048 * 7_168 > 31 * 2**30


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (Layout(gpus=6, ep=4), "--gpus 6 is not divisible by --ep 4"),
        (Layout(gpus=6, ep=3), "n_routed_experts=8 is not divisible by --ep 3"),
        (Layout(gpus=0), "--gpus must be >= 1"),
        (Layout(gpus=2, ep=2, optimizer="sgd"), "--optimizer must be one of"),
    ],
)
def test_bad_layout(layout: Layout, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        memory_per_gpu(preset("tiny"), layout)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_table() -> None:
    run = subprocess.run([sys.executable, "-m", "tools.plan", "--config", "configs/tiny.yaml", "--optimizer", "adamw"],
                         cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cfg = preset("tiny")
    assert "1,434,112" in run.stdout and "770,560" in run.stdout
    assert f"{flops_per_token(cfg, 128):,}" in run.stdout  # data.seq_len of tiny.yaml
    assert "seq_len 128" in run.stdout
    assert f"{1_434_112 * 16 / 2**20:.2f} MiB" in run.stdout  # 1 GPU: fp32 weights + grads + 2 AdamW states


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = str(ROOT / "configs" / "tiny.yaml")
    assert main(["--config", cfg_path, "--json", "--gpus", "2", "--ep", "2", "--seq-len", "64",
                 "--optimizer", "muon", "model.num_hidden_layers=3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = preset("tiny").replace(num_hidden_layers=3)
    assert plan["seq_len"] == 64
    moe_block = 51_200 + 352 + 8 * 128 + 9 * 36_864  # attention, norms, router, shared + 8 routed experts
    assert plan["params"]["total"] == count_params(cfg).total == 1_434_112 - moe_block
    assert plan["flops_per_token"]["training"] == flops_per_token(cfg, 64)
    assert plan["layout"] == {"gpus": 2, "ep": 2, "optimizer": "muon", "param_dtype": "fp32",
                              "grad_dtype": "fp32", "optim_dtype": "fp32", "compute_dtype": "bf16"}
    assert plan["memory"]["bytes_per_gpu"]["weights"] == plan["params"]["total"] / 2 * 4

    # A bad layout is a one-line error naming the flags and the valid choices, exit code 2, no traceback.
    assert main(["--config", cfg_path, "--gpus", "3", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: n_routed_experts=8 is not divisible by --ep 3") and "Traceback" not in err
    assert main(["--config", cfg_path, "--gpus", "6", "--ep", "4"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 6 is not divisible by --ep 4" in err
    assert "--ep values that fit --gpus 6 and 8 experts: 1, 2" in err


def test_cli_defaults_from_config(capsys: pytest.CaptureFixture[str]) -> None:
    """--ep defaults to the config's parallel.ep when it fits the world size, else 1."""
    k2 = str(ROOT / "configs" / "k2-1t.yaml")
    assert main(["--config", k2, "--json", "--gpus", "128"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["ep"] == 64 and plan["seq_len"] == 4096
    assert (plan["params"]["total"], plan["params"]["activated"]) == PUBLISHED["k2-1t"]
    assert main(["--config", k2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["ep"] == 1
