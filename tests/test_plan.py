"""Tests for tools/plan.py and models/flops.py: parameter counts (vs the published numbers and
`transformers`' own model), analytic FLOPs (vs torch's FlopCounterMode on a real forward/backward),
per-GPU memory (vs hand arithmetic), activation memory (vs what a real CPU forward leaves for the backward),
all-to-all bytes (vs a real gloo expert-parallel run; skew from a real tiny run), the step-time arithmetic and
the CLI."""

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
from tests.dist_harness import run_ranks
from tools.plan import (
    CATEGORIES,
    Layout,
    PlanError,
    count_params,
    main,
    make_plan,
    memory_per_gpu,
)
from tools.plan_activations import POLICIES, activation_memory, measure_activation_bytes
from tools.plan_comms import (
    DEFAULT_PROFILE,
    Hardware,
    busiest_factor,
    load_expert_profile,
    rank_shares,
    resample_shares,
)
from tools.plan_layout import Batch, ns_flops

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
@pytest.mark.slow
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
                              "grad_dtype": "fp32", "optim_dtype": "fp32", "compute_dtype": "bf16", "pp": 1,
                              "pp_schedule": "1f1b", "pp_virtual": -1, "offload": "none"}
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


# --- activation memory ------------------------------------------------------------------------------
# Wider than tiny and through the other code paths: no q_lora (q_proj), v_head_dim > qk_head_dim (q and k
# padded for SDPA, v a view of kv_b's output), 16 experts top-4, 2 shared experts, 2 dense layers.
WIDE = dict(hidden_size=256, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=64, v_head_dim=64,
            intermediate_size=512, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
            n_shared_experts=2, first_k_dense_replace=2, num_hidden_layers=4, vocab_size=512)


def _check_activations(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype) -> None:
    c = torch.empty((), dtype=dtype).element_size()
    for policy in POLICIES:
        measured = measure_activation_bytes(cfg, batch, seq, policy, dtype)
        counted = activation_memory(cfg, batch, seq, policy, c).total
        # The issue asks for 15%; the count is exact up to the loss's scalars (a few bytes).
        assert counted == pytest.approx(measured, rel=0.15), (policy, dtype)
        assert abs(counted - measured) <= 64, (policy, dtype, counted, measured)


def test_activation_memory_matches_measured_tiny() -> None:
    """The analytic count equals the bytes a real bf16 forward of the tiny preset leaves for the backward
    (storages alive after forward + loss, parameters excluded), under none / selective / full."""
    _check_activations(preset("tiny"), 2, 32, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_activation_memory_matches_measured_wide(dtype: torch.dtype) -> None:
    _check_activations(preset("tiny").replace(**WIDE), 2, 32, dtype)


@pytest.mark.slow
def test_activation_memory_matches_measured_eager_fp32() -> None:
    _check_activations(preset("tiny").replace(attn_impl="eager"), 2, 32, torch.float32)


def test_activation_memory_by_hand() -> None:
    """Full recompute keeps one [tokens, hidden] input per block; the rest is the loss head. Selective keeps
    less than none, more than full, and the recompute transient is the largest block under none."""
    cfg = preset("k2-1t")
    t, hid = 4096, 7168
    outside = 4096 * 64 * 2 + (t * hid * 4 + t * 4 + t * hid * 2) + t * hid * 2 + t * 163_840 * 4
    full = activation_memory(cfg, 1, 4096, "full")
    assert full.total == 61 * t * hid * 2 + outside
    none, sel = activation_memory(cfg, 1, 4096, "none"), activation_memory(cfg, 1, 4096, "selective")
    assert full.total < sel.total < none.total
    # (K2's dense first layer, SwiGLU of width 18432, holds more than an MoE layer, whose experts keep gate and up)
    assert sel.recompute_block == full.recompute_block == none.dense_layer > none.moe_layer
    assert none.recompute_block == 0


# --- all-to-all -------------------------------------------------------------------------------------
def _ep_worker(rank: int, world: int, path: str, policies: list[str]) -> None:
    """Tiny preset on a real gloo world with ep = world, forced balanced routing, one micro-batch, under each
    recompute policy: dispatch_bytes, the bytes of every all-to-all of token rows as the collective op received
    them (forward; backward, recompute included), and the activation bytes the forward left (EP + checkpointing,
    no FSDP: its gathered root weights would count as activations)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.moe import forced_balanced_routing
    from parallel import ParallelDims, build_mesh, dispatch_bytes, parallelize
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.fsdp import apply_activation_checkpointing
    from tools.plan_activations import measure_forward_bytes

    torch.set_num_threads(1)
    a2a = torch.ops._c10d_functional.all_to_all_single.default
    cfg = preset("tiny")
    mesh = build_mesh(ParallelDims(world, world, world), "cpu")
    torch.manual_seed(rank)
    x, y = torch.randint(0, cfg.vocab_size, (2, 32)), torch.randint(0, cfg.vocab_size, (2, 32))
    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.phase, self.seen = "forward", {"forward": 0, "backward": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is a2a and args[0].is_floating_point():  # token rows (not the split sizes' exchange)
                self.seen[self.phase] += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    res = {}
    for policy in policies:
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, mesh, activation_checkpointing=policy)
        model.to_empty(device="cpu")
        model.init_weights(seed=0)
        model.train()
        with forced_balanced_routing(model), Count() as count:
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + out.balance_loss
            count.phase = "backward"
            loss.backward()
        first_forward = dispatch_bytes(model)  # forwards only, not recomputes

        with torch.device("meta"):
            bare = Transformer(cfg)
        apply_expert_parallel(bare, mesh["ep"])
        apply_activation_checkpointing(bare, policy)
        bare.to_empty(device="cpu")
        bare.init_weights(seed=0)
        bare.train()
        with forced_balanced_routing(bare):
            held = measure_forward_bytes(bare, x, y)
        res[policy] = [first_forward, count.seen["forward"], count.seen["backward"], held]
    if rank == 0:
        torch.save(res, path)


@pytest.mark.parametrize("policies", [["none"], pytest.param(["selective", "full"], marks=pytest.mark.slow)])
def test_expert_parallel_bytes_match_gloo_ep(tmp_path: Path, policies: list[str]) -> None:
    """The planner's balanced all-to-all bytes equal what a real world-2, ep-2 gloo run of the tiny preset (fp32,
    forced balanced routing) hands to the collective, forward (= dispatch_bytes) and backward, under each
    recompute policy (full recompute re-sends the forward's rows; selective keeps them); and its activation
    count equals what the expert-parallel forward leaves for the backward."""
    run_ranks(_ep_worker, 2, str(tmp_path / "bytes.pt"), policies)
    measured = torch.load(tmp_path / "bytes.pt")
    cfg = preset("tiny")
    for policy in policies:
        dispatch, fwd, bwd, held = measured[policy]
        plan = make_plan(cfg, 32, Layout(gpus=2, ep=2, compute_dtype="fp32"),
                         batch=Batch(micro_batch=2, activation_checkpointing=policy))
        a2a = plan["communication"]["all_to_all"]
        assert a2a["forward_bytes_through_collective_per_micro_batch"] == dispatch == fwd, policy
        assert a2a["balanced"]["bytes_through_collective"] == fwd + bwd, policy
        assert a2a["balanced"]["bytes_on_wire"] == (fwd + bwd) / 2  # ep 2: half of each rank's rows stay home
        counted = activation_memory(cfg, 2, 32, policy, 4, ep=2).total
        assert counted == pytest.approx(held, rel=0.15) and abs(counted - held) <= 64, (policy, counted, held)


def test_expert_load_profile_and_skew(tmp_path: Path) -> None:
    """The shipped profile is a real tiny run's shares; the busiest-rank factor by hand; a balanced load is 1x;
    stretching a profile to more experts keeps each expert's load relative to the mean."""
    prof = load_expert_profile(DEFAULT_PROFILE)
    assert len(prof) >= 10 and all(len(s) == 8 and abs(sum(s) - 1) < 1e-9 for s in prof)
    assert "python -m train --config configs/tiny.yaml" in json.loads(DEFAULT_PROFILE.read_text())["note"]
    s = prof[0]
    p0, p1 = sum(s[:4]), sum(s[4:])  # ep 2: experts 0-3 on rank 0, 4-7 on rank 1
    assert busiest_factor(s, 8, 2) == pytest.approx(max(p0, p1, 1 - p0, 1 - p1) / 0.5)
    assert busiest_factor([1 / 8] * 8, 8, 2) == pytest.approx(1.0)
    assert busiest_factor([1 / 8] * 8, 384, 64) == pytest.approx(1.0)
    wide = resample_shares(s, 384)
    assert sum(wide) == pytest.approx(1) and max(wide) * 384 == pytest.approx(max(s) * 8)
    assert rank_shares(wide, 64)[0] == pytest.approx(s[0] / 8)  # 6 experts per rank, 48 per measured expert
    # a plain JSON list of shares (normalized), and a file that is none of the accepted forms
    (tmp_path / "one.json").write_text(json.dumps([3, 1, 1, 1, 1, 1, 1, 1]))
    assert load_expert_profile(tmp_path / "one.json") == [[0.3] + [0.1] * 7]
    (tmp_path / "bad.json").write_text(json.dumps({"shares": [[0.5, 0.5], [1.0]]}))
    with pytest.raises(ValueError, match="different lengths"):
        load_expert_profile(tmp_path / "bad.json")


@pytest.mark.slow
def test_skew_from_a_real_tiny_run(tmp_path: Path) -> None:
    """A few real steps of the tiny preset log per-expert shares; the planner reads that metrics.jsonl and its
    skewed all-to-all is the balanced one times the busiest-rank factor averaged over the logged shares."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.yaml", "train.steps=3",
                          "train.eval_interval=0", "optim.warmup_steps=1", "logging.expert_load_interval=1",
                          f"train.out_dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = out / "metrics.jsonl"
    shares = load_expert_profile(metrics)
    assert len(shares) == 3 * 3  # 3 steps x 3 MoE layers
    plan = make_plan(preset("tiny"), 128, Layout(gpus=2, ep=2), batch=Batch(micro_batch=8), expert_load=metrics)
    a2a = plan["communication"]["all_to_all"]
    factor = sum(busiest_factor(s, 8, 2) for s in shares) / len(shares)
    assert factor > 1
    assert a2a["skewed"]["busiest_rank_bytes_on_wire"] == pytest.approx(a2a["balanced"]["bytes_on_wire"] * factor)


# --- step time --------------------------------------------------------------------------------------
def test_step_time_k2_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    """k2-1t at 2048 GPUs, ep 64: each term from the figures the output names."""
    assert main(["--config", str(ROOT / "configs" / "k2-1t.yaml"), "--gpus", "2048", "--ep", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg, hw = preset("k2-1t"), Hardware()
    assert plan["batch"]["micro_batches_per_rank"] == 16384 // 2048 == 8
    tokens = 8 * 4096
    assert plan["compute"]["seconds"] == pytest.approx(flops_per_token(cfg, 4096) * tokens / (989e12 * 0.4))
    # all-to-all: 4 calls per MoE layer and micro-batch (dispatch, combine; their mirror in backward; selective
    # keeps the forward's results, so its recompute sends nothing) of tokens*k bf16 rows; 56 of 63 peers off node
    phase = 4096 * 8 * 7168 * 2 * 63 / 64
    a2a = plan["communication"]["all_to_all"]
    assert a2a["phases_per_step"] == 4 * 60 * 8
    assert a2a["balanced"]["seconds"] == pytest.approx(4 * 60 * 8 * phase * 56 / 63 / 50e9)
    assert a2a["skewed"]["seconds"] > a2a["balanced"]["seconds"]
    # FSDP: experts (E/ep per rank) all-gathered twice per micro-batch over 32 ranks, bf16, at 50 GB/s
    pc = count_params(cfg)
    experts = pc.breakdown["routed_experts"]
    dense = pc.total - experts
    root = pc.breakdown["embedding"] + pc.breakdown["lm_head"] + 7168  # + the final norm: gathered once
    fs = plan["communication"]["fsdp"]
    assert (fs["dense_group"], fs["expert_group"]) == (2048, 32)
    gather = 8 * ((2 * (dense - root) + root) * 2 * 2047 / 2048 + 2 * experts / 64 * 2 * 31 / 32)
    scatter = dense * 4 * 2047 / 2048 + experts / 64 * 4 * 31 / 32  # fp32, once per step (grad_sync: step)
    assert fs["all_gather_bytes"] == pytest.approx(gather) and fs["reduce_scatter_bytes"] == pytest.approx(scatter)
    assert fs["seconds"] == pytest.approx((gather + scatter) / 50e9)
    # Newton-Schulz: the planner's count is optim's, over every Muon matrix, split over all GPUs
    from optim.distributed_ns import ns_flops as optim_ns_flops

    for shape in ((384, 2048, 7168), (7168, 2048), (1536, 7168), (64 * 192, 1536)):
        assert ns_flops(shape) == optim_ns_flops(shape)
    assert plan["newton_schulz"]["flops_per_rank"] == pytest.approx(plan["newton_schulz"]["flops_total"] / 2048)
    expert_ns = 60 * 3 * 384 * ns_flops((2048, 7168))
    assert expert_ns < plan["newton_schulz"]["flops_total"] < 1.1 * expert_ns
    st = plan["step_time"]["balanced"]
    parts = plan["compute"]["seconds"], fs["seconds"], a2a["balanced"]["seconds"], plan["newton_schulz"]["seconds"]
    assert st["serial_seconds"] == pytest.approx(sum(parts))
    assert st["overlapped_seconds"] == pytest.approx(max(parts[0], parts[1]) + parts[2] + parts[3])
    assert plan["hardware"]["peak_flops"] == hw.peak_flops and len(plan["hardware"]["assumptions"]) >= 5
    # 8 micro-batches, one reduce-scatter: FSDP2 keeps the unsharded fp32 gradients of all it gathers between them
    assert plan["fit"]["parts"]["unsharded_grad_accumulation"] == pytest.approx((dense + experts / 64) * 4)
    # selective recompute at micro-batch 1 x 4096 with 61 layers on one GPU does not fit 141 GB
    assert plan["fit"]["parts"]["activations"] == plan["activations"]["selective"]["bytes"]
    assert not plan["fit"]["devices"]["H200"]["fits"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "4", "--ep", "2", "--global-batch", "12"], "global batch 12 is not a multiple of --gpus x "
                                                               "--micro-batch = 4 x 8 = 32"),
        (["--gpus", "12", "--ep", "2", "--global-batch", "96"], "--gpus 12 spans more than one node of 8 GPUs"),
        (["--gpus", "2", "--micro-batch", "0"], "--micro-batch must be >= 1"),
        (["--gpus", "2", "--ep", "2", "--expert-load", "/nonexistent.json"], "--expert-load: file not found"),
        (["--gpus", "2", "--mfu", "1.5"], "--mfu must lie in (0, 1]"),
    ],
)
def test_cli_refuses_layout(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_config_batch_for_another_layout(capsys: pytest.CaptureFixture[str]) -> None:
    """A config's global batch that does not split into whole micro-batches on --gpus (DeepSeek-V3's 15360 on
    2048 GPUs) is planned at the nearest that does, with a note; the same number given as a flag is refused."""
    dsv3 = str(ROOT / "configs" / "deepseek-v3-671b.yaml")
    assert main(["--config", dsv3, "--gpus", "2048", "--ep", "64", "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)["batch"]
    assert (batch["global_batch"], batch["micro_batches_per_rank"]) == (16384, 8) and "15360" in batch["note"]
    assert main(["--config", dsv3, "--gpus", "2048", "--ep", "64", "--global-batch", "15360"]) == 2
    assert "global batch 15360 is not a multiple of --gpus x --micro-batch = 2048 x 1" in capsys.readouterr().err
