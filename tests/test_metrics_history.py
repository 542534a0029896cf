"""metrics.jsonl survives anything: a SIGKILL while a resume truncates it, a crash before the first checkpoint,
and non-finite values (strict JSON, read back by the report)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest

from train.config import load_config
from train.metrics import MetricsLogger, _truncate_after
from train.report import load_records
from train.report.summary import summarize
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only contend for the CPU

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _cfg(out_dir: Path, **extra: object):
    return load_config(TINY, [f"{k}={v}" for k, v in {"train.out_dir": out_dir, **extra}.items()])


def _steps(path: Path) -> list[tuple[int, str | None]]:
    """(step, split) of every line; fails on a line that is not strict JSON (no NaN, no cut-off record)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return [(r["step"], r.get("split")) for r in map(lambda s: json.loads(s, parse_constant=refuse),
                                                     path.read_text().splitlines())]


# ------------------------------------------------------------------------------------- kill mid-rewrite


def _history(steps: int, every: int = 100) -> list[bytes]:
    """The lines of a JSONL history of `steps` records of the real record's size (~2.4 kB: per-layer, per-head
    keys), with an eval record every `every` steps."""
    body = json.dumps({f"attn/max_logit/layer{i}/head{h}": 10.0 + i + h / 7 for i in range(8) for h in range(6)})
    lines = []
    for s in range(1, steps + 1):
        lines.append(f'{{"step": {s}, "loss": {3.0 + 1 / s!r}, {body[1:]}\n'.encode())
        if s % every == 0:
            lines.append(f'{{"step": {s}, "split": "val", "val_loss": 3.1}}\n'.encode())
    return lines


def _kill_during_rewrite(path: Path, step: int, delay: float) -> bool:
    """Truncate `path` after `step` in a forked process and SIGKILL it `delay` seconds after the first sign of
    a write in the directory (a new file, or the log's size / mtime changing). True when the kill landed
    before the process finished."""
    before = (sorted(os.listdir(path.parent)), os.stat(path).st_size, os.stat(path).st_mtime_ns)
    proc = multiprocessing.get_context("fork").Process(target=_truncate_after, args=(path, step))
    proc.start()
    deadline = time.monotonic() + 60
    while proc.is_alive() and time.monotonic() < deadline:
        st = os.stat(path)
        if (sorted(os.listdir(path.parent)), st.st_size, st.st_mtime_ns) != before:
            break
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.join()
    return proc.exitcode == -9


@pytest.mark.slow
def test_sigkill_while_a_resume_truncates_the_history_loses_nothing(tmp_path: Path) -> None:
    lines = _history(12_000)
    original = b"".join(lines)  # ~29 MB: a rewrite takes long enough to be killed in the middle
    assert len(original) > 20e6
    cut = 6_050
    kept = b"".join(line for line in lines if json.loads(line)["step"] <= cut)
    path = tmp_path / "metrics.jsonl"
    rng = random.Random(12)
    killed_mid_rewrite = 0
    for delay in [0.0, *(rng.uniform(0, 0.15) for _ in range(3))]:
        for leftover in set(tmp_path.iterdir()) - {path}:  # so that the first write seen is this rewrite's
            leftover.unlink()
        path.write_bytes(original)
        killed = _kill_during_rewrite(path, cut, delay)
        after = path.read_bytes()
        # Whole either way: the old history or the truncated one, never a prefix or a half-written file.
        assert after in (original, kept), (delay, len(after))
        killed_mid_rewrite += killed and after == original
    assert killed_mid_rewrite, "no kill landed during the rewrite"
    # The next resume (after a killed rewrite, maybe with its leftover file) completes the truncation.
    _truncate_after(path, cut)
    assert path.read_bytes() == kept and os.listdir(tmp_path) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------- every step once


def _log_steps(logger: MetricsLogger, steps: range, loss: float, eval_every: int = 3) -> None:
    for s in steps:
        logger.log({"step": s, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}, echo=False)
        if s % eval_every == 0:
            logger.log({"step": s, "split": "val", "val_loss": loss, "val_ppl": math.exp(loss)}, echo=False)


def test_no_step_is_logged_twice_after_any_restart(tmp_path: Path) -> None:
    """A restart from the checkpoint of step 4 keeps steps 1..4 (and the eval of step 3) and drops the rest,
    val records included; a fresh start in a directory whose earlier attempt crashed before its first
    checkpoint keeps nothing. TensorBoard shows the same history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, **{"logging.tensorboard": "true"})
    first = MetricsLogger(cfg, tmp_path)
    _log_steps(first, range(1, 8), loss=5.0)  # crashed after step 7; the last checkpoint was step 4
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # the record being written when it died
    resumed = MetricsLogger(cfg, tmp_path, resumed_step=4)
    assert _steps(tmp_path / "metrics.jsonl") == [(1, None), (2, None), (3, None), (3, "val"), (4, None)]
    _log_steps(resumed, range(5, 8), loss=4.0)
    resumed.close()
    got = _steps(tmp_path / "metrics.jsonl")
    assert [s for s, split in got if split is None] == list(range(1, 8))
    assert [s for s, split in got if split == "val"] == [3, 6]

    fresh = MetricsLogger(cfg, tmp_path, resumed_step=0)  # no checkpoint: everything is logged again
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    _log_steps(fresh, range(1, 3), loss=3.0)
    fresh.close()
    assert _steps(tmp_path / "metrics.jsonl") == [(1, None), (2, None)]

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == {1: 3.0, 2: 3.0}


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path: Path) -> None:
    """The real trainer: a first attempt logs step 1 and its eval, then dies before any checkpoint (here: none
    is written); the restarted run starts from step 1 again."""
    overrides = {"data.cache_dir": tmp_path / "cache", "data.seq_len": 32, "train.global_batch_size": 4,
                 "train.micro_batch_size": 4, "train.eval_interval": 1, "train.eval_batches": 1,
                 "logging.progress": "false", "checkpoint.save_final": "false", "optim.warmup_steps": 1,
                 "optim.name": "adamw"}
    Trainer(_cfg(tmp_path / "run", **overrides, **{"train.steps": 1})).run()
    restarted = Trainer(_cfg(tmp_path / "run", **overrides, **{"train.steps": 2}))
    assert restarted.step == 0
    restarted.run()
    assert _steps(tmp_path / "run" / "metrics.jsonl") == [(1, None), (1, "val"), (2, None), (2, "val")]


# ------------------------------------------------------------------------------------- non-finite values


def test_nonfinite_values_are_json_null_and_read_back_as_nan(tmp_path: Path) -> None:
    logger = MetricsLogger(_cfg(tmp_path), tmp_path)
    good = {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "tokens_seen": 8, "spike": False}
    logger.log({"step": 1, **good}, echo=False)
    logger.log({"step": 2, **good, "loss": math.nan, "grad_norm": math.inf, "max_logit": -math.inf,
                "spike": True, "moe/expert_load/layer1": [0.75, math.nan]}, echo=False)
    logger.log({"step": 3, **good}, echo=False)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _steps(tmp_path / "metrics.jsonl") == [(1, None), (2, None), (3, None)]  # strict JSON
    bad = json.loads(lines[1])
    assert bad["loss"] is None and bad["grad_norm"] is None and bad["max_logit"] is None
    assert bad["moe/expert_load/layer1"] == [0.75, None]

    steps, _ = load_records(tmp_path)
    assert math.isnan(steps[1]["loss"]) and math.isnan(steps[1]["grad_norm"]) and steps[0]["loss"] == 2.0
    assert math.isnan(steps[1]["moe/expert_load/layer1"][1])
    summary = summarize(steps, [], None)
    assert "non-finite steps: 1 at steps 2" in summary and "loss spikes: 1 at steps 2" in summary
