"""Export a training checkpoint to the released DeepSeek-V3 / Kimi-K2 layout (`transformers`, vLLM, SGLang).

    python -m tools.export CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--step N] [--tokenizer PATH|byte]

CHECKPOINT_DIR is one checkpoint (`<run>/checkpoints/step-<N>`, written by train/checkpoint.py), a run
directory, or its `checkpoints/` directory; for the last two the newest *complete* checkpoint (the latest
save) is taken (or `--step N`). A checkpoint without its `COMPLETE` marker is refused: it may be half
written. The files are verified against their checksums and read the way the trainer reads them
(train/checkpoint.py): nothing in them is unpickled beyond DCP's own metadata classes.

The run's tokenizer goes next to the weights (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
as `transformers.AutoTokenizer` loads them; data/tokenizer.py `save_for_transformers`), with a
generation_config.json, and gives config.json the `bos_token_id` / `eos_token_id` the model config leaves
null. The tokenizer is the one whose fingerprint the checkpoint's train state records (else the first data
source's shards), found as the trainer finds it: the byte tokenizer, or the tokenizer.json of a prepared data
directory of the saved config. `--tokenizer` names it instead; if it cannot be found the export warns and
writes the model alone.

The checkpoint may come from any world size and any sharding (FSDP2 over data-parallel ranks, experts
sharded over expert-parallel ranks): torch.distributed.checkpoint (DCP) stores every tensor with its
global shape, so reading it into full, plain tensors in ONE process reshards it. No process group is
created (`dcp.load(..., no_dist=True)`), and only the model's tensors are read, never the optimizer state
(for Muon/AdamW that is one to two times the size of the model again).

Memory: this holds the whole model in CPU RAM, in the checkpoint's own dtype (float32 for training
checkpoints: 4 bytes per parameter, ~4 TB for a 1T-parameter model), plus one safetensors shard (5 GiB by
default) while it is written. A streaming conversion for such models would instead read the DCP metadata,
then for each output shard `dcp.load` only the tensors that shard needs (a partial state dict of plain
tensors, split the stacked experts into per-expert tensors, cast, `save_file`), keeping at most one output
shard plus one stacked expert tensor in memory; nothing here builds that yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data.dataset import open_source
from data.shards import DataError, ShardError, open_shard
from data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, save_for_transformers, tokenizer_from_fingerprint
from models.config import ConfigError, ModelConfig
from models.hf import export_hf
from models.init import canonical_name
from models.transformer import Transformer
from train.checkpoint import COMPLETE, complete_checkpoints, read_marker, verify_checkpoint
from train.safe_load import METADATA, CheckpointError, load_dcp_tensors, read_dcp_metadata

MODEL_PREFIX = "model."  # the DCP key prefix of the model's tensors ({"model": ..., "optim": ...})
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ExportError(Exception):
    """A problem with the inputs, reported to the user as one line."""


@dataclass
class ExportResult:
    checkpoint: Path
    step: int | None
    out_dir: Path
    num_params: int
    dtype: torch.dtype
    files: list[str]
    tokenizer: Tokenizer | None = None  # written next to the weights; None: not found, none written
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for the user


# --- finding the checkpoint -----------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    """A DCP checkpoint directory (it has DCP's `.metadata`), complete or not."""
    return path.is_dir() and (path / METADATA).exists()


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`step-<N>` directories under `root` (complete or not), oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_step(path: Path) -> int | None:
    """The training step of a checkpoint: from its `step-<N>` name, else from its COMPLETE marker."""
    m = _STEP_DIR.match(path.name)
    if m:
        return int(m.group(1))
    try:
        return read_marker(path)["step"]
    except CheckpointError:
        return None


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """The complete checkpoint directory that `path` (a checkpoint, a run dir or its `checkpoints/` dir) and
    `step` designate; ExportError naming the path if there is none or it is incomplete."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory (expected a checkpoint, a run directory or its checkpoints/)")
    if _is_checkpoint(path) or _STEP_DIR.match(path.name):
        if not (path / COMPLETE).exists():
            raise ExportError(f"{path}: incomplete checkpoint (no {COMPLETE} marker; it may be half written)")
        if not _is_checkpoint(path):
            raise ExportError(f"{path}: not a DCP checkpoint (no .metadata file)")
        if step is not None and checkpoint_step(path) not in (None, step):
            raise ExportError(f"{path} is the checkpoint of step {checkpoint_step(path)}, not --step {step}")
        return path

    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = _step_dirs(root)
    complete = [(s, p) for s, p in complete_checkpoints(root) if _is_checkpoint(p)]  # in save order
    if step is not None:
        chosen = [p for s, p in candidates if s == step]
        if not chosen:
            have = ", ".join(str(s) for s, _ in complete) or "none"
            raise ExportError(f"{root}: no checkpoint step-{step} (complete checkpoints: {have})")
        if not (chosen[0] / COMPLETE).exists():
            raise ExportError(f"{chosen[0]}: incomplete checkpoint (no {COMPLETE} marker; it may be half written)")
        return chosen[0]
    if not complete:
        what = f"{len(candidates)} incomplete step-* director{'y' if len(candidates) == 1 else 'ies'}" \
            if candidates else "no step-* directories"
        raise ExportError(f"{root}: no complete checkpoint ({what})")
    return complete[-1][1]


def read_config_doc(ckpt: Path) -> dict:
    """The experiment config saved with the checkpoint, as a plain mapping."""
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.exists():
        raise ExportError(f"{ckpt}: no config.yaml next to the checkpoint; cannot tell the model's shape")
    try:
        doc = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{cfg_file}: unreadable YAML ({e})") from e
    return doc if isinstance(doc, dict) else {}


def read_model_config(ckpt: Path) -> ModelConfig:
    """The model section of the experiment config saved with the checkpoint."""
    cfg_file = ckpt / "config.yaml"
    doc = read_config_doc(ckpt)
    if not isinstance(doc.get("model"), dict):
        raise ExportError(f"{cfg_file}: no 'model:' section")
    try:
        return ModelConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"{cfg_file}: {e}") from e


# --- loading --------------------------------------------------------------------------------------
def load_checkpoint_model(ckpt: str | Path) -> Transformer:
    """A CPU `Transformer` holding the model weights of DCP checkpoint `ckpt` (any world size), read in this
    one process without a process group. The optimizer state is not read.

    The model is built on the meta device (no throwaway random init), materialized empty on the CPU, each
    parameter in the dtype the checkpoint stores it in, and DCP reads the checkpoint straight into those
    tensors. Every tensor of the model must be in the checkpoint with the same shape, and the checkpoint
    must hold no model tensor the model lacks (a config.yaml that does not match the weights)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = Path(ckpt)
    try:
        verify_checkpoint(ckpt)
        cfg = read_model_config(ckpt)
        metadata = read_dcp_metadata(ckpt / METADATA)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    # model tensors in the checkpoint, by their name in the unwrapped model -> their DCP key (sans prefix)
    stored = {canonical_name(k[len(MODEL_PREFIX):]): k[len(MODEL_PREFIX):]
              for k in metadata.state_dict_metadata if k.startswith(MODEL_PREFIX)}

    with torch.device("meta"):
        model = Transformer(cfg)
    tied = cfg.tie_word_embeddings
    state = model.state_dict()
    # A tied LM head is the embedding: the checkpoint may hold it under one key or both.
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(k for k in state if k not in stored and k not in optional)
    unexpected = sorted(k for k in stored if k not in state)
    if missing:
        raise ExportError(f"{ckpt}: {len(missing)} model tensor(s) missing from the checkpoint: "
                          f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        raise ExportError(f"{ckpt}: the checkpoint holds {len(unexpected)} model tensor(s) that the model of its "
                          f"config.yaml lacks: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    mismatched, not_tensors = [], []
    for name, t in state.items():
        if name not in stored:
            continue
        md = metadata.state_dict_metadata[MODEL_PREFIX + stored[name]]
        if not isinstance(md, TensorStorageMetadata):
            not_tensors.append(name)
        elif tuple(md.size) != tuple(t.shape):
            mismatched.append(f"{name} {tuple(md.size)} vs {tuple(t.shape)}")
    if not_tensors:
        raise ExportError(f"{ckpt}: not stored as tensors: {', '.join(not_tensors[:20])}")
    if mismatched:
        raise ExportError(f"{ckpt}: checkpoint shape vs model shape (config.yaml) differ for {len(mismatched)} "
                          f"tensor(s): {'; '.join(mismatched[:10])}")

    model.to_empty(device="cpu")
    if tied:  # to_empty gives each module its own new Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    # Keep the checkpoint's dtype per tensor (no float32 copy of a bf16 checkpoint).
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if name in stored:
            want = metadata.state_dict_metadata[MODEL_PREFIX + stored[name]].properties.dtype
            if p.dtype != want:
                p.data = torch.empty_like(p, dtype=want)
    # The non-persistent buffers are not in the checkpoint: recompute them (cheap; no parameter init).
    model.rotary.reset_parameters()
    for moe in model.moe_layers():
        moe.reset_stats()
    model.reset_max_logits()

    to_load = {stored[name]: t for name, t in model.state_dict().items() if name in stored}
    if tied and "lm_head.weight" in to_load and "embed_tokens.weight" in to_load:
        to_load.pop("lm_head.weight")  # the same tensor: read it once
    try:
        with torch.no_grad():
            load_dcp_tensors(ckpt, {"model": to_load}, no_dist=True)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return model


# --- the run's tokenizer --------------------------------------------------------------------------
def data_sources(doc: dict) -> list[str]:
    """The data source paths of a saved config ("builtin" or prepared directories); [] if it has no data
    section (a hand-made checkpoint)."""
    data = doc.get("data")
    if not isinstance(data, dict):
        return []
    listed = [s.get("path") for s in data.get("sources") or [] if isinstance(s, dict) and s.get("path")]
    return [str(p) for p in listed] or [str(data.get("source") or "builtin")]


def _source_fingerprint(source: str) -> str | None:
    """The tokenizer fingerprint a data source's shards record; None if it cannot be read."""
    if source == "builtin":  # data/builtin.py tokenizes with the byte tokenizer (and building it is slow)
        return ByteTokenizer().fingerprint
    try:
        train, _ = open_source(source, progress=False)
        return open_shard(train[0]).tokenizer_fingerprint
    except (DataError, ShardError, OSError, ValueError, IndexError):
        return None


def recorded_fingerprint(ckpt: Path, sources: list[str]) -> str | None:
    """The fingerprint of the tokenizer the run trained with: its train state records it (a trainer resumes
    only onto data of that tokenizer), else the first readable data source's shards say it."""
    try:
        fingerprint = json.loads((ckpt / "train_state-rank0.json").read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        fingerprint = None
    if isinstance(fingerprint, str):
        return fingerprint
    return next((fp for fp in map(_source_fingerprint, sources) if fp is not None), None)


def find_run_tokenizer(ckpt: Path) -> tuple[Tokenizer | None, str]:
    """(the tokenizer the checkpoint was trained with, "") or (None, why it cannot be told). It is searched
    for as the trainer does (data/loader.py): the byte tokenizer, or the tokenizer.json that `data.prepare`
    copies into each prepared data directory named by the saved config (relative paths from the cwd)."""
    sources = data_sources(read_config_doc(ckpt))
    fingerprint = recorded_fingerprint(ckpt, sources)
    if fingerprint is None:
        where = ", ".join(sources) if sources else "no data section in config.yaml"
        return None, f"neither the checkpoint's train state nor its data sources ({where}) name a tokenizer"
    dirs = [Path(s).expanduser() for s in sources if s != "builtin"]
    stream = (read_config_doc(ckpt).get("data") or {}).get("stream") or {}
    if isinstance(stream, dict) and stream.get("path") and stream.get("tokenizer") not in (None, "byte"):
        dirs.insert(0, Path(str(stream["tokenizer"])).expanduser())  # data.stream tokenizes with this file
    try:
        return tokenizer_from_fingerprint(fingerprint, dirs), ""
    except (ValueError, ImportError):
        where = ", ".join(map(str, dirs)) or "no data directory"
        return None, f"the run's tokenizer (fingerprint {fingerprint}) is not in {where}"


def _choose_tokenizer(ckpt: Path, spec: str | None) -> tuple[Tokenizer | None, list[str]]:
    """(tokenizer to export or None, warnings): `spec` ("byte" or a tokenizer.json path) if given, else the
    run's own."""
    if spec is None:
        tok, why = find_run_tokenizer(ckpt)
        if tok is None:
            return None, [f"{why}; no tokenizer files written (name it with --tokenizer PATH|byte)"]
        return tok, []
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError, ImportError) as e:
        raise ExportError(f"--tokenizer {spec}: {' '.join(str(e).split())}") from None
    recorded = recorded_fingerprint(ckpt, data_sources(read_config_doc(ckpt)))
    if recorded is not None and recorded != tok.fingerprint:  # e.g. the same file with other special tokens
        return tok, [f"--tokenizer {spec} (fingerprint {tok.fingerprint}) is not the one the run trained with "
                     f"(fingerprint {recorded}); exporting it as asked"]
    return tok, []


def with_token_ids(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """`cfg` with the tokenizer's BOS / EOS ids where it leaves them null (so `generate` stops at EOS); ids the
    config sets are kept. ExportError if the tokenizer has more ids than the model has embedding rows."""
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids, more than model.vocab_size={cfg.vocab_size}; "
                          "it cannot be this model's tokenizer")
    return dataclasses.replace(
        cfg, bos_token_id=tok.bos_id if cfg.bos_token_id is None else cfg.bos_token_id,
        eos_token_id=tok.eos_id if cfg.eos_token_id is None else cfg.eos_token_id)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tokenizer_files(out_dir: Path, tok: Tokenizer, cfg: ModelConfig) -> None:
    """The tokenizer files and generation_config.json, into an export that export_hf has put in place. (Not in
    its staging directory: models/hf.py knows nothing of tokenizers. A crash in between leaves a loadable model
    without its tokenizer; exporting again completes it.)"""
    save_for_transformers(tok, out_dir, model_max_length=cfg.max_position_embeddings)
    _write_json_atomic(out_dir / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": tok.pad_id})


# --- export ---------------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, ckpt: Path) -> None:
    """export_hf replaces OUT_DIR wholesale: never let that be (or contain) the checkpoint, or clobber a
    directory that is not an earlier export."""
    out, src = out_dir.resolve(), ckpt.resolve()
    if out == src or out in src.parents:
        raise ExportError(f"{out_dir}: OUT_DIR must not be the checkpoint or a directory containing it ({ckpt})")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
            raise ExportError(f"{out_dir}: exists, is not empty and is not an earlier export (no config.json); "
                              "choose a new directory")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                      step: int | None = None, max_shard_bytes: int = 5 * 2**30,
                      tokenizer: str | None = None) -> ExportResult:
    """Resolve `checkpoint` (see `resolve_checkpoint`), load its model, write it to `out_dir` in the released
    layout with `models.hf.export_hf` (config.json, safetensors shards, index; the router correction bias
    stays float32), then the run's tokenizer (or `tokenizer`: "byte" or a tokenizer.json path) next to it."""
    ckpt = resolve_checkpoint(checkpoint, step)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, ckpt)
    tok, warnings = _choose_tokenizer(ckpt, tokenizer)  # before the slow part: a bad --tokenizer fails fast
    model = load_checkpoint_model(ckpt)
    if tok is not None:
        model.cfg = with_token_ids(model.cfg, tok)  # what export_hf writes into config.json
    export_hf(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if tok is not None:
        write_tokenizer_files(out_dir, tok, model.cfg)
    return ExportResult(checkpoint=ckpt, step=checkpoint_step(ckpt), out_dir=out_dir,
                        num_params=model.num_params(), dtype=dtype,
                        files=sorted(p.name for p in out_dir.iterdir() if p.is_file()), tokenizer=tok,
                        warnings=warnings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.export",
        description="Export a Chogori training checkpoint (DCP, any world size) to the released "
                    "DeepSeek-V3 / Kimi-K2 layout: config.json + safetensors shards + index, loadable by "
                    "transformers (AutoModelForCausalLM), vLLM and SGLang, with the run's tokenizer for "
                    "AutoTokenizer. Runs in one process on the CPU and holds the full model in RAM.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a checkpoint (<run>/checkpoints/step-N), or a run directory or its checkpoints/ "
                             "directory: then the newest complete checkpoint (or --step N) is exported")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="output directory (created; an earlier export there is replaced atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the exported weights (default: bf16, as released; the router's "
                             "e_score_correction_bias always stays fp32)")
    parser.add_argument("--step", type=int, default=None,
                        help="export the checkpoint of this step (default: the newest complete one)")
    parser.add_argument("--tokenizer", metavar="PATH|byte", default=None,
                        help="the tokenizer to write next to the weights: 'byte' or a tokenizer.json (or a "
                             "directory holding one); default: the one the run trained with, if it can be found")
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.out_dir, dtype=DTYPES[args.dtype], step=args.step,
                                   tokenizer=args.tokenizer)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    step = "?" if result.step is None else result.step
    print(f"exported step {step} from {result.checkpoint}: {result.num_params:,} parameters "
          f"({result.num_params / 1e6:.2f}M), dtype {args.dtype}")
    if result.tokenizer is not None:
        print(f"tokenizer: {result.tokenizer!r}")
    print(f"wrote {result.out_dir}: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
