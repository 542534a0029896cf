"""The step contract: host synchronisations per step do not grow with depth, statistics are counted once per
forward whatever the recompute policy, and the post-step hooks work on their own.

Syncs are counted by wrapping the Tensor methods that wait for the device (`item`, `tolist`, `__bool__`,
`__int__`, `__float__`, `cpu`, `numpy`) and `torch.cuda.synchronize`, counting calls made from the project's
own code (torch's internals, e.g. its optimizers' step counters, are not ours to change). Expert parallelism's
split sizes (parallel/expert_parallel.py) are counted separately."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.config import load_config
from train.trainer import Trainer

from .dist_harness import reporting_rank, run_reporting_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
OURS = tuple(str(ROOT / pkg) + os.sep for pkg in ("models", "optim", "parallel", "train", "data"))
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Counter of device->host waits by the file that asked for them (only files of the project)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name: str, fn):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS):
                counts[os.path.relpath(caller, ROOT)] += 1
            return fn(self, *args, **kwargs)
        return counted

    real_sync = torch.cuda.synchronize

    def cuda_sync(*args, **kwargs):
        counts["torch.cuda.synchronize"] += 1
        return real_sync(*args, **kwargs)

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    torch.cuda.synchronize = cuda_sync
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = real_sync


def config(out: Path, cache: str, **extra: object):
    base = {"train.out_dir": out, "data.cache_dir": cache, "data.seq_len": 32, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.eval_interval": 0, "logging.progress": False,
            "optim.warmup_steps": 1, "train.steps": 4, "optim.qk_clip_tau": 0.01,  # clips every step
            "logging.expert_load_interval": 1, "train.threads": 1}
    base.update(extra)
    return load_config(TINY, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus-cache"))


def syncs_per_step(trainer: Trainer, steps: int = 2) -> list[Counter]:
    trainer.train_step()  # the first step builds optimizer state: not representative
    out = []
    for _ in range(steps):
        with count_syncs() as counts:
            rec = trainer.train_step()
        assert rec["qk_clip/heads_clipped"] > 0 and any(k.startswith("moe/expert_load/") for k in rec)
        out.append(counts)
    return out


@pytest.mark.parametrize("layers", [4, pytest.param(24, marks=pytest.mark.slow)])
def test_two_host_syncs_per_step_at_any_depth(tmp_path: Path, cache_dir: str, layers: int) -> None:
    """Two waits per step (the finite check, the metrics record) with QK-Clip clipping and expert shares
    logged, at 4 and at 24 layers; none of them is torch.cuda.synchronize."""
    trainer = Trainer(config(tmp_path, cache_dir, **{"model.num_hidden_layers": layers}))
    for counts in syncs_per_step(trainer):
        assert sum(counts.values()) == 2, counts
        assert counts == Counter({"train/trainer.py": 1, "train/step_record.py": 1}), counts


def _fsdp_worker(rank: int, world: int, port: int, out: str, ep: int, cache: str) -> None:
    with reporting_rank(rank, world, port, out) as report:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
        trainer = Trainer(config(Path(out) / "run", cache, **{"parallel.ep": ep}))
        report["syncs"] = [dict(c) for c in syncs_per_step(trainer)]
        report["moe_layers"] = trainer.cfg.model.num_moe_layers
        report["micro_batches"] = trainer.accum_steps


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_fsdp_and_expert_parallel_steps_keep_the_two_syncs(tmp_path: Path, cache_dir: str, ep: int) -> None:
    """Under FSDP on 2 gloo ranks the same two waits; with ep=2 the dispatch's split sizes add at most one
    exchange per MoE layer per micro-batch, forward and backward together."""
    reports = run_reporting_ranks(functools.partial(_fsdp_worker, ep=ep, cache=cache_dir), 2, tmp_path)
    for report in reports.values():
        for counts in report["syncs"]:
            dispatch = counts.pop("parallel/expert_parallel.py", 0)
            assert counts == {"train/trainer.py": 1, "train/step_record.py": 1}, counts
            budget = report["moe_layers"] * report["micro_batches"] if ep > 1 else 0
            assert dispatch <= budget, (dispatch, budget)
            if ep > 1:
                assert dispatch > 0


class CollectiveCount(TorchDispatchMode):
    """Counts the collectives issued through the dispatcher (c10d ops: what FSDP2 and DTensor call), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _grad_sync_worker(rank: int, world: int, port: int, out: str, cache: str) -> None:
    with reporting_rank(rank, world, port, out) as report:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
        for mode in ("step", "micro_batch"):
            trainer = Trainer(config(Path(out) / mode, cache, **{"parallel.ep": 2, "train.micro_batch_size": 2,
                                                                 "parallel.grad_sync": mode}))
            losses, counts = [], []
            for _ in range(3):
                with CollectiveCount() as comm:
                    losses.append(trainer.train_step()["loss"])
                counts.append({op: n for op, n in comm.counts.items() if "reduce_scatter" in op})
            report[mode] = {"losses": losses, "reduce_scatters": counts, "micro_batches": trainer.accum_steps}


@pytest.mark.slow
def test_gradient_accumulation_reduce_scatters_once_per_step(tmp_path: Path, cache_dir: str) -> None:
    """FSDP2 reduce-scatters the gradients after the last micro-batch only (`parallel.grad_sync: step`), not after
    each (`micro_batch`): a third of the collectives here, and the same losses."""
    reports = run_reporting_ranks(functools.partial(_grad_sync_worker, cache=cache_dir), 2, tmp_path)
    for report in reports.values():
        once, each = report["step"], report["micro_batch"]
        assert once["micro_batches"] == each["micro_batches"] == 2
        per_step_once = [sum(c.values()) for c in once["reduce_scatters"]]
        per_step_each = [sum(c.values()) for c in each["reduce_scatters"]]
        assert min(per_step_once) > 0 and len(set(per_step_once)) == 1, per_step_once
        assert per_step_each == [2 * n for n in per_step_once], (per_step_each, per_step_once)
        assert once["losses"] == pytest.approx(each["losses"], rel=1e-6)


def test_statistics_are_counted_once_per_forward_under_any_recompute(tmp_path: Path, cache_dir: str) -> None:
    """The same expert loads, dropped copies and max logits with recompute off, selective and full (with a
    capacity factor, so that copies are dropped)."""
    seen = {}
    for policy in ("none", "selective", "full"):
        cfg = config(tmp_path / policy, cache_dir, **{"parallel.activation_checkpointing": policy,
                                                      "model.capacity_factor": 0.5})
        rec = Trainer(cfg).train_step()
        seen[policy] = {k: v for k, v in rec.items()
                        if k.startswith(("moe/expert_load/", "moe/load_imbalance/", "attn/max_logit/"))
                        or k == "moe/dropped_tokens"}
    m = cfg.model
    copies = cfg.train.global_batch_size * cfg.data.seq_len * m.num_experts_per_tok * m.num_moe_layers
    capacity = math.ceil(0.5 * cfg.train.micro_batch_size * cfg.data.seq_len * m.num_experts_per_tok
                         / m.n_routed_experts)  # per expert, layer and micro-batch (MoE.forward's formula)
    most_kept = capacity * m.n_routed_experts * m.num_moe_layers * cfg.train.global_batch_size \
        // cfg.train.micro_batch_size
    assert copies - most_kept <= seen["none"]["moe/dropped_tokens"] < copies
    assert seen["selective"] == seen["none"]
    assert seen["full"] == seen["none"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_debug_mode_sees_only_the_two_waits(tmp_path: Path, cache_dir: str) -> None:
    """On CUDA, torch's own sync detector (which also sees waits hidden inside torch ops, e.g. a boolean-mask
    index) reports no more than the step's two deliberate waits on an ordinary single-process step."""
    import warnings

    trainer = Trainer(config(tmp_path, cache_dir, **{"train.device": "cuda"}))
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, syncs
