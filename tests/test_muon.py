"""Muon (optim/muon.py) and its Newton–Schulz iteration (optim/newton_schulz.py), single process.

Reference points: PyTorch's own ``torch.optim.Muon`` / ``_zeropower_via_newtonschulz`` (2-D parameters)
and ``torch.optim.AdamW`` (the non-matrix groups). Tolerances, and why:

* NS vs torch's NS on a 2-D input: bitwise (same ops in the same order), in bf16 and in float32.
* 20 Muon steps vs ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` with float32 NS: the momentum
  buffers differ by the factor (1 - mu) (torch keeps an EMA, Moonlight a sum), which NS's normalization
  cancels up to rounding (amplified by NS on the small singular values), so the parameters agree to
  2e-6 of the displacement max|W_20 - W_0| and 1e-6 of max|W| (measured <= 7.1e-7 and <= 4.3e-7). With
  bf16 NS (torch's only mode) that rounding flips bf16 roundings of the NS input: 3e-2 of the displacement
  (measured <= 1.3e-2; bf16 NS itself is ~1.4e-2 from float32 NS in relative Frobenius norm).
* Stacked experts vs separate matrices, batched NS vs per-matrix NS: bitwise on CPU here; asserted to
  1e-6 relative (another BLAS may order the batched sums differently).
* Aux AdamW vs torch.optim.AdamW: bitwise (same functional call, same state).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.optim import _muon as torch_muon

from models import ModelConfig, Transformer
from optim import (
    MUON_DEFAULTS,
    NS_COEFFICIENTS,
    Muon,
    build_lr_scheduler,
    build_optimizer,
    split_params,
    zeropower_via_newtonschulz5,
)
from optim.newton_schulz import (
    ns_polynomial,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(32, 32), (16, 48), (48, 16)]  # square, wide, tall
NS_BAND = (0.68, 1.21)
"""Where 5 quintic steps put every singular value that starts at >= 2e-3 of the Frobenius norm: the
iterated polynomial's range on [2e-3, 1] is [0.6818, 1.2024] (computed in
test_ns_polynomial_band_is_the_documented_one), widened by float32 rounding (~2e-6)."""
NS_BAND_BF16 = (0.64, 1.25)  # the same, widened by bf16 rounding (measured deviation <= 0.01 there)
SMALL = 2e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def torch_ns(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.optim.Muon's NS (torch 2.13 hard-codes bf16); for float32, its own source with the one cast
    changed, so the float32 reference is still PyTorch's code, not ours. The float32 cast copies, as the bf16
    cast of a float32 tensor does: torch then normalizes it in place (``div_``), which must not reach the
    caller's tensor (without nesterov that tensor is the momentum buffer)."""
    fn = torch_muon._zeropower_via_newtonschulz
    if dtype != torch.bfloat16:
        src = inspect.getsource(fn)
        assert src.count("grad.bfloat16()") == 1, "torch's NS changed; update this test's float32 reference"
        namespace = dict(vars(torch_muon))
        exec(src.replace("grad.bfloat16()", "grad.float().clone()"), namespace)
        fn = namespace["_zeropower_via_newtonschulz"]
    return fn


def ill_conditioned(n: int, m: int, cond: float, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ with s log-spaced from 1 down to 1/cond (random orthogonal U, V), float32."""
    g = gen(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    k = min(n, m)
    s = torch.logspace(0.0, -math.log10(cond), k, dtype=torch.float64)
    return ((u[:, :k] * s) @ v[:, :k].T).float()


# ============================================================================================ Newton–Schulz
@pytest.mark.parametrize("shape", SHAPES + [(96, 320)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ns_equals_torch_ns_bitwise(shape: tuple[int, int], dtype: torch.dtype) -> None:
    G = randn(*shape, seed=1)
    ours = zeropower_via_newtonschulz5(G, dtype=dtype)
    ref = torch_ns(dtype)(G, NS_COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == G.dtype and ours.shape == G.shape
    assert torch.equal(ours, ref.to(G.dtype))


def test_ns_keeps_input_and_dtype() -> None:
    G = randn(8, 12, seed=2).bfloat16()
    before = G.clone()
    out = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)  # same dtype: no copy on the cast
    assert torch.equal(G, before) and out.dtype == torch.bfloat16
    assert zeropower_via_newtonschulz5(G.double(), dtype=torch.float32).dtype == torch.float64
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(4, 6)), torch.zeros(4, 6))  # eps clamp: no NaN
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.ones(5))


def test_ns_polynomial_band_is_the_documented_one() -> None:
    x = torch.logspace(math.log10(SMALL), 0.0, 200_001, dtype=torch.float64)
    phi = ns_polynomial(x)
    assert 0.6815 < phi.min().item() < 0.6820 and 1.2020 < phi.max().item() < 1.2026
    # Below the threshold the iteration has not converged: p^5(x) ~ a^5 x (a^5 = 487), at least 430 x.
    tiny = torch.logspace(-7, math.log10(SMALL), 10_001, dtype=torch.float64)
    assert (ns_polynomial(tiny) / tiny).min().item() > 430


INPUTS = {
    "random-square": lambda: randn(64, 64, seed=3),
    "random-wide": lambda: randn(48, 160, seed=4),
    "random-tall": lambda: randn(160, 48, seed=5),
    "cond1e4-wide": lambda: ill_conditioned(64, 128, 1e4, seed=6),
    "cond1e4-tall": lambda: ill_conditioned(128, 64, 1e4, seed=7),
    "cond1e4-square": lambda: ill_conditioned(96, 96, 1e4, seed=8),
}


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ns_orthogonalizes(name: str, dtype: torch.dtype) -> None:
    """NS(G) = U p^5(S/||G||_F) Vᵀ: singular values of the well-conditioned part (input >= 2e-3 of the norm)
    land in NS_BAND; a cond-1e4 input's smallest directions are only amplified ~490x (not to 1) in 5 steps,
    exactly as the scalar map says (float32: to 1e-5; bf16 rounds the small ones, only the band is checked)."""
    G = INPUTS[name]()
    s_in = torch.linalg.svdvals(G.double()) / G.double().norm()
    s_out = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, dtype=dtype).double())
    # p^5 is not monotone, so svdvals(NS(G)) (sorted) pairs with the sorted p^5(s_in).
    expected = ns_polynomial(s_in).sort(descending=True).values
    big = ns_polynomial(s_in[s_in >= SMALL])
    lo, hi = NS_BAND if dtype == torch.float32 else NS_BAND_BF16
    assert lo <= big.min() and big.max() <= hi  # (the exact map, for the record)
    if dtype == torch.float32:
        torch.testing.assert_close(s_out, expected, rtol=0, atol=1e-5)
        assert (s_out >= lo).sum() >= (s_in >= SMALL).sum()
        assert s_out.max() <= hi
    else:
        # bf16: which output values come from the well-conditioned inputs is not recoverable after rounding,
        # but the count in the band is, and nothing leaves the band from above.
        in_band = ((s_out >= lo) & (s_out <= hi)).sum()
        assert in_band >= (s_in >= SMALL).sum() and s_out.max() <= hi
        if s_in.min() >= SMALL:  # well-conditioned: every singular value in the band, close to float32's
            assert s_out.min() >= lo
            ref = zeropower_via_newtonschulz5(G, dtype=torch.float32)
            out = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
            assert ((out - ref).norm() / ref.norm()).item() < 0.03  # measured 0.013 .. 0.014


@pytest.mark.parametrize("shape", [(4, 24, 40), (4, 40, 24), (2, 3, 16, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ns_batched_equals_per_matrix(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    G = randn(*shape, seed=9)
    G[0] *= 1000.0  # each matrix is normalized by its own norm, not the stack's
    batched = zeropower_via_newtonschulz5(G, dtype=dtype)
    flat = G.reshape(-1, *shape[-2:])
    per = torch.stack([zeropower_via_newtonschulz5(x, dtype=dtype) for x in flat]).reshape(shape)
    torch.testing.assert_close(batched, per, rtol=1e-6, atol=1e-6)  # bitwise on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ns_tall_is_the_transposed_wide(dtype: torch.dtype) -> None:
    """A tall matrix runs on its transpose (the small Gram matrix), so NS(Gᵀ) = NS(G)ᵀ, also batched."""
    G = randn(24, 56, seed=10)
    torch.testing.assert_close(
        zeropower_via_newtonschulz5(G.T, dtype=dtype), zeropower_via_newtonschulz5(G, dtype=dtype).T, rtol=0, atol=0
    )
    S = randn(3, 24, 56, seed=11)
    torch.testing.assert_close(
        zeropower_via_newtonschulz5(S.mT, dtype=dtype),
        zeropower_via_newtonschulz5(S, dtype=dtype).mT,
        rtol=1e-6,
        atol=1e-6,
    )


# ====================================================================================== Muon vs torch's
def _grads(shapes: list[tuple[int, ...]], steps: int, seed: int) -> list[list[torch.Tensor]]:
    """Deterministic gradient sequences, one list per step; not all of one scale (step k gets a norm ~k)."""
    return [[randn(*s, seed=seed + 100 * k + i) * (1 + k) for i, s in enumerate(shapes)] for k in range(steps)]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("ns_dtype, tol", [("float32", 2e-6), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(monkeypatch: pytest.MonkeyPatch, ns_dtype: str, tol: float, nesterov: bool) -> None:
    """20 steps on square / wide / tall 2-D parameters equal torch.optim.Muon(adjust_lr_fn="match_rms_adamw");
    tol is relative to the largest displacement max|W_20 - W_0| (measured: float32 <= 7.1e-7, i.e. <= 4.3e-7
    of max|W|; bf16 <= 1.3e-2)."""
    if ns_dtype == "float32":
        monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", torch_ns(torch.float32))
    init = [randn(*s, seed=20 + i) * 0.05 for i, s in enumerate(SHAPES)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    hp = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    opt = Muon(ours, **hp, ns_dtype=ns_dtype)
    ref = torch.optim.Muon(theirs, **hp, adjust_lr_fn="match_rms_adamw")
    grads = _grads(SHAPES, 20, seed=30)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    for a, b, w0 in zip(ours, theirs, init, strict=True):
        moved = (b.detach() - w0).abs().max()
        assert moved > 0.05  # the comparison is about something: lr 0.02 * RMS-0.2 updates over 20 steps
        err = (a.detach() - b.detach()).abs().max() / moved
        assert err <= tol, f"{tuple(a.shape)}: relative error {err:.2e} > {tol}"
        if ns_dtype == "float32":
            assert (a.detach() - b.detach()).abs().max() <= 1e-6 * b.detach().abs().max()
        # Moonlight's buffer is a sum, torch's an EMA: M_ours = M_torch / (1 - mu).
        torch.testing.assert_close(
            opt.state[a]["momentum_buffer"] * (1 - 0.95), ref.state[b]["momentum_buffer"], rtol=1e-5, atol=1e-6
        )


def test_update_rule_by_hand() -> None:
    """One step from a known state: W <- W(1 - lr wd) - lr 0.2 sqrt(max(n, m)) NS(G + mu (mu M + G))."""
    W0, M0, G = randn(12, 20, seed=40), randn(12, 20, seed=41), randn(12, 20, seed=42)
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.2, momentum=0.9, ns_dtype="float32")
    opt.state[p]["momentum_buffer"] = M0.clone()
    p.grad = G
    opt.step()
    M = 0.9 * M0 + G
    ortho = zeropower_via_newtonschulz5(G + 0.9 * M, dtype=torch.float32)
    expected = W0 * (1 - 0.1 * 0.2) - 0.1 * 0.2 * math.sqrt(20) * ortho
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], M)


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_stacked_experts_are_separate_matrices(ns_dtype: str) -> None:
    """A [E, n, m] parameter over 3 steps equals E separate [n, m] parameters (scale 0.2*sqrt(max(n, m)),
    not of the stack's first dims; each expert's NS normalized by its own norm)."""
    E, n, m = 4, 24, 40
    W0 = randn(E, n, m, seed=50) * 0.05
    stacked = torch.nn.Parameter(W0.clone())
    singles = [torch.nn.Parameter(W0[e].clone()) for e in range(E)]
    hp = dict(lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
    opt_s, opt_1 = Muon([stacked], **hp), Muon(singles, **hp)
    for k in range(3):
        G = randn(E, n, m, seed=51 + k)
        G[1] *= 100.0
        stacked.grad = G.clone()
        for e, p in enumerate(singles):
            p.grad = G[e].clone()
        opt_s.step()
        opt_1.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in singles]), rtol=1e-6, atol=1e-7)


# ============================================================================================ aux AdamW
@pytest.mark.parametrize("mode", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_aux_adamw_equals_torch_adamw_bitwise(mode: dict) -> None:
    shapes = [(40, 16), (16,), (7,)]
    init = [randn(*s, seed=60 + i) for i, s in enumerate(shapes)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = Muon(
        [
            {"params": ours[:1], "use_muon": False, "weight_decay": 0.1},
            {"params": ours[1:], "use_muon": False, "weight_decay": 0.0},
        ],
        **hp,
        **mode,
    )
    ref = torch.optim.AdamW(
        [{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}], **hp, **mode
    )
    grads = _grads(shapes, 10, seed=70)
    _run(opt, ours, grads)
    _run(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert set(opt.state[a]) == set(ref.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], ref.state[b][key])
            assert opt.state[a][key].device == ref.state[b][key].device


# ======================================================================================== on the model
def tiny_model_config(**overrides: object) -> ModelConfig:
    """configs/tiny.yaml's network (hidden 128, 4 layers, 8 experts top-2 + 1 shared, MLA with q-LoRA)."""
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "tiny.yaml").model)
    return ModelConfig(**{**model, **overrides})


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config(num_hidden_layers=2)).train()


def muon_cfg(**overrides: object) -> dict:
    return {"name": "muon", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, **overrides}


def lm_loss(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1])
    return F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.balance_loss


def set_grads(model: torch.nn.Module, seed: int) -> None:
    for i, p in enumerate(model.parameters()):
        p.grad = randn(*p.shape, seed=seed + i) * 0.01


def test_build_muon_groups(tiny_model: Transformer) -> None:
    opt = build_optimizer(tiny_model, muon_cfg())
    assert isinstance(opt, Muon)
    by_kind = {g["group"]: g for g in opt.param_groups}
    assert [g["group"] for g in opt.param_groups] == ["matrix", "embedding", "vector"]
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    groups = split_params(tiny_model)
    for kind, named in groups.items():
        assert {id(p) for _, p in named} == {id(p) for p in by_kind[kind]["params"]}
    muon_names = {n for n, _ in groups["matrix"]}
    # attention projections, dense + shared FFNs, router gate and the stacked experts all on Muon ...
    for part in (
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "mlp.gate_proj",
        "shared_experts",
        "mlp.gate.weight",
        "experts",
    ):
        assert any(part in n for n in muon_names), part
    assert {p.ndim for p in by_kind["matrix"]["params"]} == {2, 3, 4}  # matrices, down_proj and gate_up_proj stacks
    # ... embeddings, LM head and norms on AdamW (no decay for the norms)
    assert {n for n, _ in groups["embedding"]} == {"embed_tokens.weight", "lm_head.weight"}
    assert all(p.ndim == 1 for p in by_kind["vector"]["params"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert {g["lr"] for g in opt.param_groups} == {3e-3}
    m = by_kind["matrix"]
    assert (
        {k: m[k] for k in MUON_DEFAULTS}
        == MUON_DEFAULTS
        == {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_dtype": "auto", "ns_triton": "auto",
            "ns_method": "muon", "ns_gram": False}  # the opt-in NS variants are off by default
    )
    assert by_kind["embedding"]["betas"] == (0.9, 0.95) and by_kind["embedding"]["eps"] == 1e-8
    assert "muon" in opt.describe() and "adamw" in opt.describe()
    custom = build_optimizer(
        tiny_model, muon_cfg(momentum=0.9, nesterov=False, ns_steps=3, ns_dtype="float32", ns_triton=False,
                             ns_method="polar_express", ns_gram=True)
    )
    assert {k: custom.param_groups[0][k] for k in MUON_DEFAULTS} == {
        "momentum": 0.9,
        "nesterov": False,
        "ns_steps": 3,
        "ns_dtype": "float32",
        "ns_triton": False,
        "ns_method": "polar_express",
        "ns_gram": True,
    }


@pytest.mark.parametrize(
    "key, value",
    [
        ("momentum", 1.0),
        ("momentum", "high"),
        ("nesterov", "yes"),
        ("ns_steps", 0),
        ("ns_steps", 2.5),
        ("ns_dtype", "int8"),
        ("ns_triton", "yes"),
        ("ns_method", "cubic"),
        ("ns_gram", "yes"),
        ("lr", -1.0),
    ],
)
def test_bad_muon_hyperparameters_name_the_key(tiny_model: Transformer, key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        build_optimizer(tiny_model, muon_cfg(**{key: value}))


def test_muon_rejects_vectors() -> None:
    with pytest.raises(ValueError, match="use_muon=False"):
        Muon([torch.nn.Parameter(torch.ones(3))])


def test_factory_aux_groups_equal_torch_adamw(tiny_model: Transformer) -> None:
    """Through the factory, the embedding (decayed) and vector (not decayed) groups step exactly like the
    adamw factory's torch.optim.AdamW, while the matrices take Muon steps."""
    model = copy.deepcopy(tiny_model)
    ref_model = copy.deepcopy(tiny_model)
    opt = build_optimizer(model, muon_cfg())
    ref = build_optimizer(ref_model, {**muon_cfg(), "name": "adamw"})
    for seed in (80, 81):
        set_grads(model, seed)
        set_grads(ref_model, seed)
        opt.step()
        ref.step()
    groups, ref_groups = split_params(model), dict(ref_model.named_parameters())
    for kind in ("embedding", "vector"):
        for name, p in groups[kind]:
            assert torch.equal(p, ref_groups[name]), name
    for name, p in groups["matrix"]:
        assert not torch.equal(p, ref_groups[name]), name


def test_state_dict_round_trip(tiny_model: Transformer) -> None:
    """Save after 2 steps (torch.save, weights_only load), load into a new optimizer on a copy of the model:
    the next step is identical bit for bit."""
    model = copy.deepcopy(tiny_model)
    opt = build_optimizer(model, muon_cfg())
    for seed in (90, 91):
        set_grads(model, seed)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, muon_cfg(lr=1.0, momentum=0.5))  # the state dict brings the hyperparameters
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["momentum"] == 0.95 and opt2.param_groups[0]["lr"] == 3e-3
    for seed_model, o in ((model, opt), (clone, opt2)):
        set_grads(seed_model, 92)
        o.step()
    for (name, a), b in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b), name
    matrix = opt.param_groups[0]["params"][0]
    assert set(opt.state[matrix]) == {"momentum_buffer"}


def test_state_dict_without_a_newer_key_loads_with_this_optimizers_value() -> None:
    """A state dict saved before a group key existed (ns_triton) loads; the group takes the value this optimizer
    was built with."""
    p = torch.nn.Parameter(randn(6, 10, seed=170))
    old = Muon([p], lr=0.01).state_dict()
    del old["param_groups"][0]["ns_triton"]
    q = torch.nn.Parameter(p.detach().clone())
    opt = Muon([q], lr=0.01, ns_triton=False)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["ns_triton"] is False
    q.grad = torch.ones_like(q)
    opt.step()


def test_distributed_checkpoint_state_dict_round_trip(tiny_model: Transformer) -> None:
    """torch.distributed.checkpoint's get_state_dict / set_state_dict (what train/checkpoint.py uses)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = copy.deepcopy(tiny_model)
    opt = build_optimizer(model, muon_cfg())
    set_grads(model, 100)
    opt.step()
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, muon_cfg())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_sd, optim_sd = get_state_dict(model, opt)
        state = optim_sd["state"]  # keyed by parameter name
        assert set(state["layers.1.mlp.experts.gate_up_proj"]) == {"momentum_buffer"}
        assert set(state["layers.0.self_attn.o_proj.weight"]) == {"momentum_buffer"}
        assert set(state["embed_tokens.weight"]) == set(state["norm.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
        assert [g["use_muon"] for g in optim_sd["param_groups"]] == [True, False, False]
        set_state_dict(clone, opt2, model_state_dict=copy.deepcopy(model_sd), optim_state_dict=copy.deepcopy(optim_sd))
    for m, o in ((model, opt), (clone, opt2)):
        set_grads(m, 101)
        o.step()
    for (name, a), b in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_training_lowers_the_loss(tiny_model: Transformer) -> None:
    model = copy.deepcopy(tiny_model)
    opt = build_optimizer(model, muon_cfg(lr=1e-2))
    ids = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=gen(110))
    losses = []
    for _ in range(8):
        loss = lm_loss(model, ids)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_lr_scheduler_scales_muon_and_adamw_groups(tiny_model: Transformer) -> None:
    """LambdaLR (warmup 4 of 10 steps) sets every group's lr; the Muon step then moves the weights exactly as
    a Muon built with that lr does."""
    model = copy.deepcopy(tiny_model)
    ref_model = copy.deepcopy(tiny_model)
    opt = build_optimizer(model, muon_cfg())
    sched = build_lr_scheduler(opt, {"schedule": "wsd", "warmup_steps": 4}, total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 / 5] * 3)
    ref = build_optimizer(ref_model, muon_cfg(lr=3e-3 / 5))
    for m, o in ((model, opt), (ref_model, ref)):
        set_grads(m, 120)
        o.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2 * 3e-3 / 5] * 3)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_orthogonalize_hook_gets_every_update_once() -> None:
    """The hook the distributed NS plugs into: one call per step (per NS setting) with all Muon updates."""
    calls: list[list[tuple[int, ...]]] = []

    def recording(updates: list[torch.Tensor], ns: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        calls.append([tuple(u.shape) for u in updates])
        return [ns(u) for u in updates]

    shapes = [(8, 12), (3, 8, 12), (12, 8)]
    init = [randn(*s, seed=130 + i) for i, s in enumerate(shapes)]
    a = [torch.nn.Parameter(w.clone()) for w in init]
    b = [torch.nn.Parameter(w.clone()) for w in init]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]
    opt_a = Muon(groups(a), lr=0.01, orthogonalize=recording)
    opt_b = Muon(groups(b), lr=0.01)
    grads = _grads(shapes, 2, seed=140)
    _run(opt_a, a, grads)
    _run(opt_b, b, grads)
    assert calls == [shapes, shapes]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_deepcopy_and_pickle_keep_working() -> None:
    import pickle

    p = torch.nn.Parameter(randn(6, 10, seed=150))
    v = torch.nn.Parameter(randn(10, seed=151))
    opt = Muon([{"params": [p]}, {"params": [v], "use_muon": False}], lr=0.01)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = clone.param_groups[0]["params"][0]
        q.grad = torch.ones_like(q)
        clone.param_groups[1]["params"][0].grad = torch.ones(10)
        clone.step()
        clone.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": False})
        assert clone.param_groups[-1]["betas"] == (0.9, 0.95)


def test_ns_dtype_auto_is_float32_on_cpu() -> None:
    """ "auto" = bf16 on CUDA, float32 elsewhere (bf16 matmuls are ~20x slower than float32 on CPUs without
    bf16 units)."""
    init = randn(3, 16, 24, seed=160)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a, opt_b = Muon([a], lr=0.01, ns_dtype="auto"), Muon([b], lr=0.01, ns_dtype=torch.float32)
    assert opt_a.param_groups[0]["ns_dtype"] == "auto" and opt_b.param_groups[0]["ns_dtype"] == "float32"
    _run(opt_a, [a], _grads([(3, 16, 24)], 2, seed=161))
    _run(opt_b, [b], _grads([(3, 16, 24)], 2, seed=161))
    assert torch.equal(a, b)
