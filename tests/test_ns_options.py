"""Newton–Schulz's opt-in forms and the batched call (optim/newton_schulz.py), single process: stacks of
same-shape updates against one call per tensor, Polar Express's per-step coefficients (re-derived here) and the
Gram form for wide matrices, each against a float64 SVD reference. Split from tests/test_muon.py, whose helpers
and inputs it shares."""

from __future__ import annotations

import math

import pytest
import torch

from optim import NS_COEFFICIENTS, Muon, zeropower_via_newtonschulz5
from optim.newton_schulz import (
    GRAM_MIN_ASPECT,
    POLAR_EXPRESS_COEFFICIENTS,
    ns_coefficients,
    ns_polynomial,
    orthogonalize_batched,
)
from tests.test_muon import INPUTS, _grads, _run, ill_conditioned, randn


# ================================================= batched calls, Polar Express, the Gram form (opt-in)
def svd_reference(G: torch.Tensor, method: str = "muon", steps: int = 5) -> torch.Tensor:
    """Independent float64 reference of NS: ``U p(S / ||G||_F) Vᵀ`` per matrix from an SVD, ``p`` the composed
    step polynomials (the map the iteration applies to each singular value)."""
    G = G.double()
    U, S, Vh = torch.linalg.svd(G / G.norm(dim=(-2, -1), keepdim=True), full_matrices=False)
    return (U * ns_polynomial(S, steps, method).unsqueeze(-2)) @ Vh


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_orthogonalize_batched_is_ns_per_tensor(dtype: torch.dtype) -> None:
    """Same-shape tensors (matrices and expert stacks) go to NS as ONE stack; the results are NS per tensor
    (bitwise on this CPU, asserted to 1e-6 as the batched-NS test above); a shape that occurs once keeps the 2-D
    path; dtypes never share a stack."""
    shapes = [(24, 40), (3, 24, 40), (40, 24), (24, 40), (16, 16), (2, 2, 24, 40)]
    ups = [randn(*sh, seed=300 + i).to(dtype) for i, sh in enumerate(shapes)] + [randn(24, 40, seed=310).double()]
    ups[0] *= 1000.0  # each matrix keeps its own norm inside the stack
    calls: list[tuple[int, ...]] = []

    def ns(u: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(u.shape))
        return zeropower_via_newtonschulz5(u, dtype=torch.float32)

    got = orthogonalize_batched(ups, ns, batch_cpu=True)  # what a GPU gets
    assert sorted(calls) == sorted([(9, 24, 40), (40, 24), (16, 16), (24, 40)])
    calls.clear()
    orthogonalize_batched(ups, ns)  # CPU tensors by default: one call each (stacking is slower there)
    assert calls == [tuple(u.shape) for u in ups]
    for u, o in zip(ups, got, strict=True):
        assert o.shape == u.shape and o.dtype == u.dtype
        torch.testing.assert_close(o, zeropower_via_newtonschulz5(u, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_orthogonalize_batched_bounds_the_stack() -> None:
    """A stack holds at most max(max_numel, the largest update) elements: consecutive same-shape tensors fill it;
    max_numel=0 never hands NS more than its largest single input."""
    ups = [randn(*sh, seed=360 + i) for i, sh in enumerate([(8, 12), (8, 12), (3, 8, 12), (8, 12), (8, 12)])]
    for max_numel, expected in [(0, [(2, 8, 12), (3, 8, 12), (2, 8, 12)]), (5 * 96, [(5, 8, 12), (2, 8, 12)]),
                                (10**6, [(7, 8, 12)])]:
        calls: list[tuple[int, ...]] = []

        def ns(u: torch.Tensor, calls: list = calls) -> torch.Tensor:
            calls.append(tuple(u.shape))
            return zeropower_via_newtonschulz5(u)

        got = orthogonalize_batched(ups, ns, max_numel=max_numel, batch_cpu=True)
        assert calls == expected, max_numel
        for u, o in zip(ups, got, strict=True):
            torch.testing.assert_close(o, zeropower_via_newtonschulz5(u), rtol=1e-6, atol=1e-6)


def test_polar_express_coefficients_are_the_derived_ones() -> None:
    """The table's documented property, in float64: step by step the image of [1e-3, 1.01] is the commented
    interval, and 5 steps put [1e-3, 1] in [0.875, 1.125] (the fixed quintic: [0.68, 1.21] of [2e-3, 1])."""
    x = torch.logspace(-3, math.log10(1.01), 400_001, dtype=torch.float64)
    lo_hi = [(0.0084, 1.9916), (0.0347, 1.9653), (0.1365, 1.8635), (0.4419, 1.5581), (0.8756, 1.1244)]
    for steps, (lo, hi) in enumerate(lo_hi, start=1):
        y = ns_polynomial(x, steps, "polar_express")
        assert abs(y.min().item() - lo) < 2e-4 and abs(y.max().item() - hi) < 2e-4, steps
    assert ns_coefficients("polar_express", 9)[7:] == [POLAR_EXPRESS_COEFFICIENTS[-1]] * 2
    assert ns_coefficients("muon", 3) == [NS_COEFFICIENTS] * 3
    with pytest.raises(ValueError, match="method"):
        ns_coefficients("cubic", 5)


def test_polar_express_first_steps_rederived_by_linear_program() -> None:
    """Step 0 and 1 of the table re-derived independently: the odd quintic minimizing max |1 - p(x)| on the
    interval (a linear program on a grid)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    import numpy as np

    lo, hi = 1e-3, 1.0
    for k in range(2):
        x = np.concatenate([np.geomspace(lo, hi * 1.01, 3000), np.linspace(lo, hi * 1.01, 3000)])
        V = np.stack([x, x**3, x**5], 1)
        one = np.ones((len(x), 1))
        res = linprog([0, 0, 0, 1], A_ub=np.vstack([np.hstack([-V, -one]), np.hstack([V, -one])]),
                      b_ub=np.concatenate([-one[:, 0], one[:, 0]]), bounds=[(None, None)] * 3 + [(0, None)])
        np.testing.assert_allclose(res.x[:3], POLAR_EXPRESS_COEFFICIENTS[k], rtol=2e-3)
        y = V @ np.asarray(POLAR_EXPRESS_COEFFICIENTS[k])
        lo, hi = y.min(), y.max()


@pytest.mark.parametrize("name", list(INPUTS))
def test_polar_express_ns_equals_float64_reference(name: str) -> None:
    """method="polar_express": float32 NS equals the float64 SVD reference of its polynomial; the singular values
    of the well-conditioned part land in [0.87, 1.13] (the fixed quintic's band is [0.68, 1.21])."""
    G = INPUTS[name]()
    out = zeropower_via_newtonschulz5(G, dtype=torch.float32, method="polar_express")
    assert rel_err(out, svd_reference(G, "polar_express")) < 1e-4  # measured <= 1.7e-5
    s_in = torch.linalg.svdvals(G.double()) / G.double().norm()
    s_out = torch.linalg.svdvals(out.double())
    assert s_out.max() <= 1.13 and (s_out >= 0.87).sum() >= (s_in >= 1e-3).sum()


GRAM_INPUTS = {
    "random-wide": lambda: randn(48, 200, seed=320),
    "random-tall-batched": lambda: randn(3, 160, 40, seed=321),
    "cond1e4-wide": lambda: ill_conditioned(64, 256, 1e4, seed=322),
    "cond1e6-tall": lambda: ill_conditioned(256, 64, 1e6, seed=323),
    "rank-deficient": lambda: randn(40, 4, seed=324) @ randn(4, 120, seed=325),
}


@pytest.mark.parametrize("method", ["muon", "polar_express"])
@pytest.mark.parametrize("name", list(GRAM_INPUTS))
def test_gram_form_equals_float64_reference(name: str, method: str) -> None:
    """gram=True (wide or tall by >= GRAM_MIN_ASPECT): the same polynomial as the usual form, against the float64
    SVD reference, in float32: random inputs to 2e-5 (as the usual form; measured <= 6.4e-6); ill-conditioned
    ones to 3e-3 (rounding on the squared spectrum: measured <= 7.9e-4, the usual form <= 3.8e-5). With
    dtype=bfloat16 the input is rounded to bf16 and the iteration promoted to float32: never worse than the usual
    bf16 form (measured 4e-3..0.96 vs 1.6e-2..1.0, the input rounding dominating)."""
    G = GRAM_INPUTS[name]()
    ref = svd_reference(G, method)
    out = zeropower_via_newtonschulz5(G, dtype=torch.float32, method=method, gram=True)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert rel_err(out, ref) < (2e-5 if name.startswith("random") else 3e-3)
    assert rel_err(zeropower_via_newtonschulz5(G, dtype=torch.float32, method=method), ref) < 1e-4
    bf16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, method=method, gram=True)
    assert bf16.dtype == G.dtype
    assert rel_err(bf16, ref) <= rel_err(zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, method=method), ref)


def test_gram_form_only_where_it_pays() -> None:
    """Below GRAM_MIN_ASPECT (and for ns_steps 0) gram=True is the usual form, bit for bit."""
    for shape in [(32, 32), (40, 64), (3, 64, 40)]:
        assert max(shape[-2:]) < GRAM_MIN_ASPECT * min(shape[-2:])
        G = randn(*shape, seed=330)
        assert torch.equal(zeropower_via_newtonschulz5(G, gram=True), zeropower_via_newtonschulz5(G))
    G = randn(16, 64, seed=331)
    assert torch.equal(zeropower_via_newtonschulz5(G, steps=0, gram=True), zeropower_via_newtonschulz5(G, steps=0))


def test_muon_ns_options_reach_the_iteration() -> None:
    """Muon(ns_method=..., ns_gram=...) steps as the update rule with that NS (float32, by hand), several groups
    with their own lr / weight decay (the foreach updates are grouped by them)."""
    shapes = [(16, 48), (3, 16, 48), (48, 16), (24, 24)]
    init = [randn(*s, seed=340 + i) * 0.05 for i, s in enumerate(shapes)]
    grads = _grads(shapes, 3, seed=350)
    for method, gram in [("polar_express", False), ("muon", True), ("polar_express", True)]:
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        opt = Muon([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05, "weight_decay": 0.0}], lr=0.02,
                   weight_decay=0.1, momentum=0.9, ns_dtype="float32", ns_method=method, ns_gram=gram)
        _run(opt, ps, grads)
        ws, ms = [w.double() for w in init], [torch.zeros_like(w, dtype=torch.float64) for w in init]
        for step_grads in grads:
            for i, g in enumerate(step_grads):
                lr, wd = (0.02, 0.1) if i < 2 else (0.05, 0.0)
                ms[i] = 0.9 * ms[i] + g.double()
                o = svd_reference(g.double() + 0.9 * ms[i], method)
                ws[i] = ws[i] * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(shapes[i][-2:])) * o
        for p, w, w0 in zip(ps, ws, init, strict=True):
            assert (p.detach().double() - w).abs().max() <= 1e-4 * (w - w0.double()).abs().max(), (method, gram)
