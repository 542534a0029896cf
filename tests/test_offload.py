"""`optim.offload: cpu`: FSDP2 keeps the sharded state in host memory, AdamW steps on DeepSpeed's CPU Adam kernel
(optim/host_adam.py), and the run is the plain run: same losses, checkpoints that move between the two."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from optim import host_adam
from optim.host_adam import HostAdam
from tests.dist_harness import reporting_rank, run_reporting_ranks
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 20
COMMON = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_len=32",
          "train.eval_interval=0", "logging.progress=false", "optim.warmup_steps=2", "checkpoint.interval=10",
          "train.threads=1"]


def _cfg(run: Path, *extra: str):  # noqa: ANN202
    return load_config(TINY, [*COMMON, f"data.cache_dir={run.parent / 'cache'}", f"train.out_dir={run}", *extra])


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _train(run: Path, *extra: str) -> Trainer:
    trainer = Trainer(_cfg(run, *extra))
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def test_kernel_is_torch_adamw() -> None:
    """DeepSpeed's CPU Adam kernel (built once, cached in TORCH_EXTENSIONS_DIR) steps like torch.optim.AdamW:
    parameters, both moments and the step counter, over several steps with weight decay."""
    host_adam.reset_for_tests()
    kernel = HostAdam.load()
    assert kernel is not None, "DeepSpeed's CPU Adam op did not load (pip install -e '.[dev]' installs deepspeed)"
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(257, 33))
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v, step = ref.detach().clone(), torch.zeros(257, 33), torch.zeros(257, 33), torch.tensor(0.0)
    for _ in range(5):
        ref.grad = torch.randn(257, 33)
        opt.step()
        kernel.update([p], [ref.grad], [m], [v], [step], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    state = opt.state[ref]
    assert step.item() == state["step"].item() == 5
    torch.testing.assert_close(p, ref.detach(), rtol=0, atol=5e-6)
    torch.testing.assert_close(m, state["exp_avg"], rtol=0, atol=1e-6)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.slow  # four short training runs
@pytest.mark.parametrize(("optimizer", "resumes"), [("muon", True), ("adamw", False)])
def test_offloaded_run_is_the_plain_run_and_resumes_across(optimizer: str, resumes: bool, tmp_path: Path) -> None:
    """20 tiny steps: offloaded (FSDP2's CPUOffloadPolicy on a one-rank group, the kernel for AdamW groups) equals
    the plain run within 1e-5; an offloaded run resumes a plain checkpoint and the other way round (with Muon,
    whose state holds both kinds: momentum buffers and the AdamW groups' moments)."""
    host_adam.reset_for_tests()
    plain = tmp_path / "plain"
    _train(plain, f"optim.name={optimizer}")
    off = tmp_path / "offload"
    trainer = _train(off, f"optim.name={optimizer}", "optim.offload=cpu")
    assert trainer.optimizer.host_adam is not None  # the kernel, not the fallback
    state = torch.distributed.fsdp.fully_shard.state(trainer.model.layers["0"])
    assert type(state._fsdp_param_group.offload_policy).__name__ == "CPUOffloadPolicy"
    want = _losses(plain)
    assert _losses(off) == pytest.approx(want, rel=1e-5, abs=1e-6)

    crossings = (("plain-to-offload", plain, ("optim.offload=cpu",)), ("offload-to-plain", off, ()))
    for name, src, extra in crossings if resumes else ():
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step-10", run / "checkpoints" / "step-10")
        _train(run, f"optim.name={optimizer}", *extra)
        got = _losses(run)
        assert sorted(got) == list(range(11, STEPS + 1))
        assert got == pytest.approx({s: want[s] for s in got}, rel=1e-5, abs=1e-6)


def test_without_the_kernel_it_warns_once_and_steps_with_torch(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No deepspeed (or an op that cannot build): one warning naming the extra, torch's AdamW loop on the host,
    and the same losses."""
    import deepspeed.ops.op_builder as builders

    def broken(self: object, verbose: bool = True) -> None:
        raise RuntimeError("ninja: build stopped: subcommand failed")

    monkeypatch.setattr(builders.CPUAdamBuilder, "load", broken)
    host_adam.reset_for_tests()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _train(tmp_path / "fallback", "optim.offload=cpu", "train.steps=3", "checkpoint.interval=0")
        assert HostAdam.load() is None
    said = [str(w.message) for w in caught if "CPU Adam kernel" in str(w.message)]
    assert len(said) == 1 and 'pip install -e ".[deepspeed]"' in said[0] and "subcommand failed" in said[0]
    assert trainer.optimizer.host_adam is None
    host_adam.reset_for_tests()


def _offload_rank(rank: int, world: int, port: int, out: str) -> None:
    spec = json.loads((Path(out) / "spec.json").read_text())
    with reporting_rank(rank, world, port, out):
        os.environ["WORLD_SIZE"] = str(world)
        for run, overrides in spec["runs"]:  # one world, both runs in turn (a world costs seconds to start)
            _train(Path(run), *overrides)


@pytest.mark.slow
def test_offloaded_fsdp_world_of_two_is_the_plain_run(tmp_path: Path) -> None:
    plain, off = tmp_path / "plain", tmp_path / "offload"
    work = tmp_path / "ranks"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps({"runs": [[str(plain), []], [str(off), ["optim.offload=cpu"]]]}))
    run_reporting_ranks(_offload_rank, 2, work, timeout=300)
    assert _losses(off) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
