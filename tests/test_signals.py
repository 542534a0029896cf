"""Ctrl-C and scheduler signals against a real `python -m train` process: save and exit at a step boundary,
a second Ctrl-C leaves at once, a signal during start-up is honoured instead of killing the process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def start(out_dir: Path, cache_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"train.out_dir={out_dir}", f"data.cache_dir={cache_dir}", "train.steps=500", "train.eval_interval=0",
           "logging.progress=false", "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, out_dir: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = out_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run did not reach its first steps in time")


def steps_logged(out_dir: Path) -> list[int]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_ctrl_c_saves_at_the_next_step_boundary_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache")
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    reached = steps_logged(out)[-1]
    assert [s for s, _ in list_checkpoints(out)] == [reached]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"stopped by SIGINT at step {reached}; the checkpoint is saved and rerunning the same " \
                        "command resumes", err


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache")
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals sent together would reach Python's handler as one
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "without saving" in err and "Traceback" not in err, err
    assert not (out / "checkpoints").exists() or not list_checkpoints(out)


def test_a_stop_signal_during_start_up_is_honoured_once_start_up_is_done(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache")
    time.sleep(1.0)  # python -m train is still importing torch or building the run; SIGUSR1 would kill it
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGUSR1 at step 0; rerunning the same command resumes" in err, err
    assert not (out / "metrics.jsonl").exists() or steps_logged(out) == []
