"""bench/mfu.py on CPU: a few steps of a shrunk tiny config through the real trainer, both routings."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_mfu", ROOT / "bench" / "mfu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mfu_benchmark_cpu_both_routings(capsys):
    mfu = _load_bench()
    rows = mfu.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--steps", "2", "--warmup", "1",
                     "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4"])
    out = capsys.readouterr().out
    by = {r["routing"]: r for r in rows}
    assert set(by) == {"natural", "balanced"}
    for r in rows:
        assert r["device"].type == "cpu" and r["peak_tflops"] > 0  # the measured matmul peak
        assert r["tokens_per_s"] > 0 and r["achieved_tflops"] > 0
        assert math.isclose(r["achieved_tflops"], r["flops_per_token"] * r["tokens_per_s"] / 1e12, rel_tol=1e-12)
        assert math.isclose(r["mfu"], r["achieved_tflops"] / r["peak_tflops"], rel_tol=1e-12)
        assert 0 < r["mfu"] < 1.5
        assert f"| {r['routing']} |" in out
    # 4 x 32 tokens x top-2 over 8 experts: exactly 32 copies each, in every layer and step
    assert by["balanced"]["imbalance"] == 1.0
    assert by["natural"]["imbalance"] >= 1.0
    assert "GFLOP/s" in out and "publish only the balanced" in out
