"""Runs that survive: exact resume on 1 and 4 ranks, resharding 4 -> 2 -> 1, SIGTERM, SIGKILL mid-checkpoint,
NaN steps, and torchrun's elastic restart after a worker dies. Real processes, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_harness import FOUR_RANK_STEPS, TORCHRUN_ENV, FourRankRun, four_rank_overrides, torchrun
from train.checkpoint import list_checkpoints, resolve_resume
from train.config import load_config
from train.trainer import Trainer, TrainingDiverged

pytestmark = pytest.mark.slow  # real torchrun worlds and kills: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = TORCHRUN_ENV

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus-cache"))


def overrides(out_dir: Path, cache_dir: str, **extra: object) -> list[str]:
    base = {"train.out_dir": out_dir, "data.cache_dir": cache_dir, "data.seq_len": 64, "train.global_batch_size": 8,
            "train.micro_batch_size": 2, "train.eval_interval": 0, "logging.progress": "false",
            "optim.warmup_steps": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


# --------------------------------------------------------------------------------------------- 4 ranks


@pytest.fixture(scope="module")
def four_rank_runs(four_rank_run: FourRankRun) -> dict[str, Path]:
    """On 4 gloo ranks with experts over ep=2: the shared straight run (tests/conftest.py; async checkpoints at
    steps 4 and 8), and the same run stopped by SIGTERM to torchrun after a few steps (it saves at the next step
    boundary) and then restarted with the same command."""
    split = four_rank_run.out.parent / "split"
    args = four_rank_overrides(split, four_rank_run.cache_dir, **{"parallel.ep": 2})
    proc = torchrun(4, args, background=True)
    _wait_for(lambda: _logged_steps(split) >= 2, what="two steps")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    stopped = list_checkpoints(split)
    assert len(stopped) == 1 and 2 <= stopped[0][0] < FOUR_RANK_STEPS, stopped
    torchrun(4, args)
    return {"straight": four_rank_run.out, "split": split}


def test_stop_and_resume_is_bit_exact_on_four_ranks_with_expert_parallel(four_rank_runs: dict[str, Path]) -> None:
    straight, split = losses(four_rank_runs["straight"]), losses(four_rank_runs["split"])
    assert sorted(straight) == sorted(split) == list(range(1, FOUR_RANK_STEPS + 1))
    assert straight == split  # bit-identical floats, step by step


@pytest.mark.parametrize("nproc", [2, 1])
def test_checkpoint_of_four_ranks_reshards_to_fewer(four_rank_run: FourRankRun, tmp_path: Path, nproc: int) -> None:
    """The step-4 checkpoint of 4 ranks (ep=2) resumes on 2 ranks (ep=1) and on 1 process: step 5 matches."""
    ckpt = four_rank_run.out / "checkpoints" / "step-4"
    out = tmp_path / f"re{nproc}"
    args = four_rank_overrides(out, four_rank_run.cache_dir, **{"train.steps": 5, "checkpoint.resume": ckpt,
                                                                "checkpoint.save_final": "false"})
    if nproc == 1:
        trainer = Trainer(load_config(TINY, args))
        assert trainer.step == 4 and trainer.train_loader.samples_consumed == 32
        trainer.run()
    else:
        torchrun(nproc, [*args, "parallel.ep=1"])
    got, ref = losses(out), losses(four_rank_run.out)
    assert list(got) == [5]
    assert got[5] == pytest.approx(ref[5], rel=1e-5)  # only the reduction order differs


# --------------------------------------------------------------------------------------------- signals


def _wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_at_the_step_boundary_and_exits_cleanly(tmp_path: Path, cache_dir: str,
                                                                   signame: str) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--config", str(TINY),
           *overrides(out, cache_dir, **{"train.steps": 10_000, "checkpoint.save_final": "false"})]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged_steps(out) >= 3, what="three steps")
    proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"stopped by {signame}" in stderr
    saved = list_checkpoints(out)
    steps_done = max(losses(out))
    assert [s for s, _ in saved] == [steps_done] and 3 <= steps_done < 10_000
    resumed = Trainer(load_config(TINY, overrides(out, cache_dir, **{"train.steps": steps_done + 1})))
    assert resumed.step == steps_done and resumed.train_loader.samples_consumed == 8 * steps_done


def test_sigkill_while_writing_a_checkpoint_never_exposes_it(tmp_path: Path, cache_dir: str) -> None:
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    cmd = [sys.executable, "-m", "train", "--config", str(TINY),
           *overrides(out, cache_dir, **{"train.steps": 10_000, "checkpoint.interval": 1, "checkpoint.keep_last": 2})]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _logged_steps(out) >= 3 and ckpts.is_dir() and any(
            p.name.startswith(".tmp-step-") for p in ckpts.iterdir()), what="a checkpoint being written")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-step-")]
    assert partial, "the kill did not land during a checkpoint write"
    complete = list_checkpoints(out)
    assert complete and all((p / "COMPLETE").exists() for _, p in complete)
    last_step, last_path = complete[-1]
    assert resolve_resume("auto", out) == last_path  # never the partial one
    trainer = Trainer(load_config(TINY, overrides(out, cache_dir, **{"train.steps": last_step + 2,
                                                                     "checkpoint.interval": 1})))
    assert trainer.step == last_step
    trainer.run()
    assert list_checkpoints(out)[-1][0] == last_step + 2
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-step-")]  # the leftover was replaced


def test_async_checkpoints_resume_exactly(tmp_path: Path, cache_dir: str) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(TINY, overrides(straight, cache_dir, **{"train.steps": 6}))).run()
    first = Trainer(load_config(TINY, overrides(split, cache_dir, **{
        "train.steps": 4, "checkpoint.interval": 2, "checkpoint.async_save": "true",
        "checkpoint.save_final": "false"})))
    first.run()
    assert [s for s, _ in list_checkpoints(split)] == [2]  # step 4 is not an interval save (it is the end)
    resumed = Trainer(load_config(TINY, overrides(split, cache_dir, **{"train.steps": 6})))
    assert resumed.step == 2
    resumed.run()
    assert losses(split) == losses(straight)


# --------------------------------------------------------------------------------------------- NaN


class NaNAt(Trainer):
    """The real trainer whose loss is poisoned (NaN) on chosen steps, as a bad batch or an overflow would."""

    bad_steps: set[int] = set()

    def _loss(self, inputs, targets):
        lm, aux = super()._loss(inputs, targets)
        return (lm * float("nan"), aux) if self.step + 1 in self.bad_steps else (lm, aux)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path: Path, cache_dir: str) -> None:
    NaNAt.bad_steps = {3, 6, 7, 8}
    trainer = NaNAt(load_config(TINY, overrides(tmp_path, cache_dir, **{
        "train.steps": 20, "checkpoint.interval": 2, "train.max_bad_steps": 3, "checkpoint.keep_last": 5})))
    trainer.train_step()
    trainer.train_step()
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    rec = trainer.train_step()  # step 3: poisoned
    assert rec["nonfinite_steps"] == 1 and not rec["loss"] == rec["loss"]
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, router biases included
    trainer.train_step()  # step 4 is fine again
    assert not all(torch.equal(before[k], trainer.model.state_dict()[k]) for k in before)
    trainer.save()
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(up to step 8\).*last good checkpoint is .*step-6"):
        trainer.run()
    saved = [s for s, _ in list_checkpoints(tmp_path)]
    assert saved == [4, 6]  # step 6 was skipped, so its weights are still the good ones of step 5
    good = Trainer(load_config(TINY, overrides(tmp_path, cache_dir, **{"train.steps": 7})))
    assert good.step == 6 and good.nonfinite_steps == 2
    rec = good.train_step()
    assert rec["loss"] == rec["loss"]


def test_extending_a_finished_run_follows_the_new_schedule(tmp_path: Path, cache_dir: str) -> None:
    from optim.schedules import LRSchedule

    cfg = load_config(TINY, overrides(tmp_path, cache_dir, **{"train.steps": 3}))
    Trainer(cfg).run()  # WSD: decayed to the minimum at its end
    longer = load_config(TINY, overrides(tmp_path, cache_dir, **{"train.steps": 30}))
    trainer = Trainer(longer)
    expected = cfg.optim.lr * LRSchedule.from_config(vars(longer.optim), 30)(3)
    assert trainer.step == 3 and trainer.train_step()["lr"] == pytest.approx(expected)


def test_cli_reports_divergence_with_exit_code_3(tmp_path: Path, cache_dir: str) -> None:
    res = subprocess.run([sys.executable, "-m", "train", "--config", str(TINY),
                          *overrides(tmp_path, cache_dir, **{"train.steps": 6, "optim.lr": 1e30,
                                                             "optim.warmup_steps": 0, "train.max_bad_steps": 2})],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite" in res.stderr and "no checkpoint was written yet" in res.stderr


# --------------------------------------------------------------------------------------------- elastic


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_elastic_restart_after_a_worker_dies_loses_and_repeats_nothing_but_the_tail(
        tmp_path: Path, cache_dir: str) -> None:
    out = tmp_path / "run"
    steps, interval, gbs = 14, 3, 8
    proc = torchrun(2, [*overrides(out, cache_dir, **{"train.steps": steps, "checkpoint.interval": interval,
                                                      "train.sample_log": "true"})], restarts=1, background=True)
    log = out / "samples" / "rank1.txt"
    _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, what="step 5")
    workers = [p for p in _children(proc.pid) if "train" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    # The checkpoints the restart can resume from: after a moment (a save rank 0 was publishing completes), but
    # long before the restarted workers (seconds to start) can save or prune anything.
    time.sleep(0.5)
    saved = [s for s, _ in list_checkpoints(out)]
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout and sorted(losses(out)) == list(range(1, steps + 1))
    resumed = max(saved)  # the newest checkpoint when the worker died (step 3 at least: it died in step 5 or later)
    # Each rank's sample log: the first attempt's steps 1..d (d: the step it was in when the worker died), then
    # the restart's steps resumed+1..steps. Every global sample was trained on, and the only samples trained on
    # twice are those of the steps after that checkpoint, up to the step each rank had reached.
    seen: dict[int, int] = {}
    expected: set[int] = set()
    for rank in (0, 1):
        text = (out / "samples" / f"rank{rank}.txt").read_text()
        lines = [tuple(map(int, line.split())) for line in text.splitlines()]  # step, first sample, end
        reached = len(lines) - (steps - resumed)
        assert [s for s, _, _ in lines] == [*range(1, reached + 1), *range(resumed + 1, steps + 1)], (rank, lines)
        expected |= set(range(resumed + 1, reached + 1))
        for _, first, end in lines:
            for g in range(first, end):
                seen[g] = seen.get(g, 0) + 1
    assert sorted(seen) == list(range(steps * gbs)) and all(n <= 2 for n in seen.values())
    assert {g // gbs + 1 for g, n in seen.items() if n > 1} == expected
