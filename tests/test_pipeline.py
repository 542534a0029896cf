"""Pipeline parallelism (parallel/pipeline.py): the layer split, the stage views, and real gloo pipelines whose
losses, gradient norms, final weights (router biases and QK-Clip included) and checkpoints equal one process's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import Transformer
from models.config import ConfigError
from models.flops import flops_per_token, layer_flops
from parallel.pipeline import SCHEDULES, StageModule, plan_pipeline, split_layers, stage_ids, virtual_stages
from tests.dist_harness import reporting_rank, run_reporting_ranks
from tools.export import export_checkpoint, load_checkpoint_model
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# tiny-shaped: 4 layers (1 dense, 3 MoE) so that 2 ranks x 2 virtual stages get a layer each. QK-Clip at a
# threshold the run crosses, so the clip runs on every stage; 4 micro-batches per step.
STEPS = 10
COMMON = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "data.seq_len=32",
          "train.eval_interval=5", "train.eval_batches=1", "logging.progress=false", "optim.warmup_steps=2",
          "optim.qk_clip_tau=0.1", "checkpoint.interval=5", "train.threads=1"]


def _cfg(out: Path, *extra: str):  # noqa: ANN202
    return load_config(TINY, [*COMMON, f"data.cache_dir={out.parent / 'cache'}", f"train.out_dir={out}", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the split and the views (one process) ---------------------------------------------------------------------
def test_split_balances_forward_flops_and_counts_the_head() -> None:
    for preset, stages in (("k2-1t", 16), ("deepseek-v3-671b", 16), ("k2-1t", 32)):
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml").model
        split = split_layers(cfg, stages, 4096)
        assert [i for s in split for i in s] == list(range(cfg.num_hidden_layers)) and all(split)
        per_layer, head = layer_flops(cfg, 4096)
        assert sum(per_layer) + head == flops_per_token(cfg, 4096, training=False)
        cost = [sum(per_layer[i] for i in s) for s in split]
        cost[-1] += head
        assert max(cost) <= min(cost) + 2 * max(per_layer) + head
    k2 = load_config(ROOT / "configs" / "k2-1t.yaml").model
    # K2: 61 layers, the LM head costs about two layers, so the last stage takes one layer and the head
    assert [len(s) for s in split_layers(k2, 16, 4096)] == [4] * 15 + [1]
    with pytest.raises(ConfigError, match="need at least as many layers"):
        split_layers(k2, 62, 4096)


def test_split_is_the_best_cut_by_brute_force() -> None:
    """On a small model every way of cutting is tried: none has a cheaper slowest stage."""
    import itertools

    cfg = load_config(TINY, ["model.num_hidden_layers=9", "model.first_k_dense_replace=2"]).model
    per_layer, head = layer_flops(cfg, 64)
    for stages in (2, 3, 4):
        def slowest(bounds: tuple[int, ...]) -> int:
            edges = (0, *bounds, len(per_layer))
            costs = [sum(per_layer[a:b]) for a, b in itertools.pairwise(edges)]
            return max(costs[:-1] + [costs[-1] + head])

        best = min(slowest(c) for c in itertools.combinations(range(1, len(per_layer)), stages - 1))
        split = split_layers(cfg, stages, 64)
        assert slowest(tuple(s[0] for s in split[1:])) == best


def test_stage_placement_and_virtual_stages() -> None:
    assert [stage_ids("interleaved_1f1b", 4, 2, r) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stage_ids("zbv", 4, 2, r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stage_ids("1f1b", 4, 1, 2) == [2]
    assert virtual_stages("1f1b", -1) == 1 and virtual_stages("interleaved_1f1b", -1) == 2
    assert virtual_stages("interleaved_1f1b", 3) == 3
    with pytest.raises(ConfigError, match="zbv schedule runs exactly 2"):
        virtual_stages("zbv", 3)
    with pytest.raises(ConfigError, match="parallel.pp_schedule: must be one of"):
        virtual_stages("pipedream", -1)
    assert set(SCHEDULES) >= {"1f1b", "interleaved_1f1b", "zbv", "dualpipev"}


def test_stage_views_chained_equal_the_model_forward_and_gradients() -> None:
    """Four stage views over one model, run in turn: the logits, and the gradients of LM loss + balance loss
    (the balance loss entering through each stage's backward), equal the model's own forward/backward."""
    cfg = load_config(TINY).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids)
    (F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + out.balance_loss).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    plan = plan_pipeline(cfg, 16, 4, "1f1b", -1, 0)
    views = [StageModule(model, s, 4, plan.layers[s]) for s in range(4)]
    x = ids
    balance = torch.zeros(())
    for view in views:
        view.reset_balance_loss()
        x = view(x)
        balance = balance + view.balance_loss
    torch.testing.assert_close(x, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(balance, out.balance_loss.detach())
    F.cross_entropy(x.flatten(0, 1), targets.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7, msg=name)


# --- real pipelines (gloo, one process per rank) ---------------------------------------------------------------
def _pipeline_rank(rank: int, world: int, port: int, out: str) -> None:
    spec = json.loads((Path(out) / "spec.json").read_text())
    with reporting_rank(rank, world, port, out):
        os.environ["WORLD_SIZE"] = str(world)
        trainer = Trainer(_cfg(Path(spec["run"]), *spec["overrides"]))
        try:
            trainer.run()
        finally:
            trainer.close()


def _run_world(tmp: Path, name: str, world: int, *overrides: str) -> Path:
    work = tmp / f"{name}-ranks"
    work.mkdir()
    run = tmp / name
    (work / "spec.json").write_text(json.dumps({"run": str(run), "overrides": list(overrides)}))
    run_reporting_ranks(_pipeline_rank, world, work, timeout=400)
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run every pipeline must reproduce."""
    run = tmp_path_factory.mktemp("pp") / "single"
    trainer = Trainer(_cfg(run))
    trainer.run()
    trainer.close()
    return run


def _assert_same_run(got: Path, ref: Path, rel: float = 1e-5) -> None:
    a, b = _records(ref), _records(got)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "lm_loss", "balance_loss", "grad_norm", "val_loss", "max_logit"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-9), (key, x["step"])
        for key in [k for k in x if k.startswith(("moe/load_imbalance/", "qk_clip/heads_clipped", "attn/max_logit/"))]:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-9), (key, x["step"])
    assert any(r.get("qk_clip/heads_clipped", 0) > 0 for r in a)  # QK-Clip really ran
    _assert_same_weights(got / "checkpoints" / f"step-{STEPS}", ref / "checkpoints" / f"step-{STEPS}")


def _assert_same_weights(got: Path, ref: Path) -> None:
    """Every tensor of the final checkpoints (router correction biases included), read into one process.

    One exception, for AdamW's tensors: a coordinate whose gradients are at fp32 rounding noise (its second moment
    sqrt(v) below 1e-6, against ~5e-5 typical for the embedding) gets updates of noise / (noise + eps), so any
    change in summation order (a pipeline accumulates micro-batches in another order than one process) moves it
    by up to lr per step. Those coordinates, a handful out of 1.4M, are held to that bound instead."""
    want, have = load_checkpoint_model(ref).state_dict(), load_checkpoint_model(got).state_dict()
    assert set(have) == set(want)
    assert any("e_score_correction_bias" in k for k in want)
    _assert_close_but_adam_noise(have, want, ref)


def _assert_close_but_adam_noise(have: dict, want: dict, ref: Path) -> None:
    """`have` equals `want` (tensors by our or the released name) as `_assert_same_weights` says, the coordinates
    at AdamW's noise level taken from the optimizer state of the checkpoint `ref`."""
    noisy = 0
    for key, value in want.items():
        noise = _adam_noise_coordinates(ref, key.removeprefix("model."), value.shape)
        noisy += int(noise.sum())
        torch.testing.assert_close(have[key][~noise], value[~noise], rtol=1e-4, atol=1e-6, msg=key)
        assert bool(((have[key] - value)[noise].abs() <= 3e-3 * STEPS).all()), key  # lr <= 3e-3 per step
    assert noisy <= 1e-3 * sum(v.numel() for v in want.values()), noisy


def _adam_noise_coordinates(ckpt: Path, key: str, shape: torch.Size) -> torch.Tensor:
    """Mask of the coordinates of AdamW-stepped `key` whose second moment is non-zero but at the rounding-noise
    level (all False for a Muon tensor, which has no second moment)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    name = f"optim.state.{key}.exp_avg_sq"
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if name not in meta or tuple(meta[name].size) != tuple(shape):  # (an expert's export slice: Muon anyway)
        return torch.zeros(shape, dtype=torch.bool)
    state = {name: torch.empty(shape)}
    dcp.load(state, checkpoint_id=str(ckpt))
    v = state[name]
    return (v > 0) & (v.sqrt() < 1e-6)  # (v == 0: never a gradient, e.g. an unseen token's row; exact in both)


@pytest.mark.slow
def test_pp2_1f1b_matches_one_process_and_its_checkpoints_move_between_pp_degrees(reference: Path,
                                                                                   tmp_path: Path) -> None:
    pp2 = _run_world(tmp_path, "pp2", 2, "parallel.pp=2")
    _assert_same_run(pp2, reference)

    # pp2 -> pp1: one process resumes the pipeline's step-5 checkpoint and finishes like the reference
    for name, src, world, extra in (("to-pp1", pp2, 1, ()), ("to-pp2", reference, 2, ("parallel.pp=2",))):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / "step-5", run / "checkpoints" / "step-5")
        if world == 1:
            trainer = Trainer(_cfg(run))
            trainer.run()
            trainer.close()
        else:
            run = _run_world(tmp_path, name + "-run", 2, *extra, f"checkpoint.resume={run / 'checkpoints' / 'step-5'}")
        resumed = [r for r in _records(run) if r["step"] > 5]
        ref = [r for r in _records(reference) if r["step"] > 5]
        assert [r.get("loss") for r in resumed] == pytest.approx([r.get("loss") for r in ref], rel=1e-5)
        _assert_same_weights(run / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")

    # the HF export of a pipeline's checkpoint equals the single process's
    export_checkpoint(pp2 / "checkpoints" / f"step-{STEPS}", tmp_path / "hf-pp2", dtype=torch.float32)
    export_checkpoint(reference / "checkpoints" / f"step-{STEPS}", tmp_path / "hf-ref", dtype=torch.float32)
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(tmp_path / "hf-ref"), tensors(tmp_path / "hf-pp2")
    assert set(a) == set(b)
    _assert_close_but_adam_noise(b, a, reference / "checkpoints" / f"step-{STEPS}")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "world", "overrides"), [
    ("interleaved", 2, ("parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2")),
    ("zbv", 2, ("parallel.pp=2", "parallel.pp_schedule=zbv")),
    ("pp2-ep2", 4, ("parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=interleaved_1f1b")),
])
def test_pipeline_schedules_match_one_process(name: str, world: int, overrides: tuple[str, ...], reference: Path,
                                              tmp_path: Path) -> None:
    _assert_same_run(_run_world(tmp_path, name, world, *overrides), reference)
