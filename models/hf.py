"""Export to and import from the released DeepSeek-V3 / Kimi-K2 checkpoint layout.

The released layout (what `transformers`, vLLM and SGLang read) is a directory with `config.json`,
safetensors shards and `model.safetensors.index.json`; tensors are named `model.layers.N....` with one
tensor per routed expert and projection (`mlp.experts.J.gate_proj.weight`). Chogori stores experts stacked
(`gate_up_proj` [E, 2, I, H] holding gate and up, `down_proj` [E, H, I]) and drops the `model.` prefix, so
conversion is a rename plus a split/stack of the expert tensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import ModelConfig
from models.init import canonical_name, shard_indices
from models.transformer import Transformer

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# The released projections each stacked tensor holds, in the order of its dim 1 (gate_up) or alone (down).
_EXPERT_PROJS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

# Released config.json fields we do not model: inference-only or quantization details.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "quantization_config", "num_nextn_predict_layers", "num_mtp_layers", "ep_size", "moe_layer_freq",
    "pretraining_tp", "attention_dropout", "pad_token_id", "rope_interleave", "output_router_logits",
    "aux_loss_alpha", "seq_aux", "head_dim", "qk_head_dim", "rope_parameters", "moe_router_dtype",
    "router_aux_loss_coef", "_name_or_path", "tie_encoder_decoder", "is_encoder_decoder", "kv_lora",
}


# --- config ---------------------------------------------------------------------------------------
def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json in the released DeepSeek-V3 style (training-only fields left out)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ModelConfig.TRAINING_ONLY}
    d.update(
        num_key_value_heads=cfg.num_attention_heads,
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        torch_dtype=str(dtype).removeprefix("torch."),
        num_nextn_predict_layers=0,
        rope_interleave=True,
        use_cache=True,
        moe_layer_freq=1,
        ep_size=1,
        pretraining_tp=1,
        attention_dropout=0.0,
    )
    return d


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a released (or transformers-written) config.json."""
    d = dict(d)
    rope = d.get("rope_parameters")  # transformers >= 5 writes RoPE settings here
    if rope and "rope_scaling" not in d:
        rope = dict(rope)
        d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    elif rope:
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    kwargs = {k: v for k, v in d.items() if k not in _IGNORED_HF_KEYS}
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key][0]
    return ModelConfig.from_dict(kwargs, ignore_unknown=True)


# --- state dicts ----------------------------------------------------------------------------------
def to_hf_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the released layout; stacked experts are split into per-expert views."""
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m:
            layer, stacked = m.groups()
            projs = _EXPERT_PROJS[stacked]
            for j in range(t.shape[0]):
                for p, proj in enumerate(projs):
                    yield f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight", t[j, p] if len(projs) > 1 else t[j]
        elif key == "lm_head.weight":
            yield key, t
        else:
            yield f"model.{key}", t


# --- files ----------------------------------------------------------------------------------------
def export_hf(model: Transformer, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a released-layout checkpoint (config.json + safetensors shards + index).

    Written into a temporary sibling directory and renamed into place, so a crash never leaves a
    half-written checkpoint at `out_dir`. `dtype=None` keeps the parameters' own dtype.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_dtype = dtype or next(model.parameters()).dtype
    # mkdir's mode (0o777 minus the umask), not mkdtemp's 0o700, which the export would keep once renamed into
    # place. (data.shards.make_temp_dir does the same; models/ imports nothing from data/.)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.urandom(8).hex()}")
    tmp.mkdir()
    try:
        _write_checkpoint(model, state, tmp, save_dtype, max_shard_bytes)
    except BaseException:
        _rmtree(tmp)  # never leave a half-written temporary directory behind
        raise

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        _rmtree(old)  # left over from an export that crashed between the two renames
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def _write_checkpoint(model: Transformer, state: dict[str, torch.Tensor], tmp: Path, save_dtype: torch.dtype,
                      max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in to_hf_tensors(state):
        # The router's correction bias stays float32, as in the released checkpoints.
        t = t.detach().to("cpu", torch.float32 if name.endswith("e_score_correction_bias") else save_dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(to_hf_config(model.cfg, save_dtype), indent=2) + "\n")


class HFCheckpointError(ValueError):
    """A file of a released-layout checkpoint that cannot be read; the message names it."""


def _read_json(path: Path) -> Any:
    """JSON only (never a pickle): a damaged or substituted file is an error naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{path}: not readable JSON ({type(e).__name__})") from None


def read_hf_tensors(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (sharded with an index, or a single file), by name."""
    with _CheckpointFiles(ckpt_dir) as files:
        return {name: files.slice(name)[:] for name in files.names()}


def read_hf_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a released-layout checkpoint's config.json."""
    path = Path(ckpt_dir) / "config.json"
    try:
        return from_hf_config(_read_json(path))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise HFCheckpointError(f"{path}: not a DeepSeek-V3 config ({e})") from None


# Fields that may differ between a run's config and the checkpoint it starts from: training-only settings, the
# initialiser's std (the weights come from the file), token ids (the tokenizer's business, not the weights'), and
# num_key_value_heads (MLA: null and the head count mean the same).
_START_FROM_FREE = {*ModelConfig.TRAINING_ONLY, "init_from", "initializer_range", "bos_token_id", "eos_token_id",
                    "num_key_value_heads"}


def check_hf_config(cfg: ModelConfig, ckpt_dir: str | os.PathLike) -> None:
    """Raise HFCheckpointError, naming every differing field, if the checkpoint at `ckpt_dir` is not the network
    `cfg` describes (a run that starts from it would load tensors of the wrong shape or meaning)."""
    theirs = read_hf_config(ckpt_dir)
    differ = [(f, getattr(cfg, f), getattr(theirs, f)) for f in ModelConfig.field_names()
              if f not in _START_FROM_FREE and _normal(getattr(cfg, f)) != _normal(getattr(theirs, f))]
    if differ:
        lines = "; ".join(f"model.{f} is {a!r} here, {b!r} in the checkpoint" for f, a, b in differ)
        raise HFCheckpointError(f"{Path(ckpt_dir) / 'config.json'}: the checkpoint is not this config's model: {lines}")


def _normal(value: Any) -> Any:
    """Comparable form of a config value: YaRN's 'rope_type' and 'type' are one key."""
    if isinstance(value, dict):
        return {("type" if k == "rope_type" else k): v for k, v in value.items()}
    return value


class _CheckpointFiles:
    """The safetensors files of a checkpoint directory, each opened once, lazily: `slice(name)` reads nothing until
    indexed, and then only the requested box (safetensors maps the file and copies just those bytes)."""

    def __init__(self, ckpt_dir: str | os.PathLike) -> None:
        self.dir = Path(ckpt_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            doc = _read_json(index)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map")
            self._file_of = {str(k): str(v) for k, v in weight_map.items()}
        else:
            self._file_of = {name: "model.safetensors" for name in self._open("model.safetensors").keys()}
        self._open_files: dict[str, Any] = {}

    def _open(self, fname: str) -> Any:
        path = self.dir / fname
        try:
            handle = safe_open(str(path), framework="pt")
            handle.keys()
            return handle
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types; name the file
            raise HFCheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def slice(self, name: str) -> Any:
        fname = self._file_of[name]
        if fname not in self._open_files:
            self._open_files[fname] = self._open(fname)
        try:
            return self._open_files[fname].get_slice(name)
        except Exception as e:  # noqa: BLE001
            raise HFCheckpointError(f"{self.dir / fname}: tensor '{name}' listed in the index is not readable "
                                    f"({type(e).__name__})") from None

    def __enter__(self) -> _CheckpointFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._open_files.clear()


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _hf_sources(name: str, cfg: ModelConfig) -> list[str]:
    """The released-layout tensors our state-dict entry `name` is made of: one, or one per routed expert (and per
    projection of `gate_up_proj`: expert-major, gate before up, the order of the stacked tensor's rows)."""
    m = _EXPERT_KEY.match(name)
    if m:
        layer, stacked = m.groups()
        return [f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight" for j in range(cfg.n_routed_experts)
                for proj in _EXPERT_PROJS[stacked]]
    return [name if name == "lm_head.weight" else f"model.{name}"]


def _ignorable(name: str, cfg: ModelConfig, shape: list[int]) -> bool:
    """Tensors of released checkpoints that are not part of this network: multi-token-prediction layers (index
    >= num_hidden_layers), and the zero-size shared expert transformers saves when there is none."""
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= cfg.num_hidden_layers:
        return True
    return cfg.n_shared_experts == 0 and ".mlp.shared_experts." in name and 0 in shape


def _read_box(tensor_slice: Any, index: list[torch.Tensor]) -> torch.Tensor:
    """The entries at the per-dim global `index` of a lazily opened tensor, reading only their bounding box."""
    lo = [int(i.min()) for i in index]
    box = tensor_slice[tuple(slice(a, int(i.max()) + 1) for a, i in zip(lo, index, strict=True))]
    for d, (a, i) in enumerate(zip(lo, index, strict=True)):
        if box.shape[d] != i.numel() or not bool((i[1:] > i[:-1]).all()):  # strided or reordered shard
            box = box.index_select(d, i - a)
    return box


@torch.no_grad()
def load_hf_weights(model: Transformer, ckpt_dir: str | os.PathLike) -> None:
    """Copy a released-layout checkpoint's weights into `model` in place, whatever its layout: plain, FSDP2- or
    expert-sharded DTensors, or a pipeline rank's pruned model. Each rank reads only the slices it holds (the
    bounding box of its shard of each tensor), so no process ever holds the full model; values are cast to the
    parameters' dtype. Every tensor the model holds must be in the file with its released shape, and every
    tensor of the file must belong to the network (`HFCheckpointError` names the first problems otherwise).
    Local work only: no communication."""
    cfg = model.cfg
    with _CheckpointFiles(ckpt_dir) as files:
        available = set(files.names())
        with torch.device("meta"):
            expected = {n for n, _ in to_hf_tensors(Transformer(cfg).state_dict())}
        unexpected = sorted(n for n in available - expected if not _ignorable(n, cfg, files.slice(n).get_shape()))
        if any(n.endswith("_scale_inv") for n in unexpected):  # DeepSeek-V3's / Kimi K2's FP8 release
            raise HFCheckpointError(f"{files.dir}: FP8-quantized weights (block scales such as '{unexpected[0]}'); "
                                    "dequantize them to bf16 first, as the releases' own conversion scripts do")
        if unexpected:
            raise HFCheckpointError(f"{files.dir}: tensors that are not part of this model: {unexpected[:8]}")
        for raw_name, tensor in model.state_dict(keep_vars=True).items():
            name = canonical_name(raw_name)
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # the embedding's own tensor
            sources = _hf_sources(name, cfg)
            missing = [s for s in sources if s not in available]
            if missing:
                raise HFCheckpointError(f"{files.dir}: '{missing[0]}' is missing ({len(missing)} of the "
                                        f"{len(sources)} tensor(s) of {name})")
            if tensor.device.type == "meta":
                raise ValueError(f"load_hf_weights: '{name}' is on the meta device; call to_empty() first")
            local, index = shard_indices(tensor)
            # A stacked expert tensor has one source per entry of its leading dims: [E] (down) or [E, 2] (gate_up).
            lead = 0 if len(sources) == 1 else tensor.ndim - 2
            per_source = tuple(tensor.shape[lead:])
            for s in sources:
                if tuple(files.slice(s).get_shape()) != per_source:
                    raise HFCheckpointError(f"{files.dir}: '{s}' has shape {files.slice(s).get_shape()}, the model "
                                            f"needs {list(per_source)}")
            if local.numel() == 0:
                continue
            if len(sources) == 1:
                values = _read_box(files.slice(sources[0]), index)
            else:  # a stacked expert tensor: this rank's experts (and projections), each its own tensor in the file
                flat = torch.zeros(1, dtype=torch.long)
                for n, idx in zip(tensor.shape[:lead], index[:lead], strict=True):
                    flat = (flat[:, None] * n + idx[None, :]).reshape(-1)
                boxes = [_read_box(files.slice(sources[j]), index[lead:]) for j in flat.tolist()]
                values = torch.stack(boxes).view(local.shape)
            local.copy_(values)


def import_hf(ckpt_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> Transformer:
    """Load a released-layout checkpoint into a Chogori `Transformer` (built on the meta device first,
    so no memory is spent on a throwaway random init). Each tensor is cast as `import_dtype` says: router
    weights and correction biases float32, the rest `dtype`, or with `dtype=None` their stored dtype."""
    cfg = read_hf_config(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(parameters=False)  # buffers (rotary, stats); the parameters come from the file below
    # Each parameter takes the dtype `import_dtype` gives it before its values are copied in. The buffers are left
    # alone: the rotary frequencies, max-logit and load statistics stay float32 (a blanket `model.to(bf16)` would
    # round them) and the correction bias, float32 too, takes the file's values.
    with _CheckpointFiles(ckpt_dir) as files:
        for name, p in model.named_parameters():
            source = _hf_sources(name, cfg)[0]
            stored = _SAFETENSORS_DTYPES.get(files.slice(source).get_dtype(), p.dtype) \
                if source in files else p.dtype  # a missing tensor is reported by load_hf_weights
            p.data = p.data.to(import_dtype(name, stored, dtype))
    load_hf_weights(model, ckpt_dir)
    return model


def import_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the tensor `name` (our state-dict name) is imported in, given its dtype in the file.

    Router weights and correction biases are always float32: DeepSeek-V3 routes in fp32, transformers and the
    released checkpoints store them in fp32 beside bf16 weights, and rounding them changes which experts are
    chosen. Every other tensor takes `dtype` when given, else keeps its stored dtype (a bf16 file stays bf16).
    """
    if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return torch.float32
    return dtype or stored


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
