"""`train.report`: PNG plots and a text summary from a run's metrics.jsonl, offline (no network, no wandb)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.metrics import _jsonable  # what the trainer writes: non-finite floats as null
from train.report import load_records, render
from train.report.__main__ import main
from train.report.plots import _load_matrix

matplotlib_image = pytest.importorskip("matplotlib.image")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPIKE_STEP = 57
NAN_STEP = 33
N_STEPS, N_LAYERS, N_EXPERTS = 120, 3, 8


def synthetic_records(*, new_keys: bool = True) -> list[dict]:
    """120 steps of a 4-layer MoE run (layers 1..3 MoE, 8 experts) with drifting loads, a loss spike at
    SPIKE_STEP, a NaN loss at NAN_STEP (update skipped), QK-Clip firing early, val records every 20 steps.
    `new_keys=False` writes an older run: no expert_load lists, no spike keys, no mfu/tflops."""
    rng = np.random.default_rng(0)
    recs, spikes, nonfinite, tokens = [], 0, 0, 0
    for step in range(1, N_STEPS + 1):
        base = 5.5 * math.exp(-step / 40) + 2.0
        loss = base + 0.03 * rng.standard_normal() + (2.5 if step == SPIKE_STEP else 0.0)
        grad = 1.0 / math.sqrt(step) + 0.05 * rng.random() + (4.0 if step == SPIKE_STEP else 0.0)
        if step == NAN_STEP:
            loss, grad = math.nan, math.inf
            nonfinite += 1
        tokens += 512
        rec = {"step": step, "loss": loss, "lm_loss": loss - 0.01, "balance_loss": 0.01, "grad_norm": grad,
               "lr": 3e-3, "tokens_per_s": 9000 + 100 * rng.standard_normal(), "tokens_seen": tokens,
               "step_time_s": 0.05, "peak_mem_gb": 0.5, "nonfinite_steps": nonfinite, "moe/dropped_tokens": 0}
        per_layer = [60 + 60 * math.exp(-step / 30) + 5 * layer for layer in range(N_LAYERS + 1)]
        rec["max_logit"] = max(per_layer)
        clipped_total = 0
        for layer, m in enumerate(per_layer):
            rec[f"attn/max_logit/layer{layer}"] = m
            clipped = int(m > 100.0)
            rec[f"qk_clip/heads_clipped/layer{layer}"] = clipped
            clipped_total += clipped
        rec["qk_clip/heads_clipped"] = clipped_total
        for layer in range(1, N_LAYERS + 1):
            # one expert drifts from hot to fair share: a visible diagonal in the heatmap
            raw = np.ones(N_EXPERTS) + 0.1 * rng.random(N_EXPERTS)
            raw[layer] += 3.0 * math.exp(-step / 25)
            share = raw / raw.sum()
            rec[f"moe/load_imbalance/layer{layer}"] = float(share.max() / share.mean())
            rec[f"moe/bias_spread/layer{layer}"] = 0.01 * step
            if new_keys and (step == 1 or step % 10 == 0):  # as the trainer: logging.expert_load_interval
                rec[f"moe/expert_load/layer{layer}"] = [round(x, 5) for x in share.tolist()]
        if new_keys:
            spike = step == SPIKE_STEP
            spikes += spike
            rec.update({"spike": spike, "spikes": spikes, "loss_baseline": base, "tflops": 1.5, "mfu": 0.012})
        recs.append(_jsonable(rec))
        if step % 20 == 0:
            recs.append({"step": step, "split": "val", "val_loss": base + 0.1, "val_ppl": math.exp(base + 0.1)})
    return recs


def write_run(run_dir: Path, recs: list[dict], *, tau: float | None = 100.0, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in recs) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    tau_txt = "null" if tau is None else str(tau)
    (run_dir / "config.yaml").write_text(f"optim:\n  qk_clip_tau: {tau_txt}\ntrain:\n  steps: {N_STEPS}\n")
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    img = matplotlib_image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.01, f"{path} is a single color"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    run = write_run(tmp_path_factory.mktemp("run") / "run", synthetic_records(), tail='{"step": 121, "lo')
    return run, render(run)


def test_load_records_parses_nonfinite_and_skips_truncated_line(rendered: tuple[Path, list[Path]]) -> None:
    run, _ = rendered
    steps, evals = load_records(run)
    assert [r["step"] for r in steps] == list(range(1, N_STEPS + 1))  # the cut-off step 121 is skipped
    assert [r["step"] for r in evals] == list(range(20, N_STEPS + 1, 20))
    bad = steps[NAN_STEP - 1]
    assert bad["step"] == NAN_STEP and math.isnan(bad["loss"]) and math.isnan(bad["grad_norm"])  # null: NaN
    assert isinstance(steps[0]["moe/expert_load/layer1"], list) and len(steps[0]["moe/expert_load/layer1"]) == 8


def test_older_runs_with_nonfinite_values_as_strings_still_read(tmp_path: Path) -> None:
    """Runs written before non-finite values became null wrote them as "nan" / "inf" / "-inf"."""
    recs = [{"step": 1, "loss": 2.0, "grad_norm": 1.0}, {"step": 2, "loss": "nan", "grad_norm": "inf"},
            {"step": 3, "loss": 1.9, "grad_norm": "-inf", "mfu": None}]
    steps, _ = load_records(write_run(tmp_path / "old", recs))
    assert math.isnan(steps[1]["loss"]) and steps[1]["grad_norm"] == math.inf and steps[2]["grad_norm"] == -math.inf
    assert steps[0]["loss"] == 2.0 and math.isnan(steps[2]["mfu"])


def test_sparse_expert_load_fills_a_uniform_step_grid() -> None:
    """Shares logged at steps 1, 10, 20 (every `expert_load_interval`): each grid cell shows the nearest one;
    more logged steps than columns are averaged; a null (or an older run's "nan") share stays a gap."""
    recs = [{"step": s, "k": [s / 100, 1 - s / 100]} for s in (1, 10, 20)]
    (lo, hi), grid = _load_matrix(recs, "k", max_columns=1000)
    assert (lo, hi) == (0.5, 20.5) and grid.shape == (2, 20)
    np.testing.assert_allclose(grid[0], [0.01] * 5 + [0.10] * 10 + [0.20] * 5)
    (lo, hi), grid = _load_matrix([{"step": s, "k": [s, "nan" if s % 2 else None]} for s in range(1, 101)], "k",
                                max_columns=10)
    assert grid.shape == (2, 10) and grid[0, 0] == pytest.approx(5.5) and np.isnan(grid[1]).all()


def test_render_writes_every_plot_and_a_summary(rendered: tuple[Path, list[Path]]) -> None:
    run, files = rendered
    out = run / "report"
    names = {p.name for p in files}
    expected = {"loss.png", "grad_norm.png", "max_logit.png", "expert_load.png", "load_imbalance.png",
                "throughput.png"}
    assert expected <= names and "summary.txt" in names
    assert all(p.parent == out for p in files)
    for name in expected:
        assert_png(out / name)

    summary = (out / "summary.txt").read_text()
    assert f"steps: {N_STEPS} logged (steps 1..{N_STEPS}) of {N_STEPS} planned" in summary
    assert f"loss spikes: 1 at steps {SPIKE_STEP}" in summary
    assert f"non-finite steps: 1 at steps {NAN_STEP}" in summary
    assert "tau 100" in summary and "above tau" in summary
    assert "QK-Clip:" in summary and "head rescalings" in summary
    assert "last val loss:" in summary and f"at step {N_STEPS}" in summary
    assert "MFU: mean 1.2%" in summary
    assert "unparsable lines skipped: 1" in summary
    for layer in range(1, N_LAYERS + 1):
        assert f"layer {layer} " in summary.split("load imbalance")[1]
    assert "skipped plots" not in summary


def test_old_format_run_degrades_gracefully(tmp_path: Path) -> None:
    """No expert_load lists, no spike keys, no mfu, tau null: loss/grad plots still render, summary explains."""
    run = write_run(tmp_path / "old", synthetic_records(new_keys=False), tau=None)
    (run / "report").mkdir()
    (run / "report" / "expert_load.png").write_bytes(b"stale")  # from an earlier render: must not survive
    names = {p.name for p in render(run, tmp_path / "out")}
    assert {"loss.png", "grad_norm.png", "max_logit.png", "summary.txt"} <= names
    assert "expert_load.png" not in names
    assert_png(tmp_path / "out" / "loss.png")
    assert_png(tmp_path / "out" / "grad_norm.png")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "skipped plots: expert_load.png" in summary and "moe/expert_load" in summary
    assert "loss spikes: n/a" in summary
    assert "tau null" in summary
    assert "MFU" not in summary

    render(run)  # default out dir: the stale heatmap is removed, not left to mislead
    assert not (run / "report" / "expert_load.png").exists()


def test_empty_metrics_does_not_crash(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')
    files = render(run)
    assert [p.name for p in files] == ["summary.txt"]
    assert "no training step records" in files[0].read_text()


def test_main_missing_metrics_exits_2_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere" / "metrics.jsonl") in err


@pytest.mark.slow
def test_cli_prints_summary_and_files(rendered: tuple[Path, list[Path]], tmp_path: Path) -> None:
    run, _ = rendered
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    code = ("import sys, train.report.__main__ as r; rc = r.main(sys.argv[1:]); "
            "assert 'wandb' not in sys.modules, 'the report imported wandb'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(run), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"loss spikes: 1 at steps {SPIKE_STEP}" in proc.stdout
    assert str(tmp_path / "cli" / "loss.png") in proc.stdout
    assert_png(tmp_path / "cli" / "expert_load.png")

    proc = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path / "missing")], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "missing" / "metrics.jsonl") in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path: Path) -> None:
    """The trainer's own JSONL renders, the expert-load heatmap included."""
    from train.config import load_config
    from train.trainer import Trainer

    run = tmp_path / "run"
    overrides = [f"train.out_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=64",
                 "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=0",
                 "logging.progress=false", "optim.warmup_steps=2", "train.steps=4"]
    Trainer(load_config(TINY, overrides)).run()
    names = {p.name for p in render(run)}
    for name in ("loss.png", "grad_norm.png", "max_logit.png"):
        assert name in names
        assert_png(run / "report" / name)
    steps, _ = load_records(run)
    summary = (run / "report" / "summary.txt").read_text()
    assert "steps: 4 logged (steps 1..4) of 4 planned" in summary
    # tiny.yaml logs the expert-load shares every 2 steps (and at step 1): the heatmap has them.
    assert [r["step"] for r in steps if "moe/expert_load/layer1" in r] == [1, 2, 4]
    assert "expert_load.png" in names
    assert_png(run / "report" / "expert_load.png")
