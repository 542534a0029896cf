"""`python -m tools.export CHECKPOINT_DIR OUT_DIR`: real training checkpoints (one process, and 4 gloo ranks with
experts sharded) exported to the released layout, checked with `transformers` and against DCP's own
full-tensor conversion; plus the refusals (incomplete checkpoints, bad paths, config/weights mismatch)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from data.tokenizer import ByteTokenizer, train_bpe
from models import ModelConfig, Transformer
from models.hf import import_hf, read_hf_tensors
from tools.export import main, resolve_checkpoint
from train.config import load_config
from train.trainer import Trainer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LOGIT_TOL = 1e-4
# the tiny preset shrunk so a step takes tens of milliseconds (as tests/test_train.py does)
FAST = {"data.seq_len": 64, "train.global_batch_size": 8, "train.eval_interval": 0, "logging.progress": False}


def overrides(**kv: object) -> list[str]:
    return [f"{k}={v}" for k, v in {**FAST, **kv}.items()]


def export_cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tools.export", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def load_hf(path: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@torch.no_grad()
def logits_diff(ours: Transformer, hf_dir: Path, vocab: int, seq: int = 48) -> float:
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    ours.eval()
    a = ours(ids).logits
    b = load_hf(hf_dir)(ids).logits
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def full_model_tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors, full size, by DCP's own converter (independent of tools.export)."""
    dcp_to_torch_save(str(ckpt), str(tmp / "full.pt"))
    return torch.load(tmp / "full.pt", weights_only=False)["model"]


def exported_tensors(out: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    return import_hf(out).state_dict()  # the stored dtypes (fp32 exports here)


# --- fixtures: real training runs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> tuple[Path, Trainer]:
    """3 steps in this process, checkpoints at steps 2 and 3; the trainer (model at step 3) is kept."""
    out = tmp_path_factory.mktemp("single")
    cfg = load_config(TINY, overrides(**{"train.out_dir": out, "data.cache_dir": cache_dir, "train.steps": 3,
                                         "train.micro_batch_size": 4, "optim.warmup_steps": 2,
                                         "checkpoint.interval": 2}))
    trainer = Trainer(cfg)
    trainer.run()
    return out, trainer


# --- exports checked with transformers ------------------------------------------------------------
@pytest.mark.slow
def test_cli_exports_newest_checkpoint_of_a_run_with_the_trainers_logits(single_run, tmp_path) -> None:
    run_dir, trainer = single_run
    out = tmp_path / "hf"
    done = export_cli(run_dir, out, "--dtype", "fp32")  # a run dir: the newest complete checkpoint, step 3
    assert done.returncode == 0, done.stderr
    assert "step 3" in done.stdout and "fp32" in done.stdout and f"{trainer.model.num_params():,}" in done.stdout
    assert "model.safetensors.index.json" in done.stdout and "config.json" in done.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"

    diff = logits_diff(trainer.model, out, trainer.cfg.model.vocab_size)
    assert diff < LOGIT_TOL, diff
    # bit-exact against DCP's own conversion, the moved router correction bias included
    ckpt = run_dir / "checkpoints" / "step-3"
    full, got = full_model_tensors(ckpt, tmp_path), exported_tensors(out, ckpt)
    assert full.keys() == got.keys()
    assert all(torch.equal(full[k], got[k]) for k in full)
    assert full["layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0  # it moved: a real check


def test_default_dtype_is_bf16_and_step_selects_a_checkpoint(single_run, tmp_path, capsys) -> None:
    run_dir, _ = single_run
    out = tmp_path / "hf"
    assert main([str(run_dir / "checkpoints"), str(out), "--step", "2"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ckpt = run_dir / "checkpoints" / "step-2"
    full = full_model_tensors(ckpt, tmp_path)
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as f:
        names = list(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        embed = f.get_tensor("model.embed_tokens.weight")
        assert {f.get_tensor(n).dtype for n in names if not n.endswith("e_score_correction_bias")} == {
            torch.bfloat16}
    assert bias.dtype == torch.float32 and torch.equal(bias, full["layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(embed, full["embed_tokens.weight"].to(torch.bfloat16))
    # exporting again over an earlier export replaces it
    assert main([str(ckpt), str(out), "--dtype", "fp32"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}


def test_export_has_the_runs_tokenizer_and_generates(single_run, tmp_path, capsys) -> None:
    run_dir, trainer = single_run
    assert trainer.cfg.model.bos_token_id is None and trainer.cfg.model.eos_token_id is None  # tiny leaves them null
    out = tmp_path / "hf"
    assert main([str(run_dir / "checkpoints" / "step-3"), str(out), "--dtype", "fp32"]) == 0
    assert "tokenizer: ByteTokenizer" in capsys.readouterr().out  # the built-in corpus's tokenizer
    assert TOKENIZER_FILES <= {p.name for p in out.iterdir()}
    byte = ByteTokenizer()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (byte.bos_id, byte.eos_id)

    tok = AutoTokenizer.from_pretrained(out)
    prompt = "def naïve(x):  # 東京 🙂 Ωμέγα\n    return"
    assert tok(prompt)["input_ids"] == byte.encode(prompt)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    batch = tok(prompt, return_tensors="pt")
    generated = load_hf(out).generate(**batch, max_new_tokens=5, do_sample=False)[0]
    n = batch["input_ids"].shape[1]
    assert n < generated.shape[0] <= n + 5 and torch.equal(generated[:n], batch["input_ids"][0])
    assert tok.decode(generated, skip_special_tokens=True).startswith(prompt)
    # greedy: the first new token is Chogori's own model's argmax
    with torch.no_grad():
        trainer.model.eval()
        assert generated[n].item() == trainer.model(batch["input_ids"]).logits[0, -1].argmax().item()


def rewrite_checkpoint_file(ckpt: Path, name: str, text: str) -> None:
    """Replace a checkpoint file *and* its checksum (a consistently saved checkpoint that says otherwise)."""
    (ckpt / name).write_text(text)
    sums = json.loads((ckpt / "checksums-rank0.json").read_text())
    sums[name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "checksums-rank0.json").write_text(json.dumps(sums))


def test_unknown_tokenizer_warns_and_tokenizer_option_names_one(single_run, tmp_path, capsys) -> None:
    ckpt = copy_checkpoint(single_run[0] / "checkpoints" / "step-3", tmp_path / "step-3")
    state = json.loads((ckpt / "train_state-rank0.json").read_text())
    rewrite_checkpoint_file(ckpt, "train_state-rank0.json", json.dumps({**state, "tokenizer": "0123456789abcdef"}))
    doc = yaml.safe_load((ckpt / "config.yaml").read_text())
    doc["data"]["source"] = str(tmp_path / "gone")  # the prepared data (and its tokenizer.json) is not here
    rewrite_checkpoint_file(ckpt, "config.yaml", yaml.safe_dump(doc))

    out = tmp_path / "hf"
    assert main([str(ckpt), str(out)]) == 0  # the model alone, with a one-line warning
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "0123456789abcdef" in err and "--tokenizer" in err
    assert not TOKENIZER_FILES & {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["bos_token_id"] is None

    # --tokenizer: an HF tokenizer file (not the recorded one: a warning says so) ...
    bpe = train_bpe([str(Path(json.__file__).parent / "decoder.py")], 300, tmp_path / "tok", show_progress=False)
    assert main([str(ckpt), str(out), "--tokenizer", str(bpe.path)]) == 0
    assert "is not the one the run trained with" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (bpe.bos_id, bpe.eos_id) == (1, 0)
    text = "naïve — 東京 🙂 x = {'a': [1, 2]}"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == bpe.encode(text)
    # ... or "byte"
    assert main([str(ckpt), str(out), "--tokenizer", "byte"]) == 0
    assert AutoTokenizer.from_pretrained(out).eos_token_id == ByteTokenizer().eos_id
    capsys.readouterr()

    # refused before anything is written: a missing file, a tokenizer larger than the model's vocabulary
    missing = tmp_path / "missing.json"
    assert main([str(ckpt), str(tmp_path / "x"), "--tokenizer", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    big = train_bpe([str(Path(json.__file__).parent / "decoder.py")], 400, tmp_path / "big", min_frequency=1,
                    show_progress=False)
    assert big.vocab_size > single_run[1].cfg.model.vocab_size
    assert main([str(ckpt), str(tmp_path / "x"), "--tokenizer", str(big.path)]) == 2
    assert "more than model.vocab_size=320" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_four_rank_expert_sharded_checkpoint_exports_exactly(four_rank_run, single_run, tmp_path, capsys,
                                                             monkeypatch) -> None:
    """The shared 4-rank run's step-4 checkpoint (tests/conftest.py: experts over ep=2, FSDP2 over 4 ranks)."""
    ckpt = four_rank_run.out / "checkpoints" / "step-4"
    assert len(list(ckpt.glob("train_state-rank*.json"))) == 4
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    experts = meta["model.layers.1.mlp.experts.gate_up_proj"]
    assert len(experts.chunks) > 1 and all(c.sizes[0] < experts.size[0] for c in experts.chunks)  # sharded

    read: list[str] = []  # what DCP reads: the model's tensors only, never the optimizer state
    real_read_data = FileSystemReader.read_data
    monkeypatch.setattr(FileSystemReader, "read_data", lambda self, plan, planner: (
        read.extend(item.storage_index.fqn for item in plan.items), real_read_data(self, plan, planner))[1])
    out = tmp_path / "hf"
    assert main([str(ckpt), str(out), "--dtype", "fp32"]) == 0
    assert "step 4" in capsys.readouterr().out
    assert read and all(k.startswith("model.") for k in read) and any(k.startswith("optim.") for k in meta)
    assert set(read) == {k for k in meta if k.startswith("model.")}
    full, got = full_model_tensors(ckpt, tmp_path), exported_tensors(out, ckpt)
    assert full.keys() == got.keys()
    assert all(torch.equal(full[k], got[k]) for k in full)

    # A single-process trainer resumed from the 4-rank checkpoint (no step runs) gives transformers' logits.
    cfg = load_config(TINY, overrides(**{"train.out_dir": tmp_path / "resumed",
                                         "data.cache_dir": four_rank_run.cache_dir, "train.steps": 5,
                                         "train.micro_batch_size": 4, "optim.warmup_steps": 1,
                                         "checkpoint.resume": ckpt}))
    resumed = Trainer(cfg)
    assert resumed.step == 4
    diff = logits_diff(resumed.model, out, cfg.model.vocab_size)
    assert diff < LOGIT_TOL, diff
    # and the 4-rank weights are not the single-process run's (the comparison has teeth)
    assert not torch.equal(got["layers.1.mlp.experts.gate_up_proj"],
                           single_run[1].model.layers["1"].mlp.experts.gate_up_proj.detach())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("lm_head_stored", [True, False], ids=["both-keys", "embedding-only"])
def test_tied_embeddings_one_or_two_keys(tmp_path, lm_head_stored) -> None:
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      first_k_dense_replace=0, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, n_group=1, topk_group=1,
                      max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=True)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)) * 0.1)
    sd = get_model_state_dict(model)  # what the trainer saves: both keys, one tensor
    assert {"embed_tokens.weight", "lm_head.weight"} <= sd.keys()
    if not lm_head_stored:
        sd.pop("lm_head.weight")
    ckpt = tmp_path / "run" / "checkpoints" / "step-7"
    dcp.save({"model": sd}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    (ckpt / "COMPLETE").write_text("step 7\n")

    out = tmp_path / "hf"
    assert main([str(tmp_path / "run"), str(out), "--dtype", "fp32"]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_hf_tensors(out)
    assert logits_diff(model, out, cfg.vocab_size, seq=16) < LOGIT_TOL


# --- refusals -------------------------------------------------------------------------------------
def copy_checkpoint(src: Path, dst: Path, complete: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if complete else shutil.ignore_patterns("COMPLETE"))
    return dst


def edit_config(ckpt: Path, doc: dict) -> None:
    """Rewrite config.yaml *and* its checksum: a config that does not match the weights, consistently saved."""
    (ckpt / "config.yaml").write_text(yaml.safe_dump(doc))
    sums = json.loads((ckpt / "checksums-rank0.json").read_text())
    sums["config.yaml"] = hashlib.sha256((ckpt / "config.yaml").read_bytes()).hexdigest()
    (ckpt / "checksums-rank0.json").write_text(json.dumps(sums))


def test_incomplete_checkpoints_are_refused_and_never_chosen(single_run, tmp_path, capsys) -> None:
    src = single_run[0] / "checkpoints"
    root = tmp_path / "run" / "checkpoints"
    copy_checkpoint(src / "step-2", root / "step-2")
    copy_checkpoint(src / "step-3", root / "step-5", complete=False)  # newer, but half written
    (root / ".tmp-step-6").mkdir()  # a save in progress

    assert resolve_checkpoint(tmp_path / "run") == root / "step-2"
    assert resolve_checkpoint(root) == root / "step-2"
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "step 2" in capsys.readouterr().out

    for argv in ([str(root / "step-5"), str(tmp_path / "x")],
                 [str(tmp_path / "run"), str(tmp_path / "x"), "--step", "5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "incomplete" in err and str(root / "step-5") in err and "COMPLETE" in err
    assert main([str(tmp_path / "run"), str(tmp_path / "x"), "--step", "4"]) == 2
    assert "no checkpoint step-4" in capsys.readouterr().err

    shutil.rmtree(root / "step-2")  # only the incomplete one left
    assert main([str(tmp_path / "run"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and str(root) in err
    assert not (tmp_path / "x").exists()


def test_bad_paths_exit_2_naming_the_path(single_run, tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-run"
    assert main([str(missing), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(tmp_path / "x")]) == 2
    assert str(empty) in capsys.readouterr().err
    # exporting into the run (export_hf replaces OUT_DIR wholesale) or over unrelated files is refused
    run_dir = single_run[0]
    assert main([str(run_dir), str(run_dir / "checkpoints")]) == 2
    assert "must not be the checkpoint" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main([str(run_dir), str(other)]) == 2
    assert "not an earlier export" in capsys.readouterr().err and (other / "notes.txt").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: bad --dtype
        main([str(run_dir), str(tmp_path / "x"), "--dtype", "fp8"])
    assert exc.value.code == 2


def test_config_not_matching_the_weights_lists_the_keys(single_run, tmp_path, capsys) -> None:
    ckpt = copy_checkpoint(single_run[0] / "checkpoints" / "step-3", tmp_path / "step-3")
    doc = yaml.safe_load((ckpt / "config.yaml").read_text())
    doc["model"]["num_hidden_layers"] = 5  # one layer more than the checkpoint holds
    edit_config(ckpt, doc)
    assert main([str(ckpt), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing from the checkpoint" in err and "layers.4.self_attn.o_proj.weight" in err
    doc["model"]["num_hidden_layers"] = 3  # one layer fewer
    edit_config(ckpt, doc)
    assert main([str(ckpt), str(tmp_path / "x")]) == 2
    assert "lacks" in (err := capsys.readouterr().err) and "layers.3.mlp.gate.weight" in err
    doc["model"]["num_hidden_layers"] = 4
    doc["model"]["moe_intermediate_size"] = 64  # same keys, other shapes
    edit_config(ckpt, doc)
    assert main([str(ckpt), str(tmp_path / "x")]) == 2
    assert "layers.1.mlp.experts.gate_up_proj (8, 2, 96, 128) vs (8, 2, 64, 128)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_damaged_checkpoint_is_a_one_line_error(single_run, tmp_path, capsys) -> None:
    """A truncated data file fails its checksum, naming the file; without checksums to compare against (a plain
    DCP checkpoint), DCP's failed read (a CheckpointException, a BaseException) is still one line, exit 2."""
    ckpt = copy_checkpoint(single_run[0] / "checkpoints" / "step-3", tmp_path / "step-3")
    (data,) = ckpt.glob("*.distcp")
    with open(data, "r+b") as f:
        f.truncate(1000)
    assert main([str(ckpt), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {data}: checksum mismatch (the file changed after it was saved)\n"
    for f in ckpt.glob("checksums-rank*.json"):
        f.unlink()
    (ckpt / "COMPLETE").write_text("step 3\n")
    assert main([str(ckpt), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}: truncated") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_a_streamed_runs_tokenizer_is_found(tmp_path) -> None:
    """A run that streamed its data (data.stream) tokenized with data.stream.tokenizer: the export finds it."""
    from tools.export import find_run_tokenizer

    bpe = train_bpe([str(Path(json.__file__).parent / "decoder.py")], 300, tmp_path / "tok", show_progress=False)
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(f"data:\n  source: builtin\n  stream:\n    path: somewhere\n"
                                      f"    tokenizer: {bpe.path}\n")
    (ckpt / "train_state-rank0.json").write_text(json.dumps({"tokenizer": bpe.fingerprint}))
    tok, why = find_run_tokenizer(ckpt)
    assert why == "" and tok is not None and tok.fingerprint == bpe.fingerprint
