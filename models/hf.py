"""Export to and import from the released DeepSeek-V3 / Kimi-K2 checkpoint layout.

The released layout (what `transformers`, vLLM and SGLang read) is a directory with `config.json`,
safetensors shards and `model.safetensors.index.json`; tensors are named `model.layers.N....` with one
tensor per routed expert (`mlp.experts.J.gate_proj.weight`). Chogori stores experts stacked (`[E, out, in]`)
and drops the `model.` prefix, so conversion is a rename plus a split/stack of the expert tensors.
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
from models.transformer import Transformer

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_HF_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

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
            layer, proj = m.groups()
            for j in range(t.shape[0]):
                yield f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight", t[j]
        elif key == "lm_head.weight":
            yield key, t
        else:
            yield f"model.{key}", t


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from released-layout tensors (per-expert tensors stacked back)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _HF_EXPERT_KEY.match(key)
        if m:
            layer, j, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            experts.setdefault((layer, proj), {})[j] = t
        elif key == "lm_head.weight":
            out[key] = t
        elif key.startswith("model.layers.") and int(key.split(".")[2]) >= cfg.num_hidden_layers:
            continue  # multi-token-prediction layers of the released checkpoints: not part of this network
        elif cfg.n_shared_experts == 0 and ".mlp.shared_experts." in key and t.numel() == 0:
            # transformers builds a shared expert of width moe_intermediate_size * 0 even when there is none, and
            # saves its zero-size tensors; Chogori has no module for it. Non-empty ones still fail the strict load.
            continue
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = t
        else:
            raise KeyError(f"unexpected tensor '{key}' in checkpoint")
    for (layer, proj), per_expert in experts.items():
        if layer >= cfg.num_hidden_layers:
            continue
        missing = set(range(cfg.n_routed_experts)) - per_expert.keys()
        if missing:
            raise KeyError(f"layer {layer} {proj}: experts {sorted(missing)[:8]} missing from checkpoint")
        out[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([per_expert[j] for j in range(len(per_expert))])
    return out


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
    """All tensors of a safetensors checkpoint directory (sharded with an index, or a single file)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        doc = _read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise HFCheckpointError(f"{index}: no weight_map")
        files = sorted(set(map(str, weight_map.values())))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fname in files:
        path = ckpt_dir / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types; name the file
            raise HFCheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    return tensors


def import_hf(ckpt_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> Transformer:
    """Load a released-layout checkpoint into a Chogori `Transformer` (built on the meta device first,
    so no memory is spent on a throwaway random init). Each tensor is cast as `import_dtype` says: router
    weights and correction biases float32, the rest `dtype`, or with `dtype=None` their stored dtype."""
    ckpt_dir = Path(ckpt_dir)
    config = _read_json(ckpt_dir / "config.json")
    try:
        cfg = from_hf_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise HFCheckpointError(f"{ckpt_dir / 'config.json'}: not a DeepSeek-V3 config ({e})") from None
    state = from_hf_tensors(read_hf_tensors(ckpt_dir), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    model.init_weights()  # buffers (rotary, stats); parameters are overwritten just below
    # Each parameter takes the dtype `import_dtype` gives it before the strict load copies the file's values in.
    # The buffers are left alone: the rotary frequencies, max-logit and load statistics stay float32 (a blanket
    # `model.to(bf16)` would round them) and the correction bias, float32 too, takes the file's values.
    for name, p in model.named_parameters():
        stored = state[name].dtype if name in state else p.dtype  # a missing tensor fails the strict load below
        p.data = p.data.to(import_dtype(name, stored, dtype))
    model.load_state_dict(state, strict=True)
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
