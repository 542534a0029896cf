"""bf16 training the way users run it: FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 master weights and
optimizer state, fp32 gradient reduction), also in one process, with the router and the loss in fp32.

The dtype of every matmul of a real trainer step is read off the dispatcher (a TorchDispatchMode sees each op
with its operands, forward and backward), so these tests fail if a weight reaches a GEMM in the wrong precision
or the experts fall back to their per-expert loop — which on a GPU would go unnoticed except as lost speed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.moe import GroupedExperts
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class MatmulAudit(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes) of every matmul while `active`, and counts the `mm` calls
    made inside an experts module's forward (its per-expert fallback loop; the grouped path makes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...], tuple[tuple[int, ...], ...]]] = []
        self.active = True
        self.in_experts = False
        self.expert_mms = 0
        self.log_softmax_dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]  # not offsets
        if self.active and func in MATMULS:
            name = func.overloadpacket.__name__
            if "attention" in name:  # q, k, v (forward) / grad, q, k (backward); the logsumexp is fp32 by design
                tensors = tensors[:3]
            self.calls.append((name, tuple(t.dtype for t in tensors), tuple(tuple(t.shape) for t in tensors)))
            self.expert_mms += self.in_experts and func is aten.mm.default
        if self.active and func is aten._log_softmax.default:
            self.log_softmax_dtypes.add(tensors[0].dtype)
        return func(*args, **(kwargs or {}))

    def watch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Flag the experts' forwards; leave the optimizer step (its Newton–Schulz GEMMs) out of the record."""
        def enter(*_: object) -> None:
            self.in_experts = True

        def leave(*_: object) -> None:
            self.in_experts = False
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.register_forward_pre_hook(enter)
                m.register_forward_hook(leave)
        if optimizer is not None:
            optimizer.register_step_pre_hook(lambda *_: setattr(self, "active", False))
            optimizer.register_step_post_hook(lambda *_: setattr(self, "active", True))


@pytest.fixture(autouse=True)
def _leave_the_group():
    """Each bf16 trainer here makes a one-rank process group; leave it, so no later test inherits it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _cfg(out: Path, cache: Path, **extra: object):
    overrides = {"train.out_dir": out, "data.cache_dir": cache, "logging.progress": "false",
                 "checkpoint.save_final": "false", "train.eval_interval": 0, "optim.warmup_steps": 0,
                 "data.seq_len": 64, "train.global_batch_size": 8, "train.micro_batch_size": 4, **extra}
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def test_bf16_step_runs_every_gemm_in_bf16_but_the_router(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path / "run", tmp_path / "cache", **{"train.dtype": "bf16"}))
    model, cfg = trainer.model, trainer.cfg.model
    audit = MatmulAudit()
    audit.watch(model, trainer.optimizer)
    with audit:
        rec = trainer.train_step()
    assert 4.0 < rec["loss"] < 8.0

    # Storage and optimizer state in fp32 (the master weights); FSDP2 placed every parameter, in one process too.
    assert all(p.dtype == torch.float32 and hasattr(p, "to_local") for p in model.parameters())
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert state and all(t.dtype == torch.float32 for t in state)

    # The experts: one grouped GEMM per projection (gate and up are one) with bf16 operands, never the per-expert
    # loop.
    moe_layers = cfg.num_moe_layers
    grouped = [c for c in audit.calls if c[0] == "_grouped_mm"]
    micro_batches = trainer.accum_steps
    assert len(grouped) == 2 * 3 * moe_layers * micro_batches  # forward, and grad input + grad weight in backward
    assert all(set(dtypes) == {torch.bfloat16} for _, dtypes, _ in grouped)
    assert audit.expert_mms == 0

    # The router scores in fp32: its forward GEMM and the two of its backward, and nothing else.
    fp32 = [c for c in audit.calls if torch.float32 in c[1]]
    assert len(fp32) == 3 * moe_layers * micro_batches, fp32
    assert all(set(dtypes) == {torch.float32} and any(cfg.n_routed_experts in s for s in shapes)
               for _, dtypes, shapes in fp32)
    others = [c for c in audit.calls if c not in fp32]
    assert others and all(set(dtypes) <= {torch.bfloat16} for _, dtypes, _ in others)
    assert audit.log_softmax_dtypes == {torch.float32}  # the loss


def test_bf16_router_weight_reaches_its_gemm_unrounded(tmp_path: Path) -> None:
    """Under the bf16 policy the router is its own fp32 FSDP unit: the weight its GEMM sees is the fp32 master
    weight, bit for bit (a bf16 copy would flip near-tied top-k choices; tests/test_moe.py measures how many)."""
    trainer = Trainer(_cfg(tmp_path / "run", tmp_path / "cache", **{"train.dtype": "bf16"}))
    block = next(b for b in trainer.model.layers.values() if hasattr(b.mlp, "gate"))
    router = block.mlp.gate
    master = router.weight.full_tensor().detach().clone()
    seen = []
    router.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    trainer.train_step()
    assert len(seen) == trainer.accum_steps
    assert all(w.dtype == torch.float32 and torch.equal(w, master) for w in seen)


@pytest.mark.slow
def test_bf16_loss_curve_stays_within_2_percent_of_fp32(tmp_path: Path) -> None:
    """20 `tiny` steps in bf16 (FSDP2 policy, one process) and in fp32: every loss within 2%."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        Trainer(_cfg(tmp_path / dtype, tmp_path / "cache", **{"train.dtype": dtype, "train.steps": 20})).run()
        lines = (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()
        losses[dtype] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses["bf16"]) == 20 and losses["bf16"][-1] < losses["bf16"][0] - 0.5
    gaps = [abs(b - f) / f for f, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    assert max(gaps) < 0.02, gaps


def test_the_audit_tells_a_grouped_gemm_from_the_fallback_loop() -> None:
    """The audit itself can fail: a float64 expert stack runs the per-expert loop, fp32 on CPU one grouped GEMM."""
    experts = GroupedExperts(4, 16, 32)
    for w in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(w)
    audit = MatmulAudit()
    audit.watch(experts)
    counts = torch.tensor([3, 3, 2, 2])
    with audit:
        experts(torch.randn(10, 16), counts)
    assert Counter(c[0] for c in audit.calls) == {"_grouped_mm": 2} and audit.expert_mms == 0
    with audit:
        experts.double()(torch.randn(10, 16, dtype=torch.float64), counts)
    assert audit.expert_mms == 2 * 4
