"""What a resume may change: everything in the config, except what the saved state cannot be loaded into.

A resume takes every hyperparameter from its config and only state from the checkpoint. Changed settings
are listed, one line each (`resume: optim.lr 0.0003 -> 0.00015`); a change is refused, naming the key,
only where the checkpoint's tensors or data position no longer mean anything: the model's shape (which
includes the vocabulary size), the optimizer kind (its state differs), the tokenizer (token ids change
meaning), or a run that is already finished.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from models.config import ConfigError
from train.config import ExperimentConfig
from train.safe_load import checkpoint_tensor_shapes


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def saved_config(ckpt: Path) -> dict[str, Any]:
    """The flattened config the checkpoint was saved with ({} if it has none)."""
    path = ckpt / "config.yaml"
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable YAML ({type(e).__name__})") from None
    return _flatten(doc) if isinstance(doc, dict) else {}


def config_changes(ckpt: Path, cfg: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this config's value) for every key that differs from the checkpoint's config."""
    old, new = saved_config(ckpt), _flatten(dataclasses.asdict(cfg))
    if not old:
        return []
    return [(k, old.get(k), v) for k, v in new.items() if k in old and old[k] != v and not (
        isinstance(v, float) and isinstance(old[k], (int, float)) and float(old[k]) == v)]


def check_resume(ckpt: Path, cfg: ExperimentConfig, model: torch.nn.Module, train_state: dict[str, Any],
                 tokenizer_fingerprint: str | None) -> list[str]:
    """Raise ConfigError if this config cannot continue from `ckpt`; else the lines describing what changed."""
    changes = config_changes(ckpt, cfg)
    changed = {k: (a, b) for k, a, b in changes}
    t = cfg.train

    step = int(train_state["step"])
    if step >= t.steps:
        raise ConfigError(
            f"train.steps: {t.out_dir} already holds a finished run (its checkpoint {ckpt.name} is at step "
            f"{step}, train.steps={t.steps}); raise train.steps to continue it, or set a new train.out_dir to "
            "start another run")

    shapes = checkpoint_tensor_shapes(ckpt)
    wrong = [name for name, tensor in get_model_state_dict(model).items()
             if shapes.get(f"model.{name}") != tuple(tensor.shape)]
    if wrong:
        model_keys = [k for k in changed if k.startswith("model.")]
        key = model_keys[0] if model_keys else "model"
        was = f"the checkpoint has {changed[key][0]}, this config {changed[key][1]}" if model_keys else \
            f"{len(wrong)} tensor(s) differ, e.g. {wrong[0]}"
        raise ConfigError(f"{key}: cannot resume from {ckpt}: {was}; a resume cannot change the model's shape "
                          "(vocabulary included). Start a new run: a new train.out_dir, or checkpoint.resume=none")
    if "optim.name" in changed:
        a, b = changed["optim.name"]
        raise ConfigError(f"optim.name: cannot resume a {a} run with {b}: the optimizer state does not carry "
                          "over. Keep optim.name, or start a new run (checkpoint.resume=none)")
    saved_fp = train_state.get("tokenizer")
    if saved_fp is not None and tokenizer_fingerprint is not None and saved_fp != tokenizer_fingerprint:
        key = next((k for k in changed if k.startswith("data.source")), "data.source")
        raise ConfigError(f"{key}: the data's tokenizer differs from the one {ckpt} was trained with (fingerprint "
                          f"{tokenizer_fingerprint[:12]} vs {saved_fp[:12]}): token ids would change meaning. "
                          "Prepare the data with the run's tokenizer, or start a new run")
    return [f"resume: {k} {a} -> {b}" for k, a, b in changes]
