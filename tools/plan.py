"""Size a run before launching it: parameters, FLOPs per token and per-GPU memory, with no memory spent.

    python -m tools.plan --config configs/k2-1t.yaml [--seq-len 4096] [--gpus 2048 --ep 64]
                         [--optimizer adamw|muon] [--param-dtype fp32] [--micro-batch 1] [--global-batch N]
                         [--activation-checkpointing none|selective|full] [--expert-load FILE] [--mfu 0.4]
                         [--json] [model.key=value ...]

Besides the counts below, it prints what a layout costs: activation memory per micro-batch under each
recompute policy (tools/plan_activations.py), all-to-all traffic under balanced and skewed expert load, FSDP
traffic, Newton-Schulz FLOPs and a step-time estimate on H100 / H200 (tools/plan_comms.py), and whether the
run fits in their memory (tools/plan_layout.py).

The model is built on the meta device, so even the 1T-parameter Kimi K2 plans in a few seconds and the
parameter counts are those of the real `Transformer` (they match `transformers`' DeepseekV3ForCausalLM).
FLOPs come from models/flops.py, the count the trainer's MFU uses (this module is a tool: nothing outside
tools/ imports it).

Library API::

    count_params(model_or_cfg) -> ParamCount           # total / activated per token / breakdown
    flops_per_token(cfg, seq_len, training=True) -> int   # re-exported from models.flops
    memory_per_gpu(model_or_cfg, Layout(gpus=2048, ep=64)) -> MemoryEstimate

FLOPs convention: see models/flops.py (2 FLOPs per multiply-add, matmuls only, causal-aware attention,
training = 3 x forward).

The planner reads only what it needs from the experiment YAML (the `model:` group, data.seq_len,
optim.name, parallel.ep), not train/config.py's full schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from models.config import ConfigError, ModelConfig
from models.flops import flops_breakdown, flops_per_token
from models.transformer import Transformer
from parallel.dims import SCHEDULES, virtual_stages
from tools.plan_activations import POLICIES
from tools.plan_comms import DEFAULT_PROFILE, Hardware, load_expert_profile
from tools.plan_layout import Batch, layout_sections
from tools.plan_pipeline import heaviest_pipeline_rank, offload_section, pipeline_section
from tools.plan_text import CATEGORIES, FLOP_LABELS, format_plan  # noqa: F401  (re-exported)

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
OPTIMIZERS: tuple[str, ...] = ("adamw", "muon")
DEFAULT_SEQ_LEN = 4096

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PlanError(ValueError):
    """A layout or planning input is wrong; the message says which and how to fix it."""


# --- parameters -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. `activated` is what one token uses: all dense parameters plus, in every MoE layer,
    num_experts_per_tok / n_routed_experts of the stacked routed experts (the published "activated")."""

    total: int
    activated: int
    breakdown: dict[str, int]  # category -> parameters (sums to total)
    activated_breakdown: dict[str, int]  # category -> activated parameters (sums to activated)

    @property
    def routed_experts(self) -> int:
        return self.breakdown.get("routed_experts", 0)


def param_category(name: str) -> str:
    """Category of a parameter from its name; works for Chogori's names and for `transformers`' (which add
    a `model.` prefix and fuse experts as `mlp.experts.gate_up_proj`)."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    if "embed_tokens" in parts:
        return "embedding"
    if "lm_head" in parts:
        return "lm_head"
    if "norm" in leaf:  # input_layernorm, post_attention_layernorm, q_a/kv_a_layernorm, final norm
        return "norms"
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        if "experts" in parts:
            return "routed_experts"
        if "shared_experts" in parts:
            return "shared_experts"
        if "gate" in parts:
            return "router"
        return "dense_ffn"
    return "other"


def _routing(model: nn.Module) -> tuple[int, int]:
    """(n_routed_experts, num_experts_per_tok) of a Chogori `Transformer` or a `transformers` model."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    try:
        return int(cfg.n_routed_experts), int(cfg.num_experts_per_tok)
    except (AttributeError, TypeError) as e:
        raise PlanError(f"{type(model).__name__} has no .cfg/.config with n_routed_experts and "
                        "num_experts_per_tok; pass a ModelConfig or a Transformer") from e


def meta_model(cfg: ModelConfig) -> Transformer:
    """The real network on the meta device: shapes without storage, so a 1T model costs nothing."""
    with torch.device("meta"):
        return Transformer(cfg)


def count_params(model_or_cfg: nn.Module | ModelConfig) -> ParamCount:
    """Total and activated-per-token parameters of a model (or of the model a config builds, on meta).

    Counted from the module's parameters (buffers such as the router correction bias are not parameters;
    tied weights count once). Routed expert tensors are stacked with the expert dim first, so the activated
    share of each is exactly numel * k / E."""
    model = meta_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    n_experts, k = _routing(model)
    total = dict.fromkeys(CATEGORIES, 0)
    active = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():
        cat = param_category(name)
        n = p.numel()
        total[cat] = total.get(cat, 0) + n
        if cat == "routed_experts":
            if n % n_experts:
                raise PlanError(f"routed expert tensor {name} {tuple(p.shape)} is not stacked over "
                                f"{n_experts} experts")
            n = n // n_experts * k
        active[cat] = active.get(cat, 0) + n
    return ParamCount(total=sum(total.values()), activated=sum(active.values()), breakdown=total,
                      activated_breakdown=active)


# --- FLOPs (the exact count is models/flops.py's; this is the back-of-envelope cross-check) ---------
def approx_flops_per_token(cfg: ModelConfig, params: ParamCount, seq_len: int) -> dict[str, int]:
    """The usual back-of-envelope training FLOPs, for comparison with the exact count:
    `6N` = 6 * activated parameters, and `6N+attn` = 6 * activated matmul parameters (no embedding lookup)
    + 6 * layers * h * (d_qk + d_v) * S (PaLM style: full S keys, no causal discount)."""
    matmul = params.activated - params.breakdown["embedding"]
    if cfg.tie_word_embeddings:
        matmul += cfg.vocab_size * cfg.hidden_size  # the tied weight is still the LM head's matmul
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return {"6N": 6 * params.activated, "6N+attn": 6 * matmul + attn}


# --- memory -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A parallel layout and storage dtypes. Routed experts: expert parallel over `ep` ranks (each holds
    n_routed_experts/ep whole experts), then FSDP over the gpus/ep ranks that hold the same experts.
    Everything else: FSDP over all `gpus` ranks."""

    gpus: int = 1
    ep: int = 1
    optimizer: str = "adamw"
    param_dtype: str = "fp32"  # master weights
    grad_dtype: str = "fp32"
    optim_dtype: str = "fp32"  # optimizer states (AdamW: 2, Muon: 1 for matrices, 2 for the AdamW rest)
    compute_dtype: str = "bf16"  # dtype of the all-gathered weights the forward runs on
    pp: int = 1  # pipeline stages (outermost: each stage has gpus / pp data-parallel ranks)
    pp_schedule: str = "1f1b"
    pp_virtual: int = -1  # stages per rank; -1 = the schedule's default
    offload: str = "none"  # cpu: weights, grads and optimizer states sharded in host memory (optim.offload)

    def validate(self, cfg: ModelConfig) -> None:
        """Raise PlanError naming the flag and the fix for a layout that cannot be built."""
        if self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {self.gpus}")
        if self.ep < 1:
            raise PlanError(f"--ep must be >= 1, got {self.ep}")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        for flag in ("param_dtype", "grad_dtype", "optim_dtype", "compute_dtype"):
            if getattr(self, flag) not in DTYPE_BYTES:
                raise PlanError(f"--{flag.replace('_', '-')} must be one of {', '.join(DTYPE_BYTES)}, "
                                f"got '{getattr(self, flag)}'")
        if self.offload not in ("none", "cpu"):
            raise PlanError(f"--offload must be none or cpu, got '{self.offload}'")
        if self.pp < 1 or self.gpus % self.pp:
            raise PlanError(f"--pp {self.pp} must be >= 1 and divide --gpus {self.gpus}")
        if self.pp > 1:
            try:
                v = virtual_stages(self.pp_schedule, self.pp_virtual)
            except ConfigError as e:
                raise PlanError(str(e).replace("parallel.pp_schedule", "--pp-schedule")
                                .replace("parallel.pp_virtual_stages", "--pp-virtual")) from e
            if cfg.num_hidden_layers < self.pp * v:
                raise PlanError(f"--pp {self.pp} x {v} virtual stages need at least {self.pp * v} layers, the model "
                                f"has {cfg.num_hidden_layers}")
        if self.ep == 1:
            return
        if cfg.num_moe_layers == 0:
            raise PlanError(f"--ep {self.ep} needs MoE layers, but this model has none; use --ep 1")
        e = cfg.n_routed_experts
        dp = self.gpus // self.pp
        valid = [d for d in range(1, math.gcd(dp, e) + 1) if dp % d == 0 and e % d == 0]
        hint = f"; --ep values that fit --gpus {self.gpus} and {e} experts: {', '.join(map(str, valid))}"
        if (self.gpus // self.pp) % self.ep:
            ranks = f"--gpus {self.gpus}" + (f" / --pp {self.pp}" if self.pp > 1 else "")
            raise PlanError(f"{ranks} is not divisible by --ep {self.ep}: expert parallelism splits "
                            f"{'each stage' + chr(39) + 's' if self.pp > 1 else 'the'} ranks into groups of ep{hint}")
        if e % self.ep:
            raise PlanError(f"n_routed_experts={e} is not divisible by --ep {self.ep}: every EP rank must "
                            f"hold the same number of whole experts{hint}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of the sharded training state (weights, gradients, optimizer states)."""

    params_per_gpu: float  # parameters held by one GPU (fractional: even sharding)
    weights: float
    grads: float
    optimizer: float
    largest_unit_gathered: float  # transient: one FSDP unit all-gathered in compute dtype (not in total)
    largest_unit: str
    experts_per_rank: int
    expert_fsdp: int  # ranks an expert shard is FSDP-split over (gpus / ep)
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def _is_muon_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon takes the 2-D to 4-D weights (matrices and expert stacks) inside the blocks; embeddings, LM head and
    vectors stay on AdamW (the same split optim/ uses)."""
    cat = param_category(name)
    return cat not in ("embedding", "lm_head") and p.ndim in (2, 3, 4)


def memory_per_gpu(model_or_cfg: Transformer | ModelConfig, layout: Layout,
                   seq_len: int = DEFAULT_SEQ_LEN) -> MemoryEstimate:
    """Per-GPU memory of weights, gradients and optimizer states under `layout`, plus the largest
    transient all-gather. Assumes even sharding (FSDP2 pads each tensor's sharded dim to a multiple of the
    shard count; negligible when experts are sharded on a dim that divides, e.g. Shard(1)). Under a pipeline:
    a GPU of the pipeline rank holding the most parameters (its stages' layers, split as the trainer splits them
    at `seq_len`), sharded over the gpus / pp ranks of a stage."""
    model = meta_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    cfg: ModelConfig = model.cfg
    layout.validate(cfg)
    n, ep = layout.gpus // layout.pp, layout.ep
    on_rank = heaviest_pipeline_rank(model, cfg, layout, seq_len)
    state_slots = {"adamw": (2, 2), "muon": (1, 2)}[layout.optimizer]  # (matrix, other) states per param

    held = 0.0  # parameters on one GPU
    state_params = 0.0  # parameter-states on one GPU (params x states)
    units: dict[str, float] = {}  # FSDP unit -> parameters it all-gathers on one GPU
    for name, p in model.named_parameters():
        if not on_rank(name):
            continue
        numel = p.numel()
        expert = param_category(name) == "routed_experts"
        # Experts: 1/ep of them by EP, then 1/(n/ep) by FSDP -> numel/n; dense: numel/n by FSDP.
        share = numel / n
        held += share
        muon = layout.optimizer == "muon" and _is_muon_matrix(name, p)
        state_params += share * state_slots[0 if muon else 1]
        m = _LAYER.search(name)
        unit = f"layers.{m.group(1)}" if m else name.split(".")[0]
        units[unit] = units.get(unit, 0.0) + (numel / ep if expert else numel)

    largest = max(units, key=units.__getitem__)
    b = DTYPE_BYTES
    stage = (f"the pipeline rank with the most parameters (pp={layout.pp}, {layout.pp_schedule}); "
             if layout.pp > 1 else "")
    assumptions = [
        f"{stage}weights, grads and optimizer states fully sharded (FSDP / ZeRO-3); dense params over all "
        f"{n} ranks{' of a stage' if layout.pp > 1 else ''}, routed experts over ep={ep} (whole experts) x "
        f"fsdp={n // ep}",
        "even sharding: FSDP2's per-tensor dim padding ignored",
        f"optimizer {layout.optimizer}: "
        + ("AdamW 2 states for every param" if layout.optimizer == "adamw"
           else "Muon 1 momentum for block matrices; AdamW 2 states for embedding, LM head, norms"),
        "not included: activations (below), transient all-gather/reduce-scatter buffers (largest shown apart), "
        "Muon's gathered matrices for Newton-Schulz, all-to-all buffers, CUDA context, fragmentation",
    ]
    return MemoryEstimate(
        params_per_gpu=held,
        weights=held * b[layout.param_dtype],
        grads=held * b[layout.grad_dtype],
        optimizer=state_params * b[layout.optim_dtype],
        largest_unit_gathered=units[largest] * b[layout.compute_dtype],
        largest_unit=largest,
        experts_per_rank=cfg.n_routed_experts // ep if cfg.num_moe_layers else 0,
        expert_fsdp=n // ep,
        assumptions=assumptions,
    )


# --- config loading ---------------------------------------------------------------------------------
@dataclass
class PlanInput:
    """What the planner reads from an experiment YAML (the `model:` group and a few defaults)."""

    cfg: ModelConfig
    seq_len: int | None  # data.seq_len, if set
    optimizer: str | None  # optim.name, if it is one the planner knows
    ep: int | None  # parallel.ep, if set
    micro_batch: int | None = None  # train.micro_batch_size
    global_batch: int | None = None  # train.global_batch_size
    activation_checkpointing: str | None = None  # parallel.activation_checkpointing
    grad_sync: str | None = None  # parallel.grad_sync
    ns_steps: int | None = None  # optim.ns_steps
    pp: int | None = None  # parallel.pp
    pp_schedule: str | None = None  # parallel.pp_schedule
    pp_virtual: int | None = None  # parallel.pp_virtual_stages
    offload: str | None = None  # optim.offload


def load_plan_input(path: str | Path, overrides: list[str] | None = None) -> PlanInput:
    """Read the `model:` group (and data.seq_len, optim.name, parallel.ep) of an experiment YAML.
    `overrides` are OmegaConf dotlist entries such as `model.num_hidden_layers=30`."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"config file not found: {path}")
    conf = OmegaConf.load(path)
    if overrides:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
    if "model" not in conf:
        raise PlanError(f"{path} has no 'model:' group")
    cfg = ModelConfig.from_dict(OmegaConf.to_container(conf.model, resolve=True))
    seq_len = OmegaConf.select(conf, "data.seq_len")
    opt = OmegaConf.select(conf, "optim.name")
    ep = OmegaConf.select(conf, "parallel.ep")
    opt = str(opt).lower() if opt is not None else None

    def opt_int(key: str) -> int | None:
        value = OmegaConf.select(conf, key)
        return int(value) if value is not None else None

    def opt_str(key: str) -> str | None:
        value = OmegaConf.select(conf, key)
        return str(value) if value is not None else None

    return PlanInput(cfg=cfg, seq_len=int(seq_len) if seq_len is not None else None,
                     optimizer=opt if opt in OPTIMIZERS else None, ep=int(ep) if ep is not None else None,
                     micro_batch=opt_int("train.micro_batch_size"), global_batch=opt_int("train.global_batch_size"),
                     activation_checkpointing=opt_str("parallel.activation_checkpointing"),
                     grad_sync=opt_str("parallel.grad_sync"), ns_steps=opt_int("optim.ns_steps"),
                     pp=opt_int("parallel.pp"), pp_schedule=opt_str("parallel.pp_schedule"),
                     pp_virtual=opt_int("parallel.pp_virtual_stages"), offload=opt_str("optim.offload"))


def validate_batch(batch: Batch, layout: Layout, hw: Hardware) -> None:
    """Raise PlanError for a batch or node layout the trainer (or the cluster model) cannot run."""
    if batch.micro_batch < 1:
        raise PlanError(f"--micro-batch must be >= 1, got {batch.micro_batch}")
    if batch.activation_checkpointing not in POLICIES:
        raise PlanError(f"--activation-checkpointing must be one of {', '.join(POLICIES)}, "
                        f"got '{batch.activation_checkpointing}'")
    if batch.grad_sync not in ("step", "micro_batch"):
        raise PlanError(f"--grad-sync must be step or micro_batch, got '{batch.grad_sync}'")
    dp = layout.gpus // layout.pp
    gb, step = batch.global_batch, dp * batch.micro_batch
    if gb is not None and (gb < 1 or gb % step):
        ranks = "--gpus / --pp" if layout.pp > 1 else "--gpus"
        raise PlanError(f"global batch {gb} is not a multiple of {ranks} x --micro-batch = {dp} x "
                        f"{batch.micro_batch} = {step}: every rank runs whole micro-batches (set --global-batch)")
    if layout.pp > 1 and layout.pp_schedule == "dualpipev":
        micro = (gb or step) // step
        if micro < 2 * layout.pp:
            raise PlanError(f"dualpipev needs at least 2 x --pp = {2 * layout.pp} micro-batches per step, the batch "
                            f"gives {micro} (raise --global-batch)")
    g = hw.gpus_per_node
    if layout.gpus > g and layout.gpus % g:
        raise PlanError(f"--gpus {layout.gpus} spans more than one node of {g} GPUs but is not a multiple of "
                        f"{g} (--gpus-per-node); use whole nodes")
    if not 0 < hw.mfu <= 1:
        raise PlanError(f"--mfu must lie in (0, 1], got {hw.mfu}")


# --- the plan ---------------------------------------------------------------------------------------
def make_plan(cfg: ModelConfig, seq_len: int, layout: Layout, *, source: str = "", batch: Batch | None = None,
              hardware: Hardware | None = None, expert_load: str | Path | None = None) -> dict[str, Any]:
    """Everything the CLI prints, as a JSON-ready dict. `expert_load`: a metrics.jsonl or JSON list of per-expert
    shares for the skewed all-to-all (default: tools/expert_load_tiny.json, measured on a tiny run)."""
    if seq_len < 1:
        raise PlanError(f"--seq-len must be >= 1, got {seq_len}")
    layout.validate(cfg)
    batch = batch or Batch()
    hardware = hardware or Hardware()
    validate_batch(batch, layout, hardware)
    profile_path = Path(expert_load) if expert_load is not None else DEFAULT_PROFILE
    try:
        profile = load_expert_profile(profile_path) if cfg.num_moe_layers and layout.ep > 1 else None
    except ValueError as e:
        raise PlanError(str(e)) from e
    model = meta_model(cfg)
    params = count_params(model)
    fwd = flops_breakdown(cfg, seq_len, causal=True)
    fwd_total = sum(fwd.values())
    train = 3 * fwd_total
    approx = approx_flops_per_token(cfg, params, seq_len)
    mem = memory_per_gpu(model, layout, seq_len)
    gib = 2.0**30
    plan: dict[str, Any] = {
        "config": source,
        "seq_len": seq_len,
        "params": {"total": params.total, "activated": params.activated, "breakdown": params.breakdown,
                   "activated_breakdown": params.activated_breakdown},
        "flops_per_token": {
            "convention": "2 FLOPs per multiply-add, matmuls only; causal attention: mean (S+1)/2 keys per "
                          "query; training = 3 x forward",
            "forward_breakdown": fwd,
            "forward": fwd_total,
            "training": train,
            "training_noncausal": flops_per_token(cfg, seq_len, training=True, causal=False),
            "approx_6N": approx["6N"],
            "approx_6N_plus_attention": approx["6N+attn"],
        },
        "layout": asdict(layout),
        "memory": {
            "params_per_gpu": mem.params_per_gpu,
            "experts_per_rank": mem.experts_per_rank,
            "expert_fsdp": mem.expert_fsdp,
            "bytes_per_gpu": {"weights": mem.weights, "grads": mem.grads, "optimizer": mem.optimizer,
                              "total": mem.total},
            "gib_per_gpu": {"weights": mem.weights / gib, "grads": mem.grads / gib,
                            "optimizer": mem.optimizer / gib, "total": mem.total / gib},
            "largest_unit": mem.largest_unit,
            "largest_unit_gathered_bytes": mem.largest_unit_gathered,
            "largest_unit_gathered_gib": mem.largest_unit_gathered / gib,
            "assumptions": mem.assumptions,
        },
    }
    source_note = (f"{profile_path.name}" + (" (measured on a tiny run; see its note)"
                                              if profile_path == DEFAULT_PROFILE else ""))
    if layout.pp > 1:
        dp = layout.gpus // layout.pp
        micro = (batch.global_batch or dp * batch.micro_batch) // dp // batch.micro_batch
        try:
            plan["pipeline"] = pipeline_section(model, cfg, seq_len, layout, batch.micro_batch, micro,
                                                batch.activation_checkpointing, DTYPE_BYTES[layout.compute_dtype],
                                                mem.total / mem.params_per_gpu, param_category)
        except ValueError as e:
            raise PlanError(f"--pp-schedule {layout.pp_schedule} with {micro} micro-batches per step: {e}") from e
    plan.update(layout_sections(model, cfg, seq_len, layout, batch, hardware, profile, source_note,
                                param_category, _is_muon_matrix, mem.total, mem.largest_unit_gathered,
                                plan.get("pipeline")))
    plan["offload"] = offload_section(plan["fit"], layout, hardware)
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--simulate" in argv:  # run the layout's step for real, as one rank of it (tools/simulate.py)
        from tools.simulate import main as simulate_main

        argv.remove("--simulate")
        return simulate_main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m tools.plan",
        description="Count parameters, FLOPs per token and per-GPU memory of a model config, on the meta "
                    "device (nothing is allocated).")
    parser.add_argument("--config", required=True, help="experiment YAML with a 'model:' group")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="sequence length for attention FLOPs "
                             f"(default: data.seq_len, else {DEFAULT_SEQ_LEN})")
    parser.add_argument("--gpus", type=int, default=1, help="world size (default 1)")
    parser.add_argument("--ep", type=int, default=None,
                        help="expert-parallel degree (default: the config's parallel.ep when it divides "
                             "--gpus and n_routed_experts, else 1)")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline stages (default: the config's parallel.pp when it divides --gpus, else 1)")
    parser.add_argument("--pp-schedule", choices=list(SCHEDULES), default=None,
                        help="pipeline schedule (default: the config's parallel.pp_schedule, else 1f1b)")
    parser.add_argument("--pp-virtual", type=int, default=None,
                        help="stages per pipeline rank (default: the config's parallel.pp_virtual_stages, else the "
                             "schedule's)")
    parser.add_argument("--offload", choices=("none", "cpu"), default=None,
                        help="keep weights, gradients and optimizer states in host memory (default: the config's "
                             "optim.offload, else none)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="optimizer state layout (default: the config's optim.name, else adamw)")
    for flag, default, what in (("param-dtype", "fp32", "master weights"),
                                ("grad-dtype", "fp32", "gradients"),
                                ("optim-dtype", "fp32", "optimizer states"),
                                ("compute-dtype", "bf16", "gathered weights for compute")):
        parser.add_argument(f"--{flag}", choices=list(DTYPE_BYTES), default=default,
                            help=f"dtype of {what} (default {default})")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward per rank (default: train.micro_batch_size, else 1)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per optimizer step, all ranks (default: train.global_batch_size, else one "
                             "micro-batch per rank)")
    parser.add_argument("--activation-checkpointing", choices=POLICIES, default=None,
                        help="recompute policy the fit and step time use (default: the config's, else "
                             "selective); activation memory is printed for all three")
    parser.add_argument("--grad-sync", choices=("step", "micro_batch"), default=None,
                        help="FSDP gradient reduce-scatter once per step or per micro-batch (default: the "
                             "config's parallel.grad_sync, else step)")
    parser.add_argument("--expert-load", default=None, metavar="FILE",
                        help="per-expert load shares for the skewed all-to-all: a trainer metrics.jsonl or a JSON "
                             f"list of shares (default: {DEFAULT_PROFILE.name}, measured on a tiny run)")
    parser.add_argument("--mfu", type=float, default=Hardware.mfu,
                        help=f"assumed fraction of the 989 TFLOP/s peak the matmuls reach (default {Hardware.mfu})")
    parser.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node,
                        help=f"GPUs sharing NVLink (default {Hardware.gpus_per_node})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--simulate", action="store_true",
                        help="instead of estimating, run one training step of this layout as one rank of a "
                             "simulated world (python -m tools.simulate; takes --config --gpus --ep --rank "
                             "--layers --seq-len --ns-steps --json)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf overrides, e.g. model.num_hidden_layers=30")
    args = parser.parse_args(argv)

    def given(flag: int | None, config: int | None, default: int | None) -> int | None:
        return flag if flag is not None else config if config is not None else default

    try:
        inp = load_plan_input(args.config, args.overrides)
        seq_len = args.seq_len or inp.seq_len or DEFAULT_SEQ_LEN
        pp = args.pp
        if pp is None:
            pp = inp.pp if inp.pp and args.gpus % inp.pp == 0 else 1
        ep = args.ep
        if ep is None:
            dp = args.gpus // pp
            fits = inp.ep and dp % inp.ep == 0 and inp.cfg.n_routed_experts % inp.ep == 0
            ep = inp.ep if fits else 1
        layout = Layout(gpus=args.gpus, ep=ep, optimizer=args.optimizer or inp.optimizer or "adamw",
                        param_dtype=args.param_dtype, grad_dtype=args.grad_dtype,
                        optim_dtype=args.optim_dtype, compute_dtype=args.compute_dtype, pp=pp,
                        pp_schedule=args.pp_schedule or inp.pp_schedule or "1f1b",
                        pp_virtual=given(args.pp_virtual, inp.pp_virtual, -1),
                        offload=args.offload or inp.offload or "none")
        batch = Batch(micro_batch=given(args.micro_batch, inp.micro_batch, 1),
                      global_batch=given(args.global_batch, inp.global_batch, None),
                      activation_checkpointing=args.activation_checkpointing or inp.activation_checkpointing
                      or "selective",
                      grad_sync=args.grad_sync or inp.grad_sync or "step", ns_steps=inp.ns_steps or 5)
        step = args.gpus // pp * batch.micro_batch
        if args.global_batch is None and batch.global_batch and step > 0 and batch.global_batch % step:
            # the config's batch was sized for another layout (e.g. DeepSeek-V3's 15360 with pipeline stages):
            # plan the nearest whole number of micro-batches per rank, and say so
            fitted = max(1, int(batch.global_batch / step + 0.5)) * step
            batch = dataclasses.replace(batch, global_batch=fitted, note=(
                f"train.global_batch_size={batch.global_batch} is not a multiple of --gpus"
                f"{' / --pp' if pp > 1 else ''} x --micro-batch = {step}; planned with {fitted} (set --global-batch "
                "to choose)"))
        if args.gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        hardware = Hardware(mfu=args.mfu, gpus_per_node=args.gpus_per_node)
        plan = make_plan(inp.cfg, seq_len, layout, source=str(args.config), batch=batch, hardware=hardware,
                         expert_load=args.expert_load)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
