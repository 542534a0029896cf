"""bench/train_throughput.py: the hooks that split a step into parts, the tables, and one shrunk trainer run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_throughput", ROOT / "bench" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_hooks_time_forward_and_backward_of_each_module():
    bench = _load_bench()
    timer = bench.PartTimer(cuda=False)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    assert bench.hook_modules(model, nn.Linear, "lin", timer) == 2
    x = torch.randn(32, 64, requires_grad=True)
    model(x).square().sum().backward()
    times = timer.collect()
    assert set(times) == {"lin_fwd", "lin_bwd"} and all(t > 0 for t in times.values())
    assert timer.collect() == {}  # collect() starts the next step from zero
    region = bench.timed_region(lambda name: torch.profiler.record_function(name), timer)
    with region("optimizer_step"):
        pass
    assert set(timer.collect()) == {"optimizer_step"}


def _run(tps: float, parts: dict[str, float]) -> dict:
    detail = {name: 1.0 for name in ("attention_fwd", "attention_bwd", "moe_fwd", "moe_bwd", "optimizer",
                                     "clip_grad_norm", "stats_reduce")}
    return {"tokens_per_s": tps, "step_ms": sum(parts.values()), "parts_ms": parts, "detail_ms": detail,
            "notes": []}


def test_table_reports_median_spread_shares_and_paired_ratios():
    bench = _load_bench()
    cur = [_run(t, {"attention": 40.0, "moe": 25.0, "optimizer": 15.0, "rest": 20.0}) for t in (90, 100, 110)]
    base = [_run(t, {"attention": 50.0, "moe": 25.0, "optimizer": 15.0, "rest": 10.0}) for t in (90, 100)]
    base.append({"error": "cannot build the trainer: no such key"})
    out = bench.table([("current", cur), ("baseline (abc1234)", base)])
    # the ratio pairs repeat i of both sides: the third current run has no partner
    assert "| tokens/s | 100 (90–110) | 95 (90–100) | 1.00× (1.00–1.00) tokens/s |" in out
    assert ("| attention | 40.0 (40.0–40.0) ms, 40.0 (40.0–40.0)% | 50.0 (50.0–50.0) ms, 50.0 (50.0–50.0)% "
            "| 0.80× (0.80–0.80) time |") in out
    assert "| attention bwd | 1.0 (1.0–1.0) | 1.0 (1.0–1.0) | 1.00× (1.00–1.00) time |" in out
    assert "- baseline (abc1234): 2 of 3 runs measured" in out and "failed: cannot build the trainer" in out
    alone = bench.table([("current", cur)])
    assert "current / baseline" not in alone and "| rest | 20.0 (20.0–20.0) ms, 20.0 (20.0–20.0)% |" in alone
    failed = bench.table([("current", cur), ("baseline (old)", [{"error": "no trainer"}])])
    assert "| tokens/s | 100 (90–110) | n/a | n/a tokens/s |" in failed


@pytest.mark.slow
def test_measure_run_splits_a_real_trainer_step():
    bench = _load_bench()
    r = bench.measure_run(str(ROOT / "configs" / "tiny.yaml"),
                          ["model.num_hidden_layers=2", "data.seq_len=32", "train.global_batch_size=4",
                           "train.micro_batch_size=4"], steps=3, warmup=1)
    assert "error" not in r and r["notes"] == [] and r["timed_steps"] == 2
    parts = r["parts_ms"]
    assert all(parts[p] > 0 for p in ("attention", "moe", "optimizer", "rest"))
    assert math.isclose(sum(parts.values()), r["step_ms"], rel_tol=1e-9)
    assert r["detail_ms"]["attention_bwd"] > 0 and r["detail_ms"]["moe_bwd"] > 0
