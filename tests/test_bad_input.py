"""Every bad input gives one line, `error: <key>: <what is wrong and what is allowed>`, and exit code 2,
through every entry point (`python -m train`, `--print-config`, `python -m launch` with and without
`--slurm`), before anything is started or written. Also: bad token ids in the data are named by file and
offset, and output folders get the permissions of a plain mkdir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import launch.__main__ as launch_cli
import train.__main__ as train_cli
from data.loader import build_loaders
from data.shards import DataError, TokenIdError, write_shard
from data.tokenizer import ByteTokenizer
from parallel.dims import ParallelDims
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Keeps a run that is (wrongly) accepted short: two steps, no warmup, no evaluation, no final save.
SHORT = ["train.steps=2", "optim.warmup_steps=0", "train.eval_interval=0", "checkpoint.save_final=false",
         "logging.progress=false"]

# (override, the start of the error line after "error: "). Later overrides win over SHORT's.
BAD_CONFIGS = [
    ("train.log_interval=0", "train.log_interval: "),
    ("train.log_interval=-1", "train.log_interval: "),
    ("train.eval_interval=-5", "train.eval_interval: "),
    ("train.eval_batches=0", "train.eval_batches: "),
    ("checkpoint.interval=-1", "checkpoint.interval: "),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: "),
    ("logging.expert_load_interval=-1", "logging.expert_load_interval: "),
    ("logging.spike.window=1", "logging.spike.window: "),
    ("train.compile=maybe", "train.compile"),
    ("train.steps=0", "train.steps: "),
    ("train.steps=abc", "train.steps: "),
    ("train.threads=0", "train.threads: "),
    ("train.micro_batch_size=5", "train.micro_batch_size: "),
    ("train.dtype=fp16", "train.dtype: "),
    ("optim.name=sgd", "optim.name: "),
    ("optim.schedule=cosinus", "optim.schedule: "),
    ("optim.decay_shape=exp", "optim.decay_shape: "),
    ("optim.ns_dtype=int8", "optim.ns_dtype: "),
    ("optim.betas=[0.9,1.5]", "optim.betas: "),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: "),
    ("optim.lr=-1", "optim.lr: "),
    ("optim.lr=nan", "optim.lr: "),
    ("optim.weight_decay=-0.1", "optim.weight_decay: "),
    ("optim.momentum=1.0", "optim.momentum: "),
    ("optim.qk_clip_tau=0", "optim.qk_clip_tau: "),
    ("optim.warmup_steps=50", "optim.warmup_steps: "),
    ("data.seq_len=0", "data.seq_len: "),
    ("data.seq_len=4096", "data.seq_len: "),
    ("parallel.ep=0", "parallel.ep: "),
    ("parallel.activation_checkpointing=some", "parallel.activation_checkpointing: "),
    ("logging.wandb.mode=cloud", "logging.wandb.mode: "),
    ("model.hidden_size=0", "model.hidden_size: "),
    ("model.num_experts_per_tok=9", "model.num_experts_per_tok: "),
    ("model.n_group=3", "model.n_group: "),
    ("model.eos_token_id=320", "model.eos_token_id: "),
    ("train=5", "train: "),
    ("train.steps=${nope}", "train.steps: Interpolation key 'nope' not found"),
]


def _one_error_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = train_cli.main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _launch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = launch_cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("override", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_every_entry_point_refuses_a_bad_config_in_one_line(
        override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = ["--config", TINY, f"train.out_dir={run}", *SHORT, override]
    _one_error_line(*_train(capsys, *common)[::2], expected)
    _one_error_line(*_train(capsys, "--print-config", *common)[::2], expected)
    _one_error_line(*_launch(capsys, "--gpus-per-node", "2", "--dry-run", *common)[::2], expected)
    _one_error_line(*_launch(capsys, "--slurm", "--gpus-per-node", "2", "--dry-run", *common)[::2], expected)
    assert not run.exists()  # nothing was started or written


@pytest.mark.parametrize(("world", "override", "expected"), [
    (3, "train.micro_batch_size=8", "train.global_batch_size: 16 does not split into 3 data-parallel rank(s)"),
    (2, "parallel.ep=4", "parallel.ep: 4 must divide the data-parallel size 2"),
    (4, "model.n_routed_experts=6", "parallel.ep: model.n_routed_experts=6 is not divisible by parallel.ep=4"),
    (2, "parallel.dp_shard=1", "parallel.dp_shard: 1 must equal world / parallel.pp = 2"),
    (3, "parallel.pp=2", "parallel.pp: 2 pipeline stages do not divide the world of 3 ranks"),
    (8, "parallel.pp=8", "parallel.pp: 8 x 1 virtual stages need at least 8 layers, model.num_hidden_layers is 4"),
    (4, "parallel.pp=2 train.micro_batch_size=2 train.pp_microbatches=3",
     "train.pp_microbatches: 3 does not divide the step's 4 micro-batches"),
])
def test_layout_errors_for_the_world_size(world: int, override: str, expected: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks that need the number of ranks: by the launcher before anything starts, and by each rank
    (WORLD_SIZE from torchrun) before the trainer is built."""
    common = ["--config", TINY, f"train.out_dir={tmp_path / 'run'}", *SHORT, *override.split()]
    ep = ["parallel.ep=4"] if "n_routed" in override else []
    _one_error_line(*_launch(capsys, "--gpus-per-node", str(world), "--dry-run", *common, *ep)[::2], expected)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    _one_error_line(*_train(capsys, *common, *ep)[::2], expected)
    assert not (tmp_path / "run").exists()


def test_one_process_ignores_the_parallel_layout_with_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/configuration.md: one process ignores dp_shard and ep, saying so once."""

    class P:
        dp_shard, ep = -1, 2

    assert ParallelDims.from_config(P, world=1, n_routed_experts=8) == ParallelDims(1, 1, 1)
    P.ep = 3  # would not divide the 8 experts on several ranks; one process holds them all
    assert ParallelDims.from_config(P, world=1, n_routed_experts=8) == ParallelDims(1, 1, 1)

    built = []

    class FakeTrainer:  # what the CLI does around the trainer, without training
        rank = 0

        def __init__(self, cfg: object) -> None:
            built.append(cfg)

        def run(self) -> dict:
            return {}

        def close(self) -> None:
            pass

    monkeypatch.setattr("train.trainer.Trainer", FakeTrainer)
    code, _, err = _train(capsys, "--config", TINY, f"train.out_dir={tmp_path / 'run'}", "parallel.ep=2")
    assert code == 0 and len(built) == 1
    assert err.strip().splitlines() == [
        "note: parallel.ep=2 ignored: this is one process, which holds every layer, every expert and the whole batch "
        "(start several with `python -m launch --gpus-per-node N`)"]


@pytest.mark.slow
def test_real_command_lines_print_one_error_line(tmp_path: Path) -> None:
    """The shell commands themselves (not only main()): exit code 2 and one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = {  # both at once: each spends its time importing torch
        "error: train.log_interval: must be >= 1, got 0": ["-m", "train", "--config", TINY, "train.log_interval=0"],
        "error: train.global_batch_size: 16 does not split into 16 data-parallel rank(s)": [
            "-m", "launch", "--config", TINY, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
            f"train.out_dir={tmp_path / 'run'}"],
    }
    procs = {expected: subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for expected, argv in commands.items()}
    for expected, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out == "", err
        assert len(err.splitlines()) == 1 and err.startswith(expected), err


# ---------------------------------------------------------------- data


@pytest.fixture
def dataset_with_bad_id(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    """A prepared-style dataset (train/ and val/ shards, byte tokenizer) whose second train shard has token
    id 1000 (the manifest's dtype holds it; no writer would put it there) at token offset 777: a flipped
    byte. Yields (dataset dir, the bad tokens.bin, offset)."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for k in range(n):
            docs = [rng.integers(0, 256, size=200) for _ in range(10)]
            write_shard(tmp_path / "data" / split / f"{k:05d}", docs, tok.fingerprint, tok.vocab_size, tok.eos_id)
    bad = tmp_path / "data" / "train" / "00001" / "tokens.bin"
    tokens = np.fromfile(bad, dtype="<u2")
    tokens[777] = 1000
    tokens.tofile(bad)  # same size, and shards are not hashed on open: only --verify would notice
    yield tmp_path / "data", bad, 777


def test_a_token_id_past_the_vocabulary_names_file_offset_id_and_vocab(
        dataset_with_bad_id: tuple[Path, Path, int]) -> None:
    root, bad, offset = dataset_with_bad_id
    loader, val, _ = build_loaders({"source": str(root), "prefetch": 0}, 32, 4, seed=0, vocab_size=320)
    with pytest.raises(TokenIdError) as err:
        for _ in range(200):  # more than an epoch of this small train split
            next(loader)
    e = err.value
    assert (e.path, e.offset, e.token_id, e.vocab_size) == (str(bad), offset, 1000, 320)
    assert str(e).startswith(f"{bad}: token id 1000 at token offset {offset} is outside the vocabulary: "
                             "model.vocab_size=320")
    # the validation split is checked too, and without a vocab_size nothing is checked (ids < 320 pass)
    val.samples(0, len(val))
    loader, _, _ = build_loaders({"source": str(root), "prefetch": 0}, 32, 4, seed=0)
    for _ in range(200):
        next(loader)


def test_data_errors_name_the_key(tmp_path: Path, dataset_with_bad_id: tuple[Path, Path, int]) -> None:
    root, _, _ = dataset_with_bad_id
    with pytest.raises(DataError, match=r"^model.vocab_size: 200 is smaller than the data's tokenizer, which has "
                                        r"259 ids; raise it to at least 259$"):
        build_loaders({"source": str(root)}, 32, 4, seed=0, vocab_size=200)
    with pytest.raises(DataError, match=r"^data.source: '/no/such/dir' is neither 'builtin' nor an existing"):
        build_loaders({"source": "/no/such/dir"}, 32, 4, seed=0)
    with pytest.raises(DataError, match=r"^data.sources\[1\].path: '/no/such/dir'"):
        build_loaders({"sources": [{"path": str(root)}, {"path": "/no/such/dir"}]}, 32, 4, seed=0)


def test_bad_data_through_the_cli_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    dataset_with_bad_id: tuple[Path, Path, int]) -> None:
    root, bad, offset = dataset_with_bad_id
    common = ["--config", TINY, f"train.out_dir={tmp_path / 'run'}", *SHORT, f"data.source={root}",
              "data.seq_len=32", "train.global_batch_size=64", "train.micro_batch_size=64", "train.steps=5"]
    code, _, err = _train(capsys, *common, "data.source=/no/such/dir")
    _one_error_line(code, err, "data.source: '/no/such/dir' is neither 'builtin' nor an existing directory")
    code, _, err = _train(capsys, *common, "model.vocab_size=200")
    _one_error_line(code, err, "model.vocab_size: 200 is smaller than the data's tokenizer")
    # the train split holds ~126 windows of 33 tokens: 5 batches of 64 read them all (wrapping)
    code, _, err = _train(capsys, *common)
    _one_error_line(code, err, f"{bad}: token id 1000 at token offset {offset} is outside the vocabulary: "
                               "model.vocab_size=320")


# ---------------------------------------------------------------- folder permissions


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_output_folders_get_mkdir_permissions(tmp_path: Path, umask_022: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards, the built-in corpus and HF exports are renamed into place from temp folders: those must be
    made like any folder (0o777 minus the umask), not with mkdtemp's owner-only 0o700."""
    from data import builtin
    from models import ModelConfig, Transformer
    from models.hf import export_hf

    write_shard(tmp_path / "shard", [[1, 2, 3]], "fp", 259, 256)
    assert _mode(tmp_path / "shard") == 0o755

    src = tmp_path / "stdlib"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / f"{name}.py").write_text(f"{name} = 1\n")
    few_files = builtin.stdlib_files(src)
    monkeypatch.setattr(builtin, "stdlib_files", lambda: few_files)
    train, val = builtin.builtin_corpus(tmp_path / "cache", progress=False)
    assert {_mode(Path(train).parent), _mode(Path(train)), _mode(Path(val))} == {0o755}

    model = Transformer(ModelConfig(**TINY_MODEL))
    out = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert _mode(out) == 0o755

    os.umask(0o027)  # the umask is honoured, not a fixed mode
    write_shard(tmp_path / "shard2", [[1, 2, 3]], "fp", 259, 256)
    assert _mode(tmp_path / "shard2") == 0o750
    assert not list(tmp_path.rglob(".*tmp-*"))  # no temp folder left behind
