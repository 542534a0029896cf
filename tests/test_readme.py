"""README.md's "Using it" commands run as written, in order, after the quick start, on a fresh checkout.

Every command runs through bash, with `python` on PATH being this interpreter, in a temporary directory
holding only `configs/` (so `runs/...`, `data/mine` and `exported/` start absent, as on a fresh clone).
A command that trains gets `key=value` overrides appended that make it seconds-long and nothing else is
changed; a command the test does not know how to shorten fails the test rather than being skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# Appended to every training command (and so the same on a resume): a short warmup, so that the few steps
# are valid, and short sequences; the model and the batch layout stay the README's.
SHORTEN = ["optim.warmup_steps=1", "data.seq_len=32"]
FIRST_RUN_STEPS = 2  # a new run dir; a resumed one trains one step more than its previous run
RUNS_AS_IS = {"train.report", "tools.plan", "tools.export", "data.prepare"}  # seconds-long as written
TIMEOUT_S = 600  # per command: the multi-process launch on a busy 2-core machine is the slow one


def readme_snippets() -> tuple[str, list[str], str]:
    """(the quick start's train command, the "Using it" section's shell commands in order, its Python code)."""
    text = (ROOT / "README.md").read_text()
    quick_start = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0].split("&&")[-1].strip()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # join continuation lines as bash does
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(python) == 1, "expected one Python snippet in 'Using it'"
    return quick_start, commands, python[0]


def overrides_of(tokens: list[str]) -> list[str]:
    return [t for t in tokens[3:] if "=" in t and not t.startswith("-")]


def flag_value(tokens: list[str], flag: str) -> str | None:
    return tokens[tokens.index(flag) + 1] if flag in tokens else None


def trains(tokens: list[str]) -> bool:
    """Whether a command trains here (True), runs seconds-long as written (False), or is unknown (fails)."""
    module = tokens[2] if tokens[:2] == ["python", "-m"] and len(tokens) > 2 else None
    if module in RUNS_AS_IS:
        return False
    if module == "train":
        return "--print-config" not in tokens
    if module == "launch":
        if "--dry-run" in tokens:
            return False
        if "--slurm" not in tokens and flag_value(tokens, "--nodes") in (None, "1"):
            return True  # torchrun on this machine
    raise AssertionError(f"README command unknown to tests/test_readme.py; teach it to run this in seconds: "
                         f"{shlex.join(tokens)}")


class Session:
    """Runs README commands in order in one directory, remembering which run dirs hold which steps."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        bin_dir = cwd.parent / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / "python").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "OMP_NUM_THREADS": "1",  # 2 shared cores: extra intra-op threads only spin
                    "WANDB_SILENT": "true"}
        self.runs: dict[Path, tuple[int, int]] = {}  # run dir -> (README's train.steps, steps trained here)

    def run(self, command: str) -> str:
        tokens = shlex.split(command, comments=True)
        if not trains(tokens):
            return self._bash(command)
        assert not re.search(r"[$`|;&<>]", command.split("#")[0]), \
            f"a training command must be a plain command line so overrides can be appended: {command}"
        cfg = load_config(self.cwd / flag_value(tokens, "--config"), overrides_of(tokens))
        out_dir = (self.cwd / cfg.train.out_dir).resolve()
        readme_steps, steps = cfg.train.steps, FIRST_RUN_STEPS
        if out_dir in self.runs:  # a resume: it trains only if it asks for more steps than the run has
            before, trained = self.runs[out_dir]
            assert readme_steps > before, (
                f"this README command reuses train.out_dir={cfg.train.out_dir}, which an earlier command "
                f"trained to its train.steps={before}; it would resume a finished run: {command}")
            steps = trained + 1
        output = self._bash(shlex.join(tokens + [f"train.steps={steps}", *SHORTEN]))
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line).get("step", 0) for line in lines if line.strip()]
        assert logged and max(logged) == steps, f"{command}\ntrained to {max(logged, default=0)}, not {steps}"
        self.runs[out_dir] = (readme_steps, steps)
        return output

    def _bash(self, command: str) -> str:
        proc = subprocess.run(["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed (exit {proc.returncode}): {command}\n{output[-3000:]}"
        return output


@pytest.mark.slow
def test_readme_commands_run_in_order_on_a_fresh_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick_start, commands, python_snippet = readme_snippets()
    assert quick_start == "python -m train --config configs/tiny.yaml"
    cwd = tmp_path / "clone"
    cwd.mkdir()
    (cwd / "configs").symlink_to(ROOT / "configs")
    session = Session(cwd)

    session.run(quick_start)  # writes runs/tiny, as the quick start did before "Using it"
    for command in commands:
        output = session.run(command)
        tokens = shlex.split(command, comments=True)
        if tokens[2] == "train.report":  # the report draws its plots, not only the summary
            pngs = {p.name for p in (cwd / tokens[3] / "report").glob("*.png") if p.stat().st_size > 0}
            assert {"loss.png", "expert_load.png", "max_logit.png"} <= pngs, output
    assert (cwd / "exported" / "config.json").is_file()

    # The Python snippet: in this process (it only reads and writes files), in the same directory.
    from models import Transformer
    from models.hf import read_hf_tensors

    monkeypatch.chdir(cwd)
    scope: dict = {}
    exec(compile(python_snippet, "README.md (Using it)", "exec"), scope)
    assert isinstance(scope["model"], Transformer)
    exported, again = read_hf_tensors(cwd / "exported"), read_hf_tensors(cwd / "exported-again")
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[k], again[k]) and exported[k].dtype == again[k].dtype for k in exported)
