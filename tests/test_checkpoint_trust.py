"""Checkpoints a user can trust: a resume obeys its config, loading never runs code from a file, the right
checkpoints are kept, a corrupt one is detected (and skipped by auto-resume), a full disk loses nothing.

Real runs of the tiny preset (shrunk), real files, real DCP."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from models.config import ConfigError
from train.checkpoint import list_checkpoints
from train.config import load_config
from train.safe_load import CheckpointError, CorruptCheckpoint, UntrustedCheckpoint, read_dcp_metadata
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus-cache"))


def config(out_dir: Path, cache_dir: str, **extra: object):
    base = {"train.out_dir": str(out_dir), "data.cache_dir": cache_dir, "data.seq_len": 32,
            "train.global_batch_size": 4, "train.micro_batch_size": 4, "train.eval_interval": 0,
            "logging.progress": False, "optim.warmup_steps": 1, "train.steps": 4, "checkpoint.interval": 2,
            "train.threads": 1}
    base.update(extra)
    return load_config(TINY, [f"{k}={v}" for k, v in base.items()])


def run(out_dir: Path, cache_dir: str, **extra: object) -> dict:
    return Trainer(config(out_dir, cache_dir, **extra)).run()


def records(out_dir: Path) -> dict[int, dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """4 steps, checkpoints at 2 and 4 (kept read-only by the tests: they copy it)."""
    out = tmp_path_factory.mktemp("finished")
    run(out, cache_dir)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- a resume obeys the config --------------------------------------------------------------------
def test_resume_takes_every_hyperparameter_from_the_config(finished_run: Path, cache_dir: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Resumed from step 2 with the LR halved (and other hyperparameters changed), steps 3 and 4 run at exactly
    half the original run's LRs; the param groups hold the new values; one line per changed key is printed."""
    ckpt = finished_run / "checkpoints" / "step-2"
    capsys.readouterr()
    trainer = Trainer(config(tmp_path, cache_dir, **{"checkpoint.resume": ckpt, "optim.lr": 1.5e-3,
                                                    "optim.weight_decay": 0.05, "optim.momentum": 0.9,
                                                    "optim.betas": "[0.8,0.9]"}))
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups if g["weight_decay"]} == {0.05}
    assert {g["momentum"] for g in groups if g["use_muon"]} == {0.9}
    assert {tuple(g["betas"]) for g in groups if not g["use_muon"]} == {(0.8, 0.9)}
    trainer.run()
    before, after = records(finished_run), records(tmp_path)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step]["lr"] == before[step]["lr"] / 2, step
    out = capsys.readouterr().out
    assert "resume: optim.lr 0.003 -> 0.0015" in out
    assert "resume: optim.weight_decay 0.1 -> 0.05" in out
    assert "resume: optim.betas [0.9, 0.95] -> [0.8, 0.9]" in out


@pytest.mark.parametrize("override,key", [
    ({"model.hidden_size": 64}, "model.hidden_size"),
    ({"model.vocab_size": 384}, "model.vocab_size"),
    ({"optim.name": "adamw"}, "optim.name"),
])
def test_resume_refuses_what_cannot_continue(finished_run: Path, cache_dir: str, tmp_path: Path,
                                             override: dict, key: str) -> None:
    ckpt = finished_run / "checkpoints" / "step-2"
    with pytest.raises(ConfigError, match=key):
        Trainer(config(tmp_path, cache_dir, **{"checkpoint.resume": ckpt, **override}))


def test_a_finished_run_is_not_silently_rerun(finished_run: Path, cache_dir: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """Rerunning the command of a finished run says so in one line and exits 2 (nothing is trained or written)."""
    from train.__main__ import main

    out = copy_run(finished_run, tmp_path / "run")
    before = (out / "metrics.jsonl").read_bytes()
    argv = ["--config", str(TINY), *[f"{k}={v}" for k, v in {
        "train.out_dir": out, "data.cache_dir": cache_dir, "data.seq_len": 32, "train.global_batch_size": 4,
        "train.micro_batch_size": 4, "train.eval_interval": 0, "logging.progress": False,
        "optim.warmup_steps": 1, "train.steps": 4, "checkpoint.interval": 2}.items()]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: train.steps: ") and "train.out_dir" in err, err
    assert "finished" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_bytes() == before


# --- loading never runs code ----------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


def refresh_checksums(ckpt: Path) -> None:
    """What an attacker who controls the directory would do: make the checksums match the planted file."""
    sums = json.loads((ckpt / "checksums-rank0.json").read_text())
    for name in sums:
        sums[name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "checksums-rank0.json").write_text(json.dumps(sums))


def test_a_planted_pickle_in_any_checkpoint_file_is_refused(finished_run: Path, cache_dir: str,
                                                            tmp_path: Path) -> None:
    names = sorted(p.name for p in (finished_run / "checkpoints" / "step-4").iterdir())
    assert {".metadata", "__0_0.distcp", "train_state-rank0.json", "config.yaml", "checksums-rank0.json",
            "COMPLETE"} <= set(names)
    marker = tmp_path / "pwned"
    for name in names:
        run_dir = copy_run(finished_run, tmp_path / f"run-{name}")
        ckpt = run_dir / "checkpoints" / "step-4"
        plant(ckpt / name, marker)
        if name != "checksums-rank0.json":
            refresh_checksums(ckpt)
        with pytest.raises((CheckpointError, ConfigError)) as e:
            Trainer(config(tmp_path / f"new-{name}", cache_dir, **{"checkpoint.resume": ckpt,
                                                                  "train.steps": 6}))
        assert str(ckpt / name) in str(e.value), (name, str(e.value))
        assert not marker.exists(), name


def test_the_metadata_unpickler_admits_only_dcp_metadata(tmp_path: Path) -> None:
    """Real DCP metadata of a fresh save loads; a pickle of anything else is refused, naming the file."""
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert "w" in read_dcp_metadata(tmp_path / "ok" / ".metadata").state_dict_metadata
    bad = tmp_path / "bad.metadata"
    bad.write_bytes(pickle.dumps({"x": __import__("collections").Counter("ab")}))
    with pytest.raises(UntrustedCheckpoint, match="bad.metadata.*collections.Counter"):
        read_dcp_metadata(bad)


def test_a_legacy_pickle_checkpoint_resumes_without_running_code(finished_run: Path, cache_dir: str,
                                                                  tmp_path: Path) -> None:
    """A checkpoint in the pre-JSON format (pickled train state with numpy RNG arrays, no checksums) resumes,
    read with `weights_only=True`; a pickle planted in its train state is refused by name and never runs."""
    run_dir = copy_run(finished_run, tmp_path / "legacy")
    ckpt = run_dir / "checkpoints" / "step-2"
    state = json.loads((ckpt / "train_state-rank0.json").read_text())
    state["rng"] = {"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
                    "torch": torch.get_rng_state()}
    torch.save(state, ckpt / "train_state-rank0.pt")
    for f in [*ckpt.glob("*.json")]:
        f.unlink()
    (ckpt / "COMPLETE").write_text("step 2\n")
    result = Trainer(config(tmp_path / "b", cache_dir, **{"checkpoint.resume": ckpt})).run()
    assert result["step"] == 4
    assert records(tmp_path / "b")[3]["loss"] == pytest.approx(records(finished_run)[3]["loss"], rel=1e-6)
    marker = tmp_path / "pwned"
    plant(ckpt / "train_state-rank0.pt", marker)
    with pytest.raises(UntrustedCheckpoint, match=str(ckpt / "train_state-rank0.pt")):
        Trainer(config(tmp_path / "c", cache_dir, **{"checkpoint.resume": ckpt}))
    assert not marker.exists()


# --- keep the right checkpoints -------------------------------------------------------------------
@pytest.mark.slow
def test_pruning_and_auto_resume_follow_save_order_after_a_rollback(finished_run: Path, cache_dir: str,
                                                                   tmp_path: Path) -> None:
    """A run at step 8 (saves 2, 4, 6, 8; keep 3) rolls back to step 4 and saves 5, 6: the new branch is kept
    and resumed, the abandoned run's step 8 is pruned first, and the resumed-from step 4 is never pruned."""
    out = tmp_path / "run"
    run(out, cache_dir, **{"train.steps": 8, "checkpoint.keep_last": 3})
    assert [s for s, _ in list_checkpoints(out)] == [4, 6, 8]
    rollback = out / "checkpoints" / "step-4"
    run(out, cache_dir, **{"train.steps": 7, "checkpoint.keep_last": 2, "checkpoint.interval": 1,
                           "checkpoint.resume": rollback})
    # saves in order: 5, 6, 7 (the re-saved 6 replaces the old one); keep 2 newest + the protected step 4
    assert [s for s, _ in list_checkpoints(out)] == [4, 6, 7]
    assert (rollback / "COMPLETE").exists()
    result = Trainer(config(out, cache_dir, **{"train.steps": 9, "checkpoint.interval": 0})).run()
    assert records(out)[8]["step"] == 8 and result["step"] == 9
    assert list_checkpoints(out)[-1][0] == 9


def test_a_flipped_byte_is_named_and_auto_resume_falls_back(finished_run: Path, cache_dir: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    data = out / "checkpoints" / "step-4" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=str(data)):
        Trainer(config(tmp_path / "x", cache_dir, **{"checkpoint.resume": data.parent, "train.steps": 6}))
    capsys.readouterr()
    trainer = Trainer(config(out, cache_dir, **{"train.steps": 5}))
    assert trainer.step == 2
    trainer.run()
    log = capsys.readouterr().out
    assert f"checkpoint {data.parent} is corrupt" in log and str(data) in log and "falling back" in log


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(cache_dir: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The second save hits ENOSPC half-way through DCP's data file: one error naming the step, the path and the
    last good checkpoint; no temporary directory is left; the good checkpoint still resumes."""
    real_create_stream = FileSystem.create_stream
    saves = {"n": 0}

    class FullDisk:
        def __init__(self, cm) -> None:  # holds the real context manager: its finalizer would close the file
            self.cm, self.stream, self.written = cm, cm.__enter__(), 0

        def write(self, b) -> int:
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(b)

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.cm.__exit__(*exc)

    def create_stream(self, path, mode):
        cm = real_create_stream(self, path, mode)
        if mode == "wb" and str(path).endswith(".distcp"):
            saves["n"] += 1
            if saves["n"] == 2:
                return FullDisk(cm)
        return cm

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        run(out, cache_dir)
    msg = str(e.value)
    assert msg == (f"no space left on device while saving step 4 to {out / 'checkpoints'}; the last good "
                   f"checkpoint is step 2 ({out / 'checkpoints' / 'step-2'})"), msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.undo()
    trainer = Trainer(config(out, cache_dir))
    assert trainer.step == 2
    trainer.run()
    assert sorted(records(out)) == [1, 2, 3, 4]


def test_a_planted_pickle_in_any_dataset_or_hf_export_file_is_refused(tmp_path: Path) -> None:
    """Datasets (data.prepare, with a BPE tokenizer.json) and Hugging Face exports hold JSON, raw tokens and
    safetensors only: a pickle planted in any of their files is refused naming that file, and never runs."""
    import sysconfig

    from data.loader import build_loaders
    from data.prepare import prepare
    from data.tokenizer import train_bpe
    from models import Transformer
    from models.hf import export_hf, import_hf

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in (stdlib / "json").glob("*.py")) + [str(stdlib / "textwrap.py")]
    train_bpe(files, 280, str(tmp_path / "bpe.json"), show_progress=False)
    dataset = tmp_path / "ds"
    prepare(dataset, inputs=files, tokenizer=str(tmp_path / "bpe.json"), val_fraction=0.3, workers=0,
            progress=False)
    cfg = config(tmp_path / "unused", str(tmp_path)).model.replace(num_hidden_layers=2, vocab_size=320)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    export = tmp_path / "hf"
    export_hf(model, export, max_shard_bytes=1 << 20)  # several shards and an index

    def load_dataset(root: Path) -> None:
        """What reads a dataset: the loader, and a rerun of prepare (it resumes from prepare.json)."""
        loader, _, _ = build_loaders({"source": str(root), "prefetch": 0}, 32, 4, seed=0, vocab_size=320)
        next(loader)
        loader.close()
        prepare(root, inputs=files, tokenizer=str(tmp_path / "bpe.json"), val_fraction=0.3, workers=0,
                progress=False)

    marker = tmp_path / "pwned"
    cases = [(dataset, load_dataset), (export, import_hf)]
    for root, load in cases:
        load(root)  # the untouched copy loads
        planted = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")
        assert len(planted) >= 4, planted
        for rel in planted:
            copy = tmp_path / "copies" / f"{root.name}-{str(rel).replace('/', '_')}"
            shutil.copytree(root, copy)
            plant(copy / rel, marker)
            with pytest.raises(Exception) as e:  # noqa: B017 - each loader has its own error type; the text matters
                load(copy)
            assert str(copy / rel) in str(e.value), (rel, repr(e.value))
            assert not marker.exists(), rel
