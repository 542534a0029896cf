"""What a person watching a run sees: step lines with a timestamp, elapsed time and an ETA, never sharing a
terminal line with the progress bar; and `train.profile`'s trace files."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import sys
import termios
import threading
from pathlib import Path

import pytest

from models.config import ConfigError
from train.config import load_config
from train.metrics import RunClock, format_duration
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def overrides(tmp_path: Path, **extra: object) -> list[str]:
    base = {"train.out_dir": tmp_path / "run", "data.cache_dir": tmp_path / "cache", "data.seq_len": 32,
            "train.global_batch_size": 4, "train.micro_batch_size": 4, "train.eval_interval": 0,
            "optim.warmup_steps": 1, "checkpoint.save_final": False}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_run_clock_paces_from_the_second_step() -> None:
    clock = RunClock(total_steps=10)
    assert clock.tick(1, step_time_s=30.0, now=100.0) == (30.0, None)  # the first step (compiling): no pace yet
    assert clock.tick(2, step_time_s=1.0, now=102.0) == (32.0, 16.0)  # 2 s per step since, 8 steps left
    assert clock.tick(4, step_time_s=1.0, now=104.0) == (34.0, 8.0)  # 4 s for 3 steps, 6 left
    assert format_duration(3725) == "1:02:05" and format_duration(2 * 86400 + 61) == "2d 0:01:01"


@pytest.mark.slow
def test_step_lines_stay_off_the_progress_bar_and_profile_writes_traces(tmp_path, monkeypatch) -> None:
    """On a real terminal (a pseudo-terminal), every step line starts its own line: the bar is cleared and
    redrawn around it. The traced steps leave a Chrome trace with the trainer's regions and an op table."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal has a size; tqdm uses it
    terminal = open(slave, "w", buffering=1)  # noqa: SIM115 - closed below
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = load_config(TINY, overrides(tmp_path, **{"train.steps": 3, "train.profile": "[2,3]",
                                                   "logging.progress": True}))
    trainer = Trainer(cfg)
    trainer.run()
    monkeypatch.undo()
    terminal.close()
    reader.join(timeout=10)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")

    assert "step/s]" in screen  # the bar was drawn
    step_lines = [line for line in screen.split("\n") if "| loss" in line]
    assert len(step_lines) == 3, screen
    for line in step_lines:
        visible = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rstrip("\r").split("\r")[-1])  # what the terminal shows
        assert re.match(STAMP + r" step [123]/3 \| loss ", visible), repr(line)
        assert re.search(r"\| \d+:\d\d:\d\d elapsed, eta (-|\d+:\d\d:\d\d)$", visible), repr(visible)
    assert "eta -" in step_lines[0] and "eta -" not in step_lines[2]

    profile = tmp_path / "run" / "profile"
    trace = json.loads((profile / "trace-rank0-steps2-3.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for region in ("forward_backward", "clip_grad_norm", "stats_reduce", "optimizer_step"):
        assert sum(1 for e in trace["traceEvents"] if e.get("name") == f"chogori/{region}") == 2, region  # 2 steps
    assert any(str(n).startswith("aten::") for n in names)
    assert "aten::" in (profile / "ops-rank0-steps2-3.txt").read_text()
    assert "profile: steps 2-3 traced" in screen


def test_profile_steps_must_be_consecutive(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train.profile: must list consecutive steps .* got \[3, 5\]"):
        load_config(TINY, overrides(tmp_path, **{"train.profile": "[3,5]"}))
