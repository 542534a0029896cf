"""The experiment config: one YAML file plus `key=value` overrides, checked against a typed schema.

Groups: model, data, optim, parallel, train, checkpoint, logging. The schema is the dataclasses below;
every key is documented in docs/configuration.md. An unknown key anywhere is an error that names the key
and the closest valid one, because a typo that silently falls back to a default wastes a GPU-week.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from models.config import ConfigError, ModelConfig, unknown_key_message


@dataclass
class DataSourceConfig:
    path: str = "builtin"  # "builtin" or a directory written by `python -m data.prepare`
    weight: float = 1.0  # share of the training samples, normalised over the sources; must be > 0
    name: str | None = None  # shown in messages; null = the path


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" (stdlib corpus, built on first use) or a prepared shard directory
    sources: list[DataSourceConfig] = field(default_factory=list)  # weighted mixture; replaces `source`
    cache_dir: str | None = None  # where the builtin corpus is cached; null = the user's cache dir
    seq_len: int = 256
    prefetch: int = 2  # batches read ahead by the loader's background thread
    document_masking: bool = False  # attend only within each packed document (positions restart per document)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool | None = None  # null = fused AdamW on CUDA only
    momentum: float = 0.95  # Muon momentum
    nesterov: bool = True  # Muon Nesterov momentum
    ns_steps: int = 5  # Newton-Schulz iterations
    ns_dtype: str = "auto"  # Newton-Schulz dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    qk_clip_tau: float | None = 100.0  # QK-Clip threshold on per-head max attention logits; null disables
    schedule: str = "wsd"  # wsd | cosine | linear | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1  # wsd: share of the steps spent in the final decay
    decay_shape: str = "linear"  # wsd decay: linear | cosine | sqrt


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # FSDP2 shard degree; -1 = the rest of the world
    ep: int = 1  # expert-parallel degree (borrowed from the data-parallel ranks)
    activation_checkpointing: str = "none"  # none | selective | full


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps to run
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward per rank
    seed: int = 0
    out_dir: str = "runs/default"  # the run directory: metrics, checkpoints, resolved config
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    compile: bool = False  # torch.compile each block
    log_interval: int = 1
    eval_interval: int = 100  # steps between validation passes; 0 = never
    eval_batches: int = 4
    threads: int | None = None  # torch CPU threads; null = torch's default
    max_bad_steps: int = 5  # non-finite loss/grad-norm steps in a row that are skipped before the run stops
    sample_log: bool = False  # append each rank's global sample indices per step to <out_dir>/samples/


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in out_dir) | none | a checkpoint path
    save_final: bool = True
    async_save: bool = False  # write in the background (state staged in CPU memory) while training goes on


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "chogori"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SpikeConfig:
    window: int = 100  # recent steps the baseline (median) and spread (robust std of differences) use
    threshold: float = 6.0  # a spike is loss > baseline + threshold * spread
    min_rel_spread: float = 0.01  # spread floor, as a fraction of the baseline (plateaus are not spiky)
    warmup: int = 20  # steps seen before anything is flagged


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # a progress bar on an interactive terminal
    tensorboard: bool = False  # also write TensorBoard event files to <out_dir>/tensorboard
    peak_tflops: float | None = None  # per-device peak for MFU; null = known GPUs' dense bf16 peak, else none
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    expert_load_interval: int = 10  # steps between per-expert load shares in the JSONL (K2: 23k numbers each)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _schema() -> DictConfig:
    # ModelConfig validates in __post_init__; the schema only needs its field types, so build it with
    # the class defaults (valid by construction).
    return OmegaConf.structured(ExperimentConfig)


def _unknown_key_error(node: DictConfig, key: str) -> ConfigError:
    """'did you mean' for `key` (dotted, full) given the schema `node` that should have held it."""
    parent, _, leaf = key.rpartition(".")
    where = f"group '{parent}'" if parent else "the config (top level)"
    return ConfigError(unknown_key_message(leaf, [str(k) for k in node.keys()], where) + f" [full key: {key}]")


def _check_keys(schema: DictConfig, data: Any, prefix: str = "") -> None:
    """Reject keys not in the schema, recursively, with a 'did you mean' message.

    `model.rope_scaling` is a free-form dict (YaRN parameters) and is not descended into.
    """
    if not isinstance(data, (dict, DictConfig)):
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(schema, dotted)
        sub = schema[key]
        if isinstance(sub, DictConfig) and dotted != "model.rope_scaling":
            _check_keys(sub, value, dotted + ".")
        elif isinstance(sub, ListConfig) and isinstance(value, (list, ListConfig)):
            item_type = sub._metadata.element_type  # a list of structured configs (e.g. data.sources)
            if dataclasses.is_dataclass(item_type):
                for i, item in enumerate(value):
                    _check_keys(OmegaConf.structured(item_type), item, f"{dotted}[{i}].")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file + `a.b=value` overrides -> validated ExperimentConfig (typed dataclasses)."""
    schema = _schema()
    merged = schema
    sources = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        sources.append(OmegaConf.load(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=100)")
        sources.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        for src in sources:
            _check_keys(schema, OmegaConf.to_container(src, resolve=False))
            merged = OmegaConf.merge(merged, src)
        obj = OmegaConf.to_object(merged)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ConfigError(f"config: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"config: bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    assert isinstance(obj, ExperimentConfig)
    obj.model = ModelConfig.from_dict(dataclasses.asdict(obj.model))  # re-run validation on the final values
    validate(obj)
    return obj


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks the schema's types cannot express."""
    t = cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    need(t.global_batch_size > 0 and t.micro_batch_size > 0, "train.global_batch_size and "
         "train.micro_batch_size must be > 0")
    need(cfg.data.seq_len > 0, f"data.seq_len must be > 0, got {cfg.data.seq_len}")
    need(cfg.data.seq_len <= cfg.model.max_position_embeddings,
         f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
         f"{cfg.model.max_position_embeddings}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got '{t.device}'")
    need(t.dtype in ("auto", "bf16", "fp32"), f"train.dtype must be auto|bf16|fp32, got '{t.dtype}'")
    need(cfg.logging.wandb.mode in ("online", "offline", "disabled"),
         f"logging.wandb.mode must be online|offline|disabled, got '{cfg.logging.wandb.mode}'")
    need(cfg.parallel.activation_checkpointing in ("none", "selective", "full"),
         "parallel.activation_checkpointing must be none|selective|full, got "
         f"'{cfg.parallel.activation_checkpointing}'")
    need(cfg.optim.warmup_steps <= t.steps, f"optim.warmup_steps ({cfg.optim.warmup_steps}) must not exceed "
                                            f"train.steps ({t.steps}); lower it for a short run")
    need(cfg.logging.expert_load_interval >= 1, "logging.expert_load_interval must be >= 1")
    need(t.max_bad_steps >= 0, f"train.max_bad_steps must be >= 0, got {t.max_bad_steps}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    need(cfg.data.prefetch >= 0, f"data.prefetch must be >= 0, got {cfg.data.prefetch}")
    need(not (cfg.data.sources and cfg.data.source != "builtin"),
         "set either data.source (one source) or data.sources (a mixture), not both")
    for i, src in enumerate(cfg.data.sources):
        need(src.weight > 0, f"data.sources[{i}].weight must be > 0, got {src.weight} (remove the source to "
                             "leave it out)")
    need(cfg.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {cfg.optim.grad_clip}")


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config saved with `to_dict` (e.g. from a checkpoint), with the same key checks."""
    src = OmegaConf.create(d)
    schema = _schema()
    _check_keys(schema, d)
    obj = OmegaConf.to_object(OmegaConf.merge(schema, src))
    assert isinstance(obj, ExperimentConfig)
    obj.model = ModelConfig.from_dict(dataclasses.asdict(obj.model))
    validate(obj)
    return obj


__all__ = ["ConfigError", "ExperimentConfig", "ListConfig", "load_config", "to_yaml", "to_dict", "from_dict"]
