"""The trainer on CUDA as users run it: `python -m train` in bf16 (FSDP2's policy, flex attention, grouped GEMM,
Muon with the Triton Newton–Schulz kernel), its GEMMs audited, compiled, and expert-parallel over two GPUs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests.gpu.runs import TINY, config, losses, overrides, run_module, train_in_process
from tests.test_mixed_precision import MatmulAudit
from train.trainer import Trainer

pytestmark = pytest.mark.gpu

# Two bf16 runs of the same steps that differ only in summation order (compiled kernels, other GEMM shapes per
# rank) drift apart by bf16 rounding, amplified by training; 2% per step is the bar bf16 meets against fp32
# (tests/test_mixed_precision.py), so a real bug (a dropped term, a wrong reduction) shows far above it.
BF16_LOSS_RTOL = 0.02


def assert_falls(curve: list[float], by: float = 1.5) -> None:
    """Finite, and the mean of the last three steps at least `by` nats below the first step (the tiny preset
    starts near ln(320) = 5.8; the CPU dry run's shrunk runs fall by 2.6 in 15 steps, 2.2 in 10)."""
    assert curve and all(math.isfinite(x) for x in curve), curve
    assert sum(curve[-3:]) / 3 < curve[0] - by, curve


class CompiledAwareAudit(MatmulAudit):
    """The audit of tests/test_mixed_precision.py, able to stand around the CUDA step: flex attention runs as a
    torch.compile'd kernel (which a plain dispatch mode would disable, and whose higher-order op it cannot
    dispatch), so the mode stays out of compiled code and lets higher-order ops through unchanged."""

    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def test_bf16_tiny_run_loss_falls(tmp_path: Path, corpus_cache: Path, device: torch.device) -> None:
    """`python -m train --config configs/tiny.yaml train.dtype=bf16 train.device=cuda` (shrunk): the run says it
    is on the GPU in bf16, every step is finite, and the loss falls clearly."""
    out = tmp_path / "run"
    stdout = run_module(["-m", "train", "--config", str(TINY), *overrides(out, corpus_cache, device)])
    assert f"device {device.type}" in stdout and "dtype torch.bfloat16" in stdout, stdout[:2000]
    curve = losses(out)
    assert len(curve) == config(out, corpus_cache, device).train.steps
    assert_falls(curve)


def test_bf16_step_runs_grouped_gemms_in_bf16_without_fallback(tmp_path: Path, corpus_cache: Path,
                                                               device: torch.device) -> None:
    """One real bf16 trainer step (two micro-batches) under the matmul audit: every `aten._grouped_mm` (forward,
    grad input, grad weight; one per projection, gate and up being one, per MoE layer per micro-batch) has bf16
    operands, no `aten.mm` runs inside a GroupedExperts forward (the per-expert fallback loop), and the only fp32
    GEMMs are the router's."""
    trainer = Trainer(config(tmp_path / "run", corpus_cache, device))
    try:
        assert trainer.device.type == device.type and trainer.compute_dtype == torch.bfloat16
        trainer.train_step()  # first step: flex attention compiles, the optimizer builds its state
        audit = CompiledAwareAudit()
        audit.watch(trainer.model, trainer.optimizer)
        with audit:
            rec = trainer.train_step()
    finally:
        trainer.close()
    assert math.isfinite(rec["loss"])
    cfg = trainer.cfg.model
    grouped = [c for c in audit.calls if c[0] == "_grouped_mm"]
    assert trainer.accum_steps == 2
    assert len(grouped) == 2 * 3 * cfg.num_moe_layers * trainer.accum_steps, audit.calls
    assert all(set(dtypes) == {torch.bfloat16} for _, dtypes, _ in grouped), grouped
    assert audit.expert_mms == 0
    fp32 = [c for c in audit.calls if torch.float32 in c[1]]
    assert len(fp32) == 3 * cfg.num_moe_layers * trainer.accum_steps, fp32
    assert all(any(cfg.n_routed_experts in s for s in shapes) for _, _, shapes in fp32), fp32
    assert audit.log_softmax_dtypes == {torch.float32}  # the loss


def test_compiled_blocks_train_like_eager(tmp_path: Path, corpus_cache: Path, device: torch.device,
                                          capsys: pytest.CaptureFixture) -> None:
    """`train.compile=true` (each block compiled by inductor) in bf16: the blocks are really compiled, the compile
    time is logged once, and 10 steps give eager's losses within BF16_LOSS_RTOL each, falling."""
    curves = {}
    for compiled in (False, True):
        cfg = config(tmp_path / str(compiled), corpus_cache, device, **{"train.steps": 10,
                                                                         "train.compile": str(compiled).lower()})
        capsys.readouterr()
        curves[compiled] = train_in_process(cfg)
        out = capsys.readouterr().out
        assert out.count("torch.compile: step 1 took") == int(compiled), out
    assert len(curves[True]) == 10
    for step, (eager, compiled) in enumerate(zip(curves[False], curves[True], strict=True), 1):
        assert compiled == pytest.approx(eager, rel=BF16_LOSS_RTOL), (step, curves)
    assert_falls(curves[True], by=1.0)


def test_compile_really_compiles_the_blocks(tmp_path: Path, corpus_cache: Path, device: torch.device) -> None:
    trainer = Trainer(config(tmp_path / "run", corpus_cache, device, **{"train.compile": "true"}))
    try:
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.model.layers.values())
    finally:
        trainer.close()


def test_expert_parallel_over_two_gpus_matches_one(tmp_path: Path, corpus_cache: Path,
                                                   device: torch.device) -> None:
    """`torchrun --nproc-per-node 2 -m train ... parallel.ep=2` (experts sharded over the two GPUs, tokens
    dispatched all-to-all over NCCL) gives the single-GPU run's losses within BF16_LOSS_RTOL per step."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    extra = {"train.steps": 10}
    single, dist = tmp_path / "single", tmp_path / "ep2"
    run_module(["-m", "train", "--config", str(TINY), *overrides(single, corpus_cache, device, **extra)])
    stdout = run_module(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "train",
                         "--config", str(TINY), *overrides(dist, corpus_cache, device, **extra), "parallel.ep=2"])
    assert len(re.findall(r"step +1/10 \|", stdout)) == 1, stdout[-3000:]  # rank 0 alone logs
    ref, got = losses(single), losses(dist)
    assert len(got) == len(ref) == 10
    for step, (a, b) in enumerate(zip(ref, got, strict=True), 1):
        assert b == pytest.approx(a, rel=BF16_LOSS_RTOL), (step, ref, got)
    assert_falls(got, by=1.0)
