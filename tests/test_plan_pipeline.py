"""The planner's pipeline and offload sections (tools/plan_pipeline.py, parallel/schedule_sim.py), and an
independent FLOP count: DeepSpeed's profiler against models/flops.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.config import ModelConfig
from models.flops import flops_breakdown, flops_per_token
from models.transformer import Transformer
from tools.plan import Layout, PlanError, format_plan, load_plan_input, make_plan
from tools.plan_layout import Batch

ROOT = Path(__file__).resolve().parents[1]


# --- pipeline parallelism (tools/plan_pipeline.py) ------------------------------------------------------------
def test_pipeline_bubble_from_torchs_schedules_matches_the_1f1b_formula() -> None:
    from parallel.schedule_sim import simulate

    for pp, m in ((2, 4), (4, 8), (4, 16), (8, 32)):
        formula = (pp - 1) / (m + pp - 1)
        for schedule in ("gpipe", "1f1b"):
            assert simulate(schedule, pp, 1, m).bubble == pytest.approx(formula)
        assert simulate("interleaved_1f1b", pp, 2, m).bubble == pytest.approx((pp - 1) / (2 * m + pp - 1))
        for schedule in ("zbv", "interleaved_zb"):  # zero-bubble: the weight-gradient halves fill the gaps
            assert simulate(schedule, pp, 2, m).bubble < (pp - 1) / (2 * m + pp - 1)
        # 1F1B holds at most pp - rank micro-batches; GPipe holds all of them
        assert [sum(t.values()) for t in simulate("1f1b", pp, 1, m).peak_in_flight] == [pp - r for r in range(pp)]
        assert sum(simulate("gpipe", pp, 1, m).peak_in_flight[0].values()) == m


def test_pipeline_plan_of_the_published_k2_layout() -> None:
    """K2 as published: 2048 GPUs, pp 16 (interleaved 1F1B) x ep 16. Every parameter is on exactly one pipeline
    rank; each rank's memory is shown with both reshard_after_forward choices; bad layouts are refused."""
    cfg = load_plan_input(ROOT / "configs" / "k2-1t.yaml").cfg
    layout = Layout(gpus=2048, ep=16, optimizer="muon", pp=16, pp_schedule="interleaved_1f1b")
    plan = make_plan(cfg, 4096, layout, batch=Batch(micro_batch=1, global_batch=16384))
    section = plan["pipeline"]
    chosen = section["schedules"]["interleaved_1f1b"]
    assert section["micro_batches_per_run"] == 128 and chosen["virtual_stages"] == 2
    assert chosen["bubble"] == pytest.approx(15 / (2 * 128 + 15))
    ranks = chosen["ranks"]
    assert [r["stages"] for r in ranks] == [[r, r + 16] for r in range(16)]
    assert sorted(i for r in ranks for ls in r["layers"] for i in ls) == list(range(61))
    state_per_param = plan["memory"]["bytes_per_gpu"]["total"] / plan["memory"]["params_per_gpu"]
    held = sum(r["state_bytes"] for r in ranks) / state_per_param * 128  # x data-parallel ranks per stage
    assert held == pytest.approx(plan["params"]["total"], rel=1e-9)
    for r in ranks:
        assert r["total_bytes_reshard_false"] == pytest.approx(r["total_bytes_reshard_true"]
                                                               + r["gathered_weights_bytes"])
    fullest = max(ranks, key=lambda r: r["total_bytes_reshard_false"])  # the fit is the fullest pipeline rank's
    assert plan["fit"]["parts"]["state"] == fullest["state_bytes"]
    assert plan["fit"]["parts"]["activations"] == fullest["activation_bytes"]
    with pytest.raises(PlanError, match="--pp 3 must be >= 1 and divide --gpus 2048"):
        make_plan(cfg, 4096, dataclasses.replace(layout, pp=3))
    # 15360 sequences = 120 micro-batches per stage rank: interleaved 1F1B's rounds of 16 do not divide them
    with pytest.raises(PlanError, match="multiple of the number of rounds"):
        make_plan(cfg, 4096, layout, batch=Batch(micro_batch=1, global_batch=15360))
    text = format_plan(plan)
    assert "Pipeline: pp 16 x dp 128" in text and "interleaved_1f1b (chosen)" in text


def test_offload_moves_the_sharded_state_to_the_host() -> None:
    """--offload cpu: the fit per GPU loses exactly the sharded state, which the node's host memory holds."""
    cfg = load_plan_input(ROOT / "configs" / "k2-1t.yaml").cfg
    layout = Layout(gpus=256, ep=8, optimizer="muon")
    plain = make_plan(cfg, 4096, layout)
    off = make_plan(cfg, 4096, dataclasses.replace(layout, offload="cpu"))
    state = plain["memory"]["bytes_per_gpu"]["total"]
    assert off["offload"]["gpu_bytes"] == plain["offload"]["gpu_bytes"]  # both choices, whichever is chosen
    assert plain["fit"]["bytes"] - off["fit"]["bytes"] == pytest.approx(state)
    assert off["fit"]["parts"]["state"] == 0 and off["offload"]["host_bytes_per_node_cpu"] == pytest.approx(8 * state)
    assert "optim.offload: none" in format_plan(off)
    with pytest.raises(PlanError, match="--offload must be none or cpu"):
        make_plan(cfg, 4096, dataclasses.replace(layout, offload="nvme"))


def test_deepspeed_flops_profiler_agrees_with_the_planner() -> None:
    """An independent count: DeepSpeed's FLOPs profiler over one forward of `tiny` (2 x 64 tokens, fused attention)
    against the planner's forward FLOPs per token (models/flops.py), reconciled term by term, exactly.

    What the profiler cannot or does not count the same way, each added or removed explicitly:
    - the routed experts: neither it nor torch's FlopCounterMode sees `torch._grouped_mm`, and the per-expert loop
      (the fallback) multiplies with `@`, which it does not patch either: added from the planner's own term;
    - attention: it counts all S keys (SDPA's call, not causal): compared with the non-causal count, plus the
      zero-padding of v to the q/k head dim that MLA's fused path runs (d_v 32 -> 48);
    - QK-Clip's max-logit pass (q.k per query chunk, under no_grad): real work, not model FLOPs: added."""
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    cfg = OmegaConf.load(ROOT / "configs" / "tiny.yaml")
    cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
    b, s = 2, 64
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prof = FlopsProfiler(model)
    prof.start_profile()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (b, s)))
    profiled = 2 * prof.get_total_macs() / (b * s)
    prof.end_profile()

    planner = flops_breakdown(cfg, s, causal=False)
    h, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    v_padding = layers * 2 * h * (d_qk - cfg.v_head_dim) * s
    max_logit_pass = layers * 2 * h * d_qk * s
    assert profiled + planner["routed_experts"] == sum(planner.values()) + v_padding + max_logit_pass
    # and the remaining terms are the planner's own count with the causal discount the trainer's MFU uses
    assert flops_per_token(cfg, s, training=False, causal=False) == sum(planner.values())
