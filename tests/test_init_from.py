"""`model.init_from`: a new run starts from a released-layout checkpoint (continued pretraining).

A trained `tiny` is exported (bf16, as users export), then new runs start from it on 1 rank and on 2 ranks
(experts sharded over ep, FSDP2 over dp; and a 2-stage pipeline): the first step's loss equals the loss of
the exported model, loaded with `import_hf` (an independent path: whole tensors, one process), on that batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.hf import HFCheckpointError, import_hf, load_hf_weights
from models.transformer import Transformer
from tests.dist_harness import run_ranks
from tools.export import export_checkpoint
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = {"data.seq_len": 64, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_interval": 0,
        "logging.progress": "false", "optim.warmup_steps": 1}


def overrides(**kv: object) -> list[str]:
    return [f"{k}={v}" for k, v in {**FAST, **kv}.items()]


def first_loss(out_dir: Path) -> float:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["lm_loss"] for r in records if r.get("step") == 1 and "lm_loss" in r)  # without the balance loss


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """(export dir, corpus cache, the exported model's loss on the first batch of a new run)."""
    tmp = tmp_path_factory.mktemp("init-from")
    cache = str(tmp / "cache")
    trainer = Trainer(load_config(TINY, overrides(**{"train.out_dir": tmp / "run", "data.cache_dir": cache,
                                                     "train.steps": 3})))
    trainer.run()
    export_checkpoint(tmp / "run", tmp / "hf")  # bf16, the default
    inputs, targets = trainer.train_loader.batch_at(0)  # one process: the whole global batch of step 1
    model = import_hf(tmp / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten()).item()
    return tmp / "hf", cache, loss


def test_one_rank_starts_from_the_export(exported, tmp_path) -> None:
    hf, cache, expected = exported
    out = tmp_path / "new"
    cfg = load_config(TINY, overrides(**{"train.out_dir": out, "data.cache_dir": cache, "train.steps": 1,
                                         "model.init_from": hf}))
    trainer = Trainer(cfg)
    assert any("init_from" in note for note in trainer._notes)
    trainer.run()
    assert first_loss(out) == pytest.approx(expected, rel=1e-5)
    # A random init of the same config is far from it: the check above sees the loaded weights.
    assert abs(expected - 5.8) > 1.0


def _two_rank_worker(rank: int, world: int, hf: str, cache: str, out: str) -> None:
    for name, extra in (("ep2", {"parallel.ep": 2}), ("pp2", {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"})):
        cfg = load_config(TINY, overrides(**{"train.out_dir": Path(out) / name, "data.cache_dir": cache,
                                             "train.steps": 1, "model.init_from": hf,
                                             "checkpoint.save_final": "false", **extra}))
        Trainer(cfg).run()


@pytest.mark.slow
def test_two_ranks_start_from_the_export(exported, tmp_path) -> None:
    hf, cache, expected = exported
    run_ranks(_two_rank_worker, 2, str(hf), cache, str(tmp_path))
    for name in ("ep2", "pp2"):  # the global batch of step 1 is the same at any world size
        assert first_loss(tmp_path / name) == pytest.approx(expected, rel=1e-5), name


def test_a_mismatched_config_or_missing_dir_is_refused(exported, tmp_path) -> None:
    hf, cache, _ = exported
    cfg = load_config(TINY, overrides(**{"train.out_dir": tmp_path / "a", "data.cache_dir": cache,
                                         "model.init_from": hf, "model.moe_intermediate_size": 64}))
    with pytest.raises(HFCheckpointError, match="model.moe_intermediate_size is 64 here, 96 in the checkpoint"):
        Trainer(cfg)
    cfg = load_config(TINY, overrides(**{"train.out_dir": tmp_path / "b", "data.cache_dir": cache,
                                         "model.init_from": tmp_path / "nowhere"}))
    with pytest.raises(Exception, match="model.init_from: .*nowhere is not a checkpoint"):
        Trainer(cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything


def test_a_pruned_model_loads_only_its_layers(exported) -> None:
    """A pipeline rank's model (layers dropped, names kept) takes exactly its layers' tensors from the file."""
    hf, _, _ = exported
    whole = import_hf(hf, dtype=torch.float32)
    with torch.device("meta"):
        pruned = Transformer(whole.cfg)
    del pruned.layers["0"], pruned.layers["3"]  # a middle pipeline stage's layers, names unchanged
    pruned.to_empty(device="cpu")
    pruned.init_weights()
    load_hf_weights(pruned, hf)
    reference = whole.state_dict()
    for name, t in pruned.state_dict().items():
        assert torch.equal(t, reference[name]), name
