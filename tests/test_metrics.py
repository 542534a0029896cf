"""What a run logs: every metric with a sane value in the JSONL, the same history in an offline wandb run and in
TensorBoard, and loss spikes caught, on real runs of the tiny config."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from models import Transformer
from tests.wandb_history import history, run_info
from train.config import load_config
from train.spikes import SpikeDetector
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 9


def _overrides(out_dir: Path, cache_dir: Path, **extra: object) -> list[str]:
    base = {"train.out_dir": out_dir, "data.cache_dir": cache_dir, "data.seq_len": 64, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.eval_interval": 0, "logging.progress": "false",
            "optim.warmup_steps": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[int, torch.Tensor]]]:
    """The run, and how many token copies each MoE layer's router sent to each expert in each step's training
    forward, counted by hooks on the routers (independently of the trainer's own load accounting)."""
    out = tmp_path_factory.mktemp("metrics")
    cfg = load_config(TINY, _overrides(out / "run", out / "cache", **{
        "train.steps": STEPS, "train.eval_interval": 3, "train.eval_batches": 1, "logging.wandb.mode": "offline",
        "logging.tensorboard": "true", "logging.expert_load_interval": 4, "logging.peak_tflops": 0.5,
        "optim.qk_clip_tau": 0.05}))  # below every tiny head-max logit (~0.09-0.15), so QK-Clip really acts
    trainer = Trainer(cfg)
    experts = cfg.model.n_routed_experts
    routed: dict[int, dict[int, torch.Tensor]] = {}
    this_step: dict[int, torch.Tensor] = {}

    def counter(layer: int):
        def hook(router: torch.nn.Module, args: tuple, out: tuple) -> None:
            if router.training:  # evaluation forwards are not part of a step's load
                this_step[layer] = this_step.get(layer, 0) + torch.bincount(out[1].flatten(), minlength=experts)
        return hook

    for name, block in trainer.model.layers.items():
        if hasattr(block.mlp, "gate"):
            block.mlp.gate.register_forward_hook(counter(int(name)))
    step = trainer.train_step

    def traced_step() -> dict:
        this_step.clear()
        rec = step()
        routed[trainer.step] = dict(this_step)
        return rec

    trainer.train_step = traced_step
    trainer.run()
    return out / "run", routed


@pytest.fixture(scope="module")
def run(traced_run: tuple[Path, dict]) -> Path:
    return traced_run[0]


def _flops_per_token_bounds(cfg, seq_len: int) -> tuple[float, float]:
    """Training FLOPs per token counted by torch's FlopCounterMode on a forward of the model (not models.flops):
    3 x (matmuls with weights) <= F <= 3 x (those + the full, non-causal attention score and value matmuls);
    a causal count lies in between. float64 takes the experts' per-group matmul path, which the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    model = Transformer(dataclasses.replace(cfg.model, attn_impl="eager")).double()
    model.init_weights(seed=0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.model.vocab_size, (1, seq_len)))
    counts = {str(op): n / seq_len for op, n in counter.get_flop_counts()["Global"].items()}
    weights, scores = counts.pop("aten.mm"), counts.pop("aten.bmm")  # projections / attention q.k, p.v
    assert not counts, counts
    return 3 * weights, 3 * (weights + scores)


def test_every_metric_is_logged_with_a_sane_value(traced_run: tuple[Path, dict[int, dict[int, torch.Tensor]]]
                                                  ) -> None:
    run, routed = traced_run
    recs = _records(run)
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("split") == "val"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and [r["step"] for r in evals] == [3, 6, 9]
    cfg = load_config(TINY)
    layers = range(cfg.model.num_hidden_layers)
    moe_layers = range(cfg.model.first_k_dense_replace, cfg.model.num_hidden_layers)
    tokens = 8 * 64
    lo, hi = _flops_per_token_bounds(cfg, 64)
    bias = {i: torch.zeros(cfg.model.n_routed_experts, dtype=torch.float64) for i in moe_layers}
    for r in steps:
        assert 0 < r["lm_loss"] < 7 and r["loss"] == pytest.approx(r["lm_loss"] + r["balance_loss"])
        assert 0 < r["balance_loss"] < 0.01 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["tokens_seen"] == tokens * r["step"] and r["step_time_s"] > 0
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(tokens)
        # Achieved FLOP/s: the step's FLOPs from an independent count, over its measured time; MFU over the peak
        # this run set (logging.peak_tflops 0.5).
        flops = r["tflops"] * 1e12 * r["step_time_s"] / tokens
        assert lo * (1 - 1e-9) <= flops <= hi * (1 + 1e-9), (lo, flops, hi)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert 0.05 < r["peak_mem_gb"] < 24
        per_layer = [r[f"attn/max_logit/layer{i}"] for i in layers]
        assert r["max_logit"] == max(per_layer) > 0
        clipped = [r[f"qk_clip/heads_clipped/layer{i}"] for i in layers]
        assert r["qk_clip/heads_clipped"] == sum(clipped) > 0  # tau 0.05: every layer has heads above it
        for i in moe_layers:
            # Expert load: what the routers chose in this step's forward (every token's top-k copies, counted by
            # the hooks); the router bias: DeepSeek-V3's update, b += gamma * sign(mean load - load), from those.
            load = routed[r["step"]][i].double()
            assert load.sum() == tokens * cfg.model.num_experts_per_tok
            imbalance = (load.max() / load.mean()).item()
            assert imbalance > 1  # an untrained router is not perfectly balanced
            assert r[f"moe/load_imbalance/layer{i}"] == pytest.approx(imbalance, rel=1e-6)
            bias[i] += cfg.model.bias_update_speed * torch.sign(load.mean() - load)
            assert r[f"moe/bias_spread/layer{i}"] == pytest.approx((bias[i].max() - bias[i].min()).item(),
                                                                   abs=1e-6)
            shares = r.get(f"moe/expert_load/layer{i}")
            if r["step"] in (1, 4, 8):
                assert shares == pytest.approx((load / load.sum()).tolist(), abs=1e-5)
            else:
                assert shares is None
        assert r["moe/dropped_tokens"] == 0 and r["nonfinite_steps"] == 0
        assert r["spike"] is False and r["spikes"] == 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(0 < e["val_loss"] < 7 and e["val_ppl"] == pytest.approx(math.exp(e["val_loss"])) for e in evals)


def test_offline_wandb_run_holds_the_same_history(run: Path) -> None:
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert wandb_file.parent.name.endswith((run / "wandb_run_id").read_text().strip())
    rows = {row["_step"]: row for row in history(wandb_file) if "loss" in row}
    recs = [r for r in _records(run) if "loss" in r]
    assert sorted(rows) == [r["step"] for r in recs]
    for r in recs:
        row = rows[r["step"]]
        for key in ("loss", "lm_loss", "grad_norm", "lr", "max_logit", "attn/max_logit/layer2",
                    "moe/load_imbalance/layer1", "qk_clip/heads_clipped", "mfu"):
            assert row[key] == pytest.approx(r[key], rel=1e-12), (r["step"], key)
    val = {row["_step"]: row["val_loss"] for row in history(wandb_file) if "val_loss" in row}
    assert val == {r["step"]: pytest.approx(r["val_loss"]) for r in _records(run) if "val_loss" in r}


def test_tensorboard_events_hold_the_same_scalars(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in _records(run) if "loss" in r}
    assert "moe/load_imbalance/layer3" in acc.Tags()["scalars"]


# ----------------------------------------------------------------------------------------------- spikes


def test_spike_detector_flags_jumps_not_noise_or_trends() -> None:
    import random

    rng = random.Random(0)
    det = SpikeDetector(window=50, threshold=6.0, warmup=10)
    losses = [3.0 - 0.01 * i + rng.gauss(0, 0.02) for i in range(200)]  # falling, noisy
    losses[120] += 1.0  # a spike: ~50 noise standard deviations
    losses[121] += 0.6  # and its echo
    flagged = [i for i, x in enumerate(losses) if det.update(x).spike]
    assert flagged == [120, 121] and det.count == 2
    rising = SpikeDetector(window=50, warmup=10)  # a slowly rising curve (divergence starting) is not a spike
    assert not any(rising.update(2.0 + 0.002 * i + rng.gauss(0, 0.02)).spike for i in range(200))
    flat = SpikeDetector(warmup=5)
    assert not any(flat.update(2.0 + 1e-6 * (i % 3)).spike for i in range(100))  # a plateau: the spread floor
    check = flat.update(float("nan"))
    assert check.spike and check.baseline == pytest.approx(2.0, abs=1e-5)
    restored = SpikeDetector(warmup=5)
    restored.load_state_dict(flat.state_dict())
    assert restored.update(5.0).spike and restored.count == flat.count + 1


class SpikeAt(Trainer):
    """The real trainer with a synthetic spike: the loss (and so its gradient) is 3x at one step."""

    spike_step = 0

    def _loss(self, inputs, targets):
        lm, aux = super()._loss(inputs, targets)
        return (lm * 3, aux) if self.step + 1 == self.spike_step else (lm, aux)


@pytest.mark.slow
def test_a_synthetic_spike_in_a_real_run_is_detected_and_reported(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    SpikeAt.spike_step = 12
    cfg = load_config(TINY, _overrides(tmp_path / "run", tmp_path / "cache", **{
        "train.steps": 14, "logging.spike.warmup": 5, "logging.spike.window": 20, "checkpoint.save_final": "false"}))
    SpikeAt(cfg).run()
    recs = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in recs if r["spike"]] == [12]
    assert [r["spikes"] for r in recs][-3:] == [1, 1, 1]
    spike = recs[11]
    assert spike["loss"] > 2 * spike["loss_baseline"] > 0
    assert "loss spike at step 12" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path) -> None:
    args = {"logging.wandb.mode": "offline", "logging.wandb.tags": "[k2,ci]", "logging.wandb.project": "chogori-ci"}
    for steps in (2, 3):
        Trainer(load_config(TINY, _overrides(tmp_path / "run", tmp_path / "cache", **{"train.steps": steps,
                                                                                     **args}))).run()
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    # Same run id in both (a "-1" suffix when both start in the same second); `wandb sync` merges them.
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", r.name) for r in runs)
    steps = [[row["_step"] for row in history(next(r.glob("*.wandb"))) if "loss" in row] for r in runs]
    assert steps == [[1, 2], [3]]
    info = run_info(next(runs[0].glob("*.wandb")))
    assert info["project"] == "chogori-ci" and info["tags"] == ["k2", "ci"] and info["name"] == "run"
    assert info["config"]["train"]["steps"] == 2 and info["config"]["model"]["n_routed_experts"] == 8
