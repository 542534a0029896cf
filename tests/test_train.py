"""The single-process trainer on the tiny config and the built-in corpus: real runs, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoint import list_checkpoints
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus-cache"))


def small_overrides(out_dir: Path, cache_dir: str, **extra: object) -> list[str]:
    """The tiny preset shrunk further so a step takes a few tens of milliseconds."""
    base = {
        "train.out_dir": str(out_dir), "data.cache_dir": cache_dir, "data.seq_len": 64,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_interval": 0,
        "logging.progress": False, "optim.warmup_steps": 2,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_tiny_run_loss_falls(tmp_path: Path, cache_dir: str) -> None:
    """30 steps of the tiny preset (its own batch and sequence length) bring the loss clearly down."""
    cfg = load_config(TINY, [f"train.out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "train.steps=30",
                             "train.eval_interval=15", "logging.progress=false"])
    result = Trainer(cfg).run()
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    first, last5 = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert first > 5.0  # ~ln(320) at init: the model starts knowing nothing
    assert last5 < 0.65 * first, (first, last5)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    evals = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < first
    step = records[0]
    for key in ("loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "max_logit",
                "moe/load_imbalance/layer1", "moe/bias_spread/layer3"):
        assert key in step, key
    assert step["tokens_seen"] == 16 * 128 and step["tokens_per_s"] > 0
    assert 0 < step["balance_loss"] < 1e-2 and torch.isfinite(torch.tensor(step["max_logit"]))
    # the router biases moved away from zero: the auxiliary-loss-free update ran every step
    assert records[-2]["moe/bias_spread/layer1"] > 0
    assert result["step"] == 30 and (tmp_path / "config.yaml").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30]


@pytest.mark.slow
def test_same_seed_same_losses_and_seed_matters(tmp_path: Path, cache_dir: str) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = load_config(TINY, small_overrides(tmp_path / name, cache_dir, **{"train.steps": 4,
                                                                            "train.seed": seed}))
        Trainer(cfg).run()
        runs[name] = train_losses(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.slow
def test_resume_after_crash_is_bit_exact(tmp_path: Path, cache_dir: str) -> None:
    """A run of 6 steps vs. a run that checkpointed at 3, 'crashed', and resumed: identical losses."""
    straight = tmp_path / "straight"
    Trainer(load_config(TINY, small_overrides(straight, cache_dir, **{"train.steps": 6}))).run()

    crashed = tmp_path / "crashed"
    overrides = small_overrides(crashed, cache_dir, **{"train.steps": 6, "checkpoint.interval": 3,
                                                       "checkpoint.keep_last": 5})
    Trainer(load_config(TINY, overrides)).run()
    assert [s for s, _ in list_checkpoints(crashed)] == [3, 6]
    shutil.rmtree(crashed / "checkpoints" / "step-6")  # as if the process died after step 3's checkpoint
    (crashed / "checkpoints" / ".tmp-step-6").mkdir()  # ...while writing step 6: a partial dir is ignored

    resumed = Trainer(load_config(TINY, overrides))
    assert resumed.step == 3 and resumed.resumed_from is not None and resumed.resumed_from.name == "step-3"
    resumed.run()
    assert train_losses(crashed) == train_losses(straight)  # every step once, bit-identical
    assert [r["step"] for r in read_jsonl(crashed / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, cache_dir: str) -> None:
    """1 micro-batch of 8 vs 4 of 2: same loss and the same gradients reach the optimizer.

    (Parameters after the step are not compared: AdamW's first step is ~lr*sign(g), which turns float
    noise in near-zero gradients into lr-sized differences.)"""
    seen = {}
    for micro in (8, 2):
        cfg = load_config(TINY, small_overrides(tmp_path / f"m{micro}", cache_dir, **{
            "train.steps": 1, "train.micro_batch_size": micro, "checkpoint.save_final": False,
            "optim.warmup_steps": 0}))
        trainer = Trainer(cfg)
        grads: dict[str, torch.Tensor] = {}
        named = list(trainer.model.named_parameters())

        def capture(opt: torch.optim.Optimizer, args: object, kwargs: object, named=named, grads=grads) -> None:
            grads.update({n: p.grad.detach().clone() for n, p in named})

        trainer.optimizer.register_step_pre_hook(capture)
        seen[micro] = (trainer.train_step(), grads)
    (rec8, g8), (rec2, g2) = seen[8], seen[2]
    assert trainer.accum_steps == 4
    assert rec8["loss"] == pytest.approx(rec2["loss"], rel=1e-5)
    assert rec8["balance_loss"] == pytest.approx(rec2["balance_loss"], rel=1e-5)
    assert rec8["grad_norm"] == pytest.approx(rec2["grad_norm"], rel=1e-4)
    assert g8.keys() == g2.keys() and len(g8) > 10
    for k in g8:
        torch.testing.assert_close(g8[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_cli_trains_and_rejects_typos(tmp_path: Path, cache_dir: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "train", "--config", str(TINY),
           *small_overrides(tmp_path, cache_dir, **{"train.steps": 2})]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 1/2 | loss" in done.stdout and "tok/s" in done.stdout
    assert "done: loss" in done.stdout

    bad = subprocess.run([sys.executable, "-m", "train", "--config", str(TINY), "optim.lrr=1e-3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "unknown key 'lrr'" in bad.stderr and "did you mean 'lr'" in bad.stderr


def test_wandb_offline_run_is_written(tmp_path: Path, cache_dir: str) -> None:
    pytest.importorskip("wandb")
    cfg = load_config(TINY, small_overrides(tmp_path, cache_dir, **{
        "train.steps": 2, "logging.wandb.mode": "offline", "logging.wandb.name": "ci-offline"}))
    Trainer(cfg).run()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "offline run has no history file"
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)


def test_bf16_autocast_step_runs(tmp_path: Path, cache_dir: str) -> None:
    cfg = load_config(TINY, small_overrides(tmp_path, cache_dir, **{
        "train.steps": 1, "train.dtype": "bf16", "checkpoint.save_final": False, "optim.warmup_steps": 0}))
    trainer = Trainer(cfg)
    rec = trainer.train_step()
    assert trainer.compute_dtype == torch.bfloat16
    assert 4.0 < rec["loss"] < 8.0 and rec["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_capacity_factor_drops_are_counted(tmp_path: Path, cache_dir: str) -> None:
    """Dropless by default (0 dropped); a tight capacity drops token copies and the metrics say how many."""
    counts = {}
    for cf in ("null", "0.5"):
        cfg = load_config(TINY, small_overrides(tmp_path / cf, cache_dir, **{
            "train.steps": 1, "model.capacity_factor": cf, "checkpoint.save_final": False,
            "optim.warmup_steps": 0}))
        counts[cf] = Trainer(cfg).train_step()["moe/dropped_tokens"]
    assert counts["null"] == 0
    # 3 MoE layers x 512 tokens x top-2 copies; capacity 0.5 keeps at most half of them
    assert 3 * 512 * 2 // 2 <= counts["0.5"] < 3 * 512 * 2


def test_qk_clip_runs_in_the_trainer(tmp_path: Path, cache_dir: str) -> None:
    """With tau far below the logits every head is clipped after the step; with the default none is."""
    seen = {}
    for tau in ("100.0", "0.05"):
        cfg = load_config(TINY, small_overrides(tmp_path / tau, cache_dir, **{
            "train.steps": 2, "optim.qk_clip_tau": tau, "checkpoint.save_final": False}))
        trainer = Trainer(cfg)
        recs = [trainer.train_step() for _ in range(2)]
        seen[tau] = recs
    layers, heads = 4, 4
    assert all(r["qk_clip/heads_clipped"] == 0 for r in seen["100.0"])
    assert seen["0.05"][0]["max_logit"] > 0.05
    assert seen["0.05"][0]["qk_clip/heads_clipped"] == layers * heads  # every head's max exceeded tau
    assert "attn/max_logit/layer3" in seen["0.05"][0]
    # The clip runs after the optimizer update, so the next forward sees every head near tau (a new batch and
    # the shifted inputs of deeper layers move it a little); without the clip the logits are well above.
    assert seen["0.05"][1]["max_logit"] < 2 * 0.05 < seen["100.0"][1]["max_logit"]


def test_document_masking_changes_the_loss_and_trains(tmp_path: Path, cache_dir: str) -> None:
    from data.prepare import prepare

    src = tmp_path / "docs.jsonl"  # short documents, so every window packs several of them
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(3000)))
    prepare(tmp_path / "ds", inputs=[str(src)], val_fraction=0.05, workers=0, progress=False)
    losses = {}
    for masking in (False, True):
        cfg = load_config(TINY, small_overrides(tmp_path / str(masking), cache_dir, **{
            "train.steps": 3, "data.document_masking": masking, "data.source": tmp_path / "ds"}))
        trainer = Trainer(cfg)
        losses[masking] = [trainer.train_step()["loss"] for _ in range(3)]
        trainer.close()
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses[True][-1] != losses[False][-1]  # the mask reaches the model
