"""Tests for optim/: parameter grouping, the optimizer registry / AdamW builder, and LR schedules."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from optim import (
    GROUP_KINDS,
    LRSchedule,
    build_lr_scheduler,
    build_optimizer,
    canonical_name,
    describe_groups,
    register_optimizer,
    registered_optimizers,
    split_params,
)
from optim import builder as builder_mod

H, E, V = 8, 4, 32  # hidden, routed experts, vocab

# --------------------------------------------------------------------------------------------------
# A tiny module tree with the DeepSeek-V3 / transformers parameter names.


class Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, q_lora: bool, o_bias: bool = False) -> None:
        super().__init__()
        if q_lora:
            self.q_a_proj = nn.Linear(H, 6, bias=False)
            self.q_a_layernorm = Norm(6)
            self.q_b_proj = nn.Linear(6, 12, bias=False)
        else:
            self.q_proj = nn.Linear(H, 12, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, 5, bias=False)
        self.kv_a_layernorm = Norm(4)
        self.kv_b_proj = nn.Linear(4, 16, bias=False)
        self.o_proj = nn.Linear(8, H, bias=o_bias)


class MLP(nn.Module):
    def __init__(self, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H))
        self.register_buffer("e_score_correction_bias", torch.zeros(E))


class Experts(nn.Module):
    """Stacked routed experts without a ``.weight`` suffix: [E, 2, out, in] (gate and up) and [E, out, in]."""

    def __init__(self, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2, inter, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, inter))


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Router()
        self.experts = Experts(3)
        self.shared_experts = MLP(3)


class Layer(nn.Module):
    def __init__(self, moe: bool, q_lora: bool, o_bias: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(q_lora, o_bias)
        self.mlp = MoE() if moe else MLP(16)
        self.input_layernorm = Norm(H)
        self.post_attention_layernorm = Norm(H)


class CheckpointWrapper(nn.Module):
    """Stands in for torch's activation checkpoint wrapper (same attribute name)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._checkpoint_wrapped_module = inner


class Model(nn.Module):
    def __init__(self, wrap_layer: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        layers = [Layer(moe=False, q_lora=False), Layer(moe=True, q_lora=True, o_bias=True)]
        if wrap_layer:
            layers[1] = CheckpointWrapper(layers[1])
        self.layers = nn.ModuleList(layers)
        self.norm = Norm(H)
        self.lm_head = nn.Linear(H, V, bias=False)


class Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule (same attribute name)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


EXPECTED = {
    "embed_tokens.weight": "embedding",
    "lm_head.weight": "embedding",
    "norm.weight": "vector",
    **{
        f"layers.0.{suffix}": kind
        for suffix, kind in {
            "self_attn.q_proj.weight": "matrix",
            "self_attn.kv_a_proj_with_mqa.weight": "matrix",
            "self_attn.kv_a_layernorm.weight": "vector",
            "self_attn.kv_b_proj.weight": "matrix",
            "self_attn.o_proj.weight": "matrix",
            "mlp.gate_proj.weight": "matrix",
            "mlp.up_proj.weight": "matrix",
            "mlp.down_proj.weight": "matrix",
            "input_layernorm.weight": "vector",
            "post_attention_layernorm.weight": "vector",
        }.items()
    },
    **{
        f"layers.1.{suffix}": kind
        for suffix, kind in {
            "self_attn.q_a_proj.weight": "matrix",
            "self_attn.q_a_layernorm.weight": "vector",
            "self_attn.q_b_proj.weight": "matrix",
            "self_attn.kv_a_proj_with_mqa.weight": "matrix",
            "self_attn.kv_a_layernorm.weight": "vector",
            "self_attn.kv_b_proj.weight": "matrix",
            "self_attn.o_proj.weight": "matrix",
            "self_attn.o_proj.bias": "vector",
            "mlp.gate.weight": "matrix",
            "mlp.experts.gate_up_proj": "matrix",
            "mlp.experts.down_proj": "matrix",
            "mlp.shared_experts.gate_proj.weight": "matrix",
            "mlp.shared_experts.up_proj.weight": "matrix",
            "mlp.shared_experts.down_proj.weight": "matrix",
            "input_layernorm.weight": "vector",
            "post_attention_layernorm.weight": "vector",
        }.items()
    },
}


def _kinds_by_name(groups: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, named in groups.items():
        for name, _ in named:
            assert name not in out, f"{name} listed twice"
            out[name] = kind
    return out


def _assert_each_param_once(model: nn.Module, groups: dict) -> None:
    grouped = [id(p) for named in groups.values() for _, p in named]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(trainable)


# --------------------------------------------------------------------------------------------------
# Grouping


def test_split_params_plain_names() -> None:
    model = Model()
    groups = split_params(model)
    assert tuple(groups) == GROUP_KINDS
    assert _kinds_by_name(groups) == EXPECTED
    _assert_each_param_once(model, groups)
    assert {p.ndim for _, p in groups["matrix"]} == {2, 3, 4}


def test_split_params_wrapped_names() -> None:
    model = Compiled(Model(wrap_layer=True))
    groups = split_params(model)
    names = _kinds_by_name(groups)
    assert any(n.startswith("_orig_mod.") for n in names)
    assert any("._checkpoint_wrapped_module." in n for n in names)
    # Groups keep the real names (for state dicts); their canonical form matches the bare model.
    assert {canonical_name(n): k for n, k in names.items()} == EXPECTED
    _assert_each_param_once(model, groups)


def test_split_params_skips_frozen_and_lists_tied_once() -> None:
    model = Model()
    model.lm_head.weight = model.embed_tokens.weight  # tied embeddings
    model.layers[0].input_layernorm.weight.requires_grad_(False)
    groups = split_params(model)
    names = _kinds_by_name(groups)
    assert "layers.0.input_layernorm.weight" not in names
    assert "lm_head.weight" not in names and names["embed_tokens.weight"] == "embedding"
    _assert_each_param_once(model, groups)


def test_split_params_matches_components_not_substrings() -> None:
    model = nn.Module()
    model.my_embed_tokens = nn.Linear(H, H, bias=False)  # not the token embedding
    model.embed_tokens = nn.Embedding(V, H)
    names = _kinds_by_name(split_params(model))
    assert names == {"my_embed_tokens.weight": "matrix", "embed_tokens.weight": "embedding"}


def test_describe_groups_counts() -> None:
    model = Model()
    groups = split_params(model)
    table = describe_groups(groups)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "tensors", "params"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    for kind, named in groups.items():
        assert rows[kind] == [str(len(named)), f"{sum(p.numel() for _, p in named):,}"]
    total = sum(p.numel() for p in model.parameters())
    assert rows["total"] == [str(len(EXPECTED)), f"{total:,}"]


# --------------------------------------------------------------------------------------------------
# Optimizer builder


def _cfg(**overrides):
    cfg = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "fused": None}
    cfg.update(overrides)
    return cfg


def test_build_adamw_groups_and_weight_decay() -> None:
    model = Model()
    opt = build_optimizer(model, OmegaConf.create(_cfg(weight_decay=0.05)))  # OmegaConf node works too
    assert isinstance(opt, torch.optim.AdamW)
    by_kind = {g["group"]: g for g in opt.param_groups}
    assert set(by_kind) == set(GROUP_KINDS)
    assert by_kind["matrix"]["weight_decay"] == 0.05
    assert by_kind["embedding"]["weight_decay"] == 0.05
    assert by_kind["vector"]["weight_decay"] == 0.0
    groups = split_params(model)
    for kind, named in groups.items():
        assert [id(p) for p in by_kind[kind]["params"]] == [id(p) for _, p in named]
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8
    assert not opt.defaults["fused"]  # auto: CPU parameters -> the reference loop


def test_build_adamw_fused_flag_and_defaults() -> None:
    model = Model()
    assert build_optimizer(model, _cfg(fused=True)).defaults["fused"] is True
    opt = build_optimizer(model, {"lr": 1e-3})  # everything else from the defaults
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1


def test_empty_groups_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(H, H, bias=False))
    opt = build_optimizer(model, _cfg())
    assert [g["group"] for g in opt.param_groups] == ["matrix"]


def test_unknown_optimizer_name_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer name 'lion'.*adamw"):
        build_optimizer(Model(), _cfg(name="lion"))


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", 0.0), ("lr", "fast"), ("weight_decay", -0.1), ("betas", [0.9]), ("betas", [0.9, 1.0]),
     ("eps", 0.0), ("fused", "yes")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        build_optimizer(Model(), _cfg(**{key: value}))


def test_missing_lr_is_an_error() -> None:
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(Model(), {"name": "adamw"})


def test_register_optimizer_plugs_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered optimizer builds, and the config check (torch-free `optim.choices`) accepts its name."""
    import optim.choices as choices
    from train.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

    monkeypatch.setattr(builder_mod, "_REGISTRY", dict(builder_mod._REGISTRY))
    monkeypatch.setattr(choices, "_optimizer_names", set(choices._optimizer_names))
    assert registered_optimizers() == choices.optimizer_names() == sorted(choices.BUILTIN_OPTIMIZERS)
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(tiny, ["optim.name=sgdtest"])
    seen = {}

    def sgd_factory(model, groups, cfg):
        seen["groups"] = groups
        return torch.optim.SGD([p for named in groups.values() for _, p in named], lr=cfg["lr"])

    register_optimizer("SGDTest", sgd_factory)
    assert registered_optimizers() == choices.optimizer_names() == ["adamw", "muon", "sgdtest"]
    assert load_config(tiny, ["optim.name=sgdtest"]).optim.name == "sgdtest"
    model = Model()
    opt = build_optimizer(model, _cfg(name="sgdtest"))
    assert isinstance(opt, torch.optim.SGD)
    assert _kinds_by_name(seen["groups"]) == EXPECTED
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("sgdtest", sgd_factory)
    register_optimizer("sgdtest", sgd_factory, overwrite=True)


def test_adamw_step_is_bitwise_torch_adamw() -> None:
    torch.manual_seed(0)
    model = Model()
    ref_model = copy.deepcopy(model)
    hp = {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6}
    opt = build_optimizer(model, _cfg(weight_decay=0.2, **hp))
    groups = split_params(ref_model)
    ref = torch.optim.AdamW(
        [
            {"params": [p for _, p in groups["matrix"] + groups["embedding"]], "weight_decay": 0.2},
            {"params": [p for _, p in groups["vector"]], "weight_decay": 0.0},
        ],
        **hp,
    )
    for _ in range(3):
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(model.norm.weight, torch.ones(H))  # the step did move the weights


# --------------------------------------------------------------------------------------------------
# LR schedules


def test_warmup_is_linear_and_ends_at_peak() -> None:
    for name in ("wsd", "cosine", "linear", "constant"):
        s = LRSchedule(name, total_steps=100, warmup_steps=4)
        assert [s(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert LRSchedule("cosine", total_steps=100, warmup_steps=0)(0) == 1.0


def test_wsd_stable_then_decays_to_min() -> None:
    s = LRSchedule("wsd", total_steps=1000, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert s.decay_start == 800 and s.decay_steps == 200
    assert all(s(i) == 1.0 for i in range(10, 801))
    values = [s(i) for i in range(800, 1001)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert s(900) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(1000) == pytest.approx(0.1) and s(1500) == pytest.approx(0.1)
    assert s(999) > 0.1


@pytest.mark.parametrize(("shape", "mid"), [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_wsd_decay_shapes(shape: str, mid: float) -> None:
    s = LRSchedule("wsd", total_steps=100, decay_fraction=0.5, min_lr_ratio=0.0, decay_shape=shape)
    assert s(50) == 1.0 and s(75) == pytest.approx(mid) and s(100) == pytest.approx(0.0)
    if shape == "cosine":
        assert s(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_wsd_zero_decay_fraction_is_constant() -> None:
    s = LRSchedule("wsd", total_steps=50, warmup_steps=5, decay_fraction=0.0)
    assert all(s(i) == 1.0 for i in range(5, 80))


def test_cosine_and_linear_shapes() -> None:
    cos = LRSchedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lin = LRSchedule("linear", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert cos(10) == 1.0 and lin(10) == 1.0
    assert cos(60) == pytest.approx(0.55) and lin(60) == pytest.approx(0.55)
    assert cos(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lin(35) == pytest.approx(0.1 + 0.9 * 0.75)
    assert cos(110) == pytest.approx(0.1) and lin(110) == pytest.approx(0.1)
    assert cos(200) == pytest.approx(0.1)
    for s in (cos, lin):
        values = [s(i) for i in range(10, 111)]
        assert all(a > b for a, b in itertools.pairwise(values))


def test_constant_schedule() -> None:
    s = LRSchedule("constant", total_steps=10, warmup_steps=3)
    assert [s(i) for i in range(3, 20)] == [1.0] * 17


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"schedule": "step"}, "wsd, cosine, linear, constant"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": 95}, "warmup_steps"),  # 95 + 10 decay steps > 100
        ({"warmup_steps": 100, "schedule": "cosine"}, "warmup_steps"),
        ({"warmup_steps": 101, "schedule": "constant"}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"decay_fraction": 1.2}, "decay_fraction"),
        ({"decay_shape": "exp"}, "decay_shape must be one of linear, cosine, sqrt"),
    ],
)
def test_schedule_validation(kwargs: dict, key: str) -> None:
    args = {"schedule": "wsd", "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=key):
        LRSchedule(**args)


def _opt(lr: float = 2.0) -> torch.optim.Optimizer:
    model = Model()
    return build_optimizer(model, _cfg(lr=lr))


SCHED_CFG = {"schedule": "wsd", "warmup_steps": 3, "min_lr_ratio": 0.1, "decay_fraction": 0.3}


def test_build_lr_scheduler_applies_multiplier_to_every_group() -> None:
    opt = _opt(lr=2.0)
    sched = build_lr_scheduler(opt, OmegaConf.create(SCHED_CFG), total_steps=20)
    expected = LRSchedule.from_config(SCHED_CFG, total_steps=20)
    for step in range(25):
        assert all(g["lr"] == pytest.approx(2.0 * expected(step)) for g in opt.param_groups)
        opt.step()
        sched.step()


def test_scheduler_resumed_at_a_step_is_exact() -> None:
    """A resume rebuilds the scheduler at the checkpoint's step (nothing of the schedule is saved): the
    LRs from there on are the uninterrupted run's, to the bit."""
    total, k = 20, 9
    opt = _opt()
    sched = build_lr_scheduler(opt, SCHED_CFG, total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    opt2 = _opt()
    sched2 = build_lr_scheduler(opt2, SCHED_CFG, total_steps=total, last_step=k)
    resumed = []
    for _ in range(k, total):
        resumed.append([g["lr"] for g in opt2.param_groups])
        opt2.step()
        sched2.step()
    assert sched2.last_epoch == total and resumed == lrs[k:]  # identical floats, not approximately


def test_resume_takes_the_schedule_from_the_current_config() -> None:
    """A WSD run resumed with a longer total_steps stays in its stable phase, and one resumed with a halved
    base LR follows exactly half the schedule: the base LR is the param group's LR when the scheduler is
    built, never a saved one."""
    opt = _opt(lr=1.0)
    sched = build_lr_scheduler(opt, SCHED_CFG, total_steps=20)
    for _ in range(15):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1.0  # decaying under the old plan
    opt2 = _opt(lr=1.0)
    build_lr_scheduler(opt2, SCHED_CFG, total_steps=100, last_step=15)
    assert opt2.param_groups[0]["lr"] == 1.0
    opt3 = _opt(lr=0.5)
    build_lr_scheduler(opt3, SCHED_CFG, total_steps=20, last_step=15)
    assert opt3.param_groups[0]["lr"] == 0.5 * LRSchedule.from_config(SCHED_CFG, total_steps=20)(15)


def test_config_ns_options_reach_the_muon_groups() -> None:
    """optim.ns_method / optim.ns_gram (opt-in, default off) are validated with the run config and reach every
    Muon group through build_optimizer; bad values name the key."""
    import dataclasses

    from train.config import ConfigError, load_config

    cfg = load_config("configs/tiny.yaml", ["optim.name=muon", "optim.ns_method=polar_express", "optim.ns_gram=true"])
    model = nn.Linear(8, 16)
    opt = build_optimizer(model, dataclasses.asdict(cfg.optim))  # as train/trainer.py does
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert muon_groups and all(g["ns_method"] == "polar_express" and g["ns_gram"] is True for g in muon_groups)
    default = load_config("configs/tiny.yaml", ["optim.name=muon"]).optim
    assert (default.ns_method, default.ns_gram) == ("muon", False)
    with pytest.raises(ConfigError, match="optim.ns_method"):
        load_config("configs/tiny.yaml", ["optim.ns_method=cubic"])
