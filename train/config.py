"""The experiment config: one YAML file plus `key=value` overrides, checked against a typed schema.

Groups: model, data, optim, parallel, train, checkpoint, logging. The schema is the dataclasses below;
every key is documented in docs/configuration.md. An unknown key anywhere is an error that names the key
and the closest valid one, because a typo that silently falls back to a default wastes a GPU-week.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import ConfigError, ModelConfig, unknown_key_message
from optim.choices import NS_DTYPE_NAMES, NS_METHODS, optimizer_names
from optim.lr_schedule import DECAY_SHAPES, SCHEDULES, LRSchedule
from parallel.dims import SCHEDULES as PP_SCHEDULES
from parallel.dims import ParallelDims, virtual_stages


@dataclass
class DataSourceConfig:
    path: str = "builtin"  # "builtin" or a directory written by `python -m data.prepare`
    weight: float = 1.0  # share of the training samples, normalised over the sources; must be > 0
    name: str | None = None  # shown in messages; null = the path


@dataclass
class StreamConfig:
    """A `datasets` source streamed and tokenized during training, instead of prepared shards (data/streaming.py)."""

    path: str | None = None  # hub name, builder (json/parquet/text/arrow) or local dir (save_to_disk too); null = off
    name: str | None = None  # the dataset's configuration name
    data_files: Any = None  # for builders: a glob, a list of them, or {split: globs}
    split: str = "train"  # the training split
    text_field: str = "text"
    tokenizer: str = "byte"  # 'byte' or a tokenizer.json
    val_split: str | None = "validation"  # evaluated split; if the source lacks it, documents are held out instead
    val_docs: int = 500  # validation documents kept in memory (of val_split, or held out of split)
    val_fraction: float = 0.05  # without val_split: share of documents held out by a hash of their text; 0 = none
    shuffle_buffer: int = 0  # documents shuffled within consecutive blocks of this many; 0 = stream order
    workers: int = 1  # tokenizing threads per rank, each reading its own share of the rank's stream


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" (stdlib corpus, built on first use) or a prepared shard directory
    sources: list[DataSourceConfig] = field(default_factory=list)  # weighted mixture; replaces `source`
    cache_dir: str | None = None  # where the builtin corpus is cached; null = the user's cache dir
    seq_len: int = 256
    prefetch: int = 2  # batches read ahead by the loader's background thread
    document_masking: bool = False  # attend only within each packed document (positions restart per document)
    stream: StreamConfig = field(default_factory=StreamConfig)  # train from a datasets stream (no prepare step)


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
    ns_triton: str | bool = "auto"  # Newton-Schulz products on the Triton kernel: auto (CUDA + Triton) | true | false
    ns_method: str = "muon"  # Newton-Schulz coefficients: muon (torch.optim.Muon's) | polar_express (opt-in)
    ns_gram: bool = False  # opt-in: Newton-Schulz in the Gram form on matrices >= 2x wider than tall (fewer FLOPs)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    qk_clip_tau: float | None = 100.0  # QK-Clip threshold on per-head max attention logits; null disables
    # cpu: FSDP2 keeps sharded fp32 parameters, gradients and optimizer state in host memory; AdamW steps on
    # DeepSpeed's CPU kernel, Muon's Newton–Schulz on the accelerator (docs/configuration.md). none: on the device.
    offload: str = "none"
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
    timeout_minutes: int = 30  # how long a collective may wait (a hung or dead peer) before the process group fails
    # When FSDP2 reduce-scatters gradients: once per optimizer `step` (the micro-batches accumulate unsharded fp32
    # gradients in between: one collective, more memory) or after every `micro_batch` (gradients stay sharded).
    grad_sync: str = "step"
    # Pipeline parallelism (torch.distributed.pipelining): `pp` stages, the outermost mesh dim (world = pp x dp).
    pp: int = 1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv | dualpipev
    pp_virtual_stages: int = -1  # stages per rank; -1 = the schedule's (1 for gpipe/1f1b, 2 otherwise)
    # FSDP2 frees a block's gathered weights after its forward (true) or keeps them to its backward (false);
    # auto: false under a pipeline (micro-batches would gather the same weights again), true otherwise.
    reshard_after_forward: str = "auto"


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps to run
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward per rank
    seed: int = 0
    out_dir: str = "runs/default"  # the run directory: metrics, checkpoints, resolved config
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bf16 (FSDP2 policy: bf16 compute, fp32 master) | fp32
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    log_interval: int = 1
    eval_interval: int = 100  # steps between validation passes; 0 = never
    eval_batches: int = 4
    threads: int | None = None  # torch CPU threads; null = torch's default
    max_bad_steps: int = 5  # non-finite loss/grad-norm steps in a row that are skipped before the run stops
    sample_log: bool = False  # append each rank's global sample indices per step to <out_dir>/samples/
    # Micro-batches per pipeline run (parallel.pp > 1); -1 = all of the step's (one run per step). A smaller
    # number that divides them runs the pipeline several times per step, accumulating gradients (more bubble).
    pp_microbatches: int = -1
    # Steps to trace with torch.profiler, e.g. [10, 11, 12] (contiguous): a Chrome/Perfetto trace, an op table and,
    # on CUDA, a memory snapshot per rank in <out_dir>/profile/ (docs/profiling.md). Empty: no profiling.
    profile: list[int] = field(default_factory=list)


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


@functools.cache
def _schema() -> DictConfig:
    # ModelConfig validates in __post_init__; the schema only needs its field types, so build it with
    # the class defaults (valid by construction). Built once (it is slow) and only read: merge copies it.
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
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"{dotted}: is a group of keys, not a value; set one of its keys instead "
                                  f"({dotted}.<key>=...; keys: {', '.join(str(k) for k in sub.keys())})")
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
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: must map groups to keys (model:, train:, ...), got a list")
        sources.append(loaded)
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
    except OmegaConfBaseException as e:  # a value of the wrong type, a broken ${interpolation}, ...
        raise ConfigError(f"{getattr(e, 'full_key', None) or 'config'}: {str(e).splitlines()[0]}") from None
    assert isinstance(obj, ExperimentConfig)
    obj.model = ModelConfig.from_dict(dataclasses.asdict(obj.model))  # re-run validation on the final values
    validate(obj)
    return obj


def validate(cfg: ExperimentConfig) -> None:
    """Checks the schema's types cannot express, each raising ConfigError `<key>: <what is wrong and what
    is allowed>`. Everything that needs no world size is checked here, so a bad value fails before any
    process starts; the world-size checks are in `validate_layout`."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    def at_least(key: str, value: int, low: int, note: str = "") -> None:
        need(value >= low, key, f"must be >= {low}{note}, got {value}")

    def one_of(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
        need(value in allowed, key, f"must be one of {', '.join(allowed)}, got '{value}'")

    # math.isfinite also refuses NaN, which passes no comparison but would pass a negated one.
    def positive(key: str, value: float) -> None:
        need(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")

    def non_negative(key: str, value: float, note: str = "") -> None:
        need(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0{note}, got {value}")

    def fraction(key: str, value: float, below_one: bool = False) -> None:
        ok = math.isfinite(value) and 0 <= value and (value < 1 if below_one else value <= 1)
        need(ok, key, f"must be a number in [0, 1{')' if below_one else ']'}, got {value}")

    t, d, o, lg = cfg.train, cfg.data, cfg.optim, cfg.logging
    # train
    at_least("train.steps", t.steps, 1)
    at_least("train.global_batch_size", t.global_batch_size, 1)
    at_least("train.micro_batch_size", t.micro_batch_size, 1)
    need(t.global_batch_size % t.micro_batch_size == 0, "train.micro_batch_size",
         f"{t.micro_batch_size} must divide train.global_batch_size={t.global_batch_size} (each rank runs whole "
         "micro-batches)")
    need(bool(t.out_dir), "train.out_dir", "must be a directory path, got an empty string")
    one_of("train.device", t.device, ("auto", "cpu", "cuda"))
    one_of("train.dtype", t.dtype, ("auto", "bf16", "fp32"))
    at_least("train.log_interval", t.log_interval, 1)
    at_least("train.eval_interval", t.eval_interval, 0, " (0 = never)")
    at_least("train.eval_batches", t.eval_batches, 1, " (set train.eval_interval=0 to skip validation)")
    need(t.threads is None or t.threads >= 1, "train.threads", f"must be null (torch's default) or >= 1, got "
                                                                f"{t.threads}")
    at_least("train.max_bad_steps", t.max_bad_steps, 0)
    # data
    at_least("data.seq_len", d.seq_len, 1)
    need(d.seq_len <= cfg.model.max_position_embeddings, "data.seq_len",
         f"{d.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    at_least("data.prefetch", d.prefetch, 0)
    need(bool(d.source), "data.source", "must be 'builtin' or a prepared directory, got an empty string")
    need(not (d.sources and d.source != "builtin"), "data.sources",
         "set either data.source (one source) or data.sources (a mixture), not both")
    for i, src in enumerate(d.sources):
        need(bool(src.path), f"data.sources[{i}].path", "must be 'builtin' or a prepared directory")
        positive(f"data.sources[{i}].weight", src.weight)
    if d.stream.path is not None:
        s = d.stream
        need(bool(s.path), "data.stream.path", "must be a datasets name, builder or directory, or null (off)")
        need(d.source == "builtin" and not d.sources, "data.stream.path",
             "a stream replaces data.source / data.sources; set one of them, not both")
        need(not t.sample_log, "train.sample_log", "a stream has no global sample index to log; set it false "
                                                   "(or train from prepared shards)")
        at_least("data.stream.val_docs", s.val_docs, 1)
        fraction("data.stream.val_fraction", s.val_fraction, below_one=True)
        at_least("data.stream.shuffle_buffer", s.shuffle_buffer, 0, " (0 = stream order)")
        at_least("data.stream.workers", s.workers, 1)
    # optim
    one_of("optim.name", o.name.lower(), optimizer_names())
    positive("optim.lr", o.lr)
    non_negative("optim.weight_decay", o.weight_decay)
    need(len(o.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in o.betas), "optim.betas",
         f"must be 2 numbers in [0, 1), got {list(o.betas)}")
    positive("optim.eps", o.eps)
    fraction("optim.momentum", o.momentum, below_one=True)
    at_least("optim.ns_steps", o.ns_steps, 1)
    one_of("optim.ns_dtype", o.ns_dtype, ("auto", *NS_DTYPE_NAMES))
    need(o.ns_triton == "auto" or isinstance(o.ns_triton, bool), "optim.ns_triton",
         f"must be one of auto, true, false, got '{o.ns_triton}'")
    one_of("optim.ns_method", o.ns_method, NS_METHODS)
    need(isinstance(o.ns_gram, bool), "optim.ns_gram", f"must be true or false, got '{o.ns_gram}'")
    non_negative("optim.grad_clip", o.grad_clip, " (0 disables clipping)")
    if o.qk_clip_tau is not None:
        positive("optim.qk_clip_tau", o.qk_clip_tau)
    one_of("optim.schedule", o.schedule, SCHEDULES)
    one_of("optim.offload", o.offload, ("none", "cpu"))
    at_least("optim.warmup_steps", o.warmup_steps, 0)
    fraction("optim.min_lr_ratio", o.min_lr_ratio)
    fraction("optim.decay_fraction", o.decay_fraction)
    one_of("optim.decay_shape", o.decay_shape, DECAY_SHAPES)
    need(o.warmup_steps <= t.steps, "optim.warmup_steps",
         f"{o.warmup_steps} must not exceed train.steps ({t.steps}); lower it for a short run")
    if o.schedule in ("cosine", "linear"):
        need(o.warmup_steps < t.steps, "optim.warmup_steps",
             f"{o.warmup_steps} must be < train.steps ({t.steps}) for the {o.schedule} schedule, which decays after "
             "warmup")
    if o.schedule == "wsd":
        decay = LRSchedule("wsd", t.steps, decay_fraction=o.decay_fraction).decay_steps
        need(o.warmup_steps + decay <= t.steps, "optim.warmup_steps",
             f"{o.warmup_steps} + the wsd decay ({decay} steps = optim.decay_fraction {o.decay_fraction} x "
             f"train.steps {t.steps}) exceed train.steps; lower optim.warmup_steps or optim.decay_fraction")
    # parallel
    for key in ("dp_shard", "ep"):
        value = getattr(cfg.parallel, key)
        need(value == -1 or value >= 1, f"parallel.{key}", f"must be -1 (the rest of the world) or >= 1, got {value}")
    one_of("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, ("none", "selective", "full"))
    one_of("parallel.grad_sync", cfg.parallel.grad_sync, ("step", "micro_batch"))
    at_least("parallel.pp", cfg.parallel.pp, 1)
    one_of("parallel.pp_schedule", cfg.parallel.pp_schedule, tuple(PP_SCHEDULES))
    need(cfg.parallel.pp_virtual_stages == -1 or cfg.parallel.pp_virtual_stages >= 1, "parallel.pp_virtual_stages",
         f"must be -1 (the schedule's default) or >= 1, got {cfg.parallel.pp_virtual_stages}")
    one_of("parallel.reshard_after_forward", str(cfg.parallel.reshard_after_forward).lower(), ("auto", "true", "false"))
    profile = list(t.profile)
    need(not profile or (profile[0] >= 1 and profile == list(range(profile[0], profile[0] + len(profile)))),
         "train.profile", f"must list consecutive steps >= 1 in order (e.g. [10, 11, 12]), got {profile}")
    need(t.pp_microbatches == -1 or t.pp_microbatches >= 1, "train.pp_microbatches",
         f"must be -1 (all of the step's micro-batches) or >= 1, got {t.pp_microbatches}")
    need(not (cfg.parallel.pp > 1 and cfg.model.tie_word_embeddings), "parallel.pp",
         "a pipeline cannot tie the embedding and the LM head (model.tie_word_embeddings): they live on the first "
         "and the last stage")
    at_least("parallel.timeout_minutes", cfg.parallel.timeout_minutes, 1)
    # checkpoint
    at_least("checkpoint.interval", cfg.checkpoint.interval, 0, " (0 = only at the end)")
    at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    need(bool(cfg.checkpoint.resume), "checkpoint.resume", "must be auto, none or a checkpoint path, got an empty "
                                                           "string")
    # logging
    one_of("logging.wandb.mode", lg.wandb.mode, ("online", "offline", "disabled"))
    if lg.peak_tflops is not None:
        positive("logging.peak_tflops", lg.peak_tflops)
    at_least("logging.expert_load_interval", lg.expert_load_interval, 1)
    at_least("logging.spike.window", lg.spike.window, 3)
    positive("logging.spike.threshold", lg.spike.threshold)
    non_negative("logging.spike.min_rel_spread", lg.spike.min_rel_spread)
    at_least("logging.spike.warmup", lg.spike.warmup, 3)


def validate_layout(cfg: ExperimentConfig, world: int) -> ParallelDims:
    """The checks that need the number of ranks (`world`), raising ConfigError naming the key: `parallel.ep`
    and `parallel.dp_shard` against the world and the experts, and the global batch split into `world` ranks
    x whole micro-batches. `python -m launch` runs it before starting anything; the trainer at start-up."""
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model.n_routed_experts)
    t, dp = cfg.train, dims.dp_shard
    if t.global_batch_size % dp or (t.global_batch_size // dp) % t.micro_batch_size:
        step = dp * t.micro_batch_size
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} does not split into {dp} data-parallel "
                          f"rank(s) x whole micro-batches of train.micro_batch_size={t.micro_batch_size}; allowed: a "
                          f"multiple of {step}, or at most {t.global_batch_size // t.micro_batch_size} rank(s)")
    if dims.pp > 1:
        micro_batches = t.global_batch_size // dp // t.micro_batch_size
        per_run = pipeline_microbatches(cfg, dims)
        if micro_batches % per_run:
            raise ConfigError(f"train.pp_microbatches: {per_run} does not divide the step's {micro_batches} "
                              f"micro-batches per data-parallel rank (train.global_batch_size / ({dp} ranks x "
                              f"train.micro_batch_size))")
        v = virtual_stages(cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages)
        if cfg.model.num_hidden_layers < dims.pp * v:
            raise ConfigError(f"parallel.pp: {dims.pp} x {v} virtual stages need at least {dims.pp * v} layers, "
                              f"model.num_hidden_layers is {cfg.model.num_hidden_layers}")
        rounds = max(1, per_run // dims.pp)
        if cfg.parallel.pp_schedule in ("interleaved_1f1b", "interleaved_zb") and per_run % rounds:
            raise ConfigError(f"train.pp_microbatches: {cfg.parallel.pp_schedule} runs {per_run} micro-batches in "
                              f"rounds of parallel.pp={dims.pp} and needs them to split into {rounds} equal rounds; "
                              f"use a multiple of {dims.pp}")
        if cfg.parallel.pp_schedule == "dualpipev" and per_run < 2 * dims.pp:
            raise ConfigError(f"train.pp_microbatches: dualpipev needs at least 2 x parallel.pp = {2 * dims.pp} "
                              f"micro-batches per run, got {per_run}")
    return dims


def pipeline_microbatches(cfg: ExperimentConfig, dims: ParallelDims) -> int:
    """Micro-batches per pipeline run: `train.pp_microbatches`, or all of the step's (-1)."""
    t = cfg.train
    if t.pp_microbatches != -1:
        return t.pp_microbatches
    return t.global_batch_size // dims.dp_shard // t.micro_batch_size


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


__all__ = ["ConfigError", "ExperimentConfig", "ListConfig", "from_dict", "load_config", "to_dict", "to_yaml",
           "validate", "validate_layout"]
