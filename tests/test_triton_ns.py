"""The Triton SYRK kernel of optim/triton_ns.py (symmetric products of Newton–Schulz), run on CPU through
Triton's interpreter and checked against PyTorch.

* ``sym_matmul(x)`` vs ``x @ xᵀ`` in float32 (tight), on shapes that are not multiples of the 16-row tile,
  batched, strided; the output is symmetric bit for bit.
* bf16 / fp16 inputs vs a float32 reference, at the input dtype's tolerance; the result keeps the dtype.
* The fused epilogue ``sym_square(A, add=A, alpha=c, beta=b)`` vs ``torch.addmm(A, A, A, beta=b, alpha=c)``.
* A whole NS (5 quintic steps) on the kernel vs on PyTorch's products (``zeropower_via_newtonschulz5`` with
  ``triton=True`` / ``False``; float32: 1e-5).
* The triangular program index -> block (i, j) map is a bijection onto ``j <= i`` for GPU-sized grids.

The interpreter is chosen by ``TRITON_INTERPRET=1`` when a kernel is *jitted*; optim.triton_ns jits on first
call, reading the variable then, so it does not matter whether another test module imported triton first.
The variable is set before importing triton (as the interpreter's docs ask) and for each test of this module
by a fixture, and put back after the imports so it does not leak into the other modules of the session.
"""

from __future__ import annotations

import os

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

try:  # triton decides its own @jit helpers' mode on import: import it with the interpreter on
    triton = pytest.importorskip("triton", reason="Triton is not installed: its kernel cannot be checked")
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

from optim import triton_ns  # noqa: E402
from optim.newton_schulz import zeropower_via_newtonschulz5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "interpreter")


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_available_under_the_interpreter() -> None:
    assert triton_ns.available()


@pytest.mark.parametrize("shape", [(37, 50), (16, 16), (1, 7), (100, 20), (40, 17), (3, 20, 33), (2, 1, 5)])
def test_sym_matmul_equals_x_xt_float32(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=_gen())
    c = triton_ns.sym_matmul(x)
    assert c.shape == (*shape[:-1], shape[-2]) and c.dtype == torch.float32
    torch.testing.assert_close(c, x @ x.mT, rtol=1e-5, atol=1e-5)
    assert torch.equal(c, c.mT)  # bitwise symmetric


def test_sym_matmul_strided_input_and_explicit_blocks() -> None:
    base = torch.randn(45, 30, generator=_gen(1))
    x = base.T  # [30, 45], strides (1, 30): what NS passes for a transposed tall matrix
    for block, block_k in [(16, 16), (32, 16), (16, 32)]:
        c = triton_ns.sym_matmul(x, block=block, block_k=block_k)
        torch.testing.assert_close(c, x @ x.T, rtol=1e-5, atol=1e-5)
        assert torch.equal(c, c.T)
    xb = torch.randn(2, 33, 21, generator=_gen(2)).mT  # batched, non-contiguous
    torch.testing.assert_close(triton_ns.sym_matmul(xb), xb @ xb.mT, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 50), (2, 20, 33)])
def test_sym_matmul_half_precision_vs_float32_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=_gen(3)).to(dtype)
    c = triton_ns.sym_matmul(x)
    assert c.dtype == dtype and torch.equal(c, c.mT)
    ref = x.float() @ x.float().mT  # exact products of the rounded inputs, fp32 sums: only the output rounds
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(c.float(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    torch.testing.assert_close(c, x @ x.mT)  # and within the dtype's default tolerance of PyTorch's own product


def test_sym_square_fused_epilogue_equals_addmm() -> None:
    b, c = -4.7750, 2.0315  # NS coefficients b, c
    x = torch.randn(3, 24, 40, generator=_gen(4))
    A = torch.bmm(x, x.mT)
    A = (A + A.mT) / 2
    B = triton_ns.sym_square(A, add=A, alpha=c, beta=b)
    torch.testing.assert_close(B, torch.baddbmm(A, A, A, beta=b, alpha=c), rtol=1e-5, atol=1e-4)
    assert torch.equal(B, B.mT)
    torch.testing.assert_close(triton_ns.sym_square(A[0]), A[0] @ A[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), pytest.param((3, 20, 36), marks=pytest.mark.slow)])
def test_newton_schulz_on_the_kernel_equals_pytorch_ns(shape: tuple[int, ...]) -> None:
    G = torch.randn(*shape, generator=_gen(5))
    ours = zeropower_via_newtonschulz5(G, dtype=torch.float32, triton=True)
    ref = zeropower_via_newtonschulz5(G, dtype=torch.float32, triton=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # bf16 (Muon's on GPUs): both round every product to bf16, so they agree to bf16's NS noise only.
    ours16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, triton=True)
    theirs16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, triton=False)
    assert ours16.dtype == G.dtype
    assert (ours16 - ref).abs().max() < 0.05 and (theirs16 - ref).abs().max() < 0.05


def test_triangular_index_map_is_a_bijection_for_gpu_sized_grids() -> None:
    """The kernel's pid -> (i, j) map (float32 sqrt + one correction each way), replayed in numpy for
    T = 1024 tiles (a 131072-row matrix at BLOCK 128): every j <= i exactly once."""
    t = 1024
    pid = np.arange(t * (t + 1) // 2, dtype=np.int32)
    i = ((np.sqrt(np.float32(8) * pid.astype(np.float32) + np.float32(1)) - 1) * np.float32(0.5)).astype(np.int32)
    i = np.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    i = np.where(i * (i + 1) // 2 > pid, i - 1, i)
    j = pid - i * (i + 1) // 2
    assert (j >= 0).all() and (j <= i).all() and (i < t).all()
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(pid)


def test_bad_inputs_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="shape"):
        triton_ns.sym_matmul(torch.randn(5))
    with pytest.raises(TypeError):
        triton_ns.sym_matmul(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        triton_ns.sym_square(torch.randn(4, 5))
    with pytest.raises(ValueError, match="powers of 2"):
        triton_ns.sym_matmul(torch.randn(4, 5), block=24)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_ns.sym_matmul(torch.randn(4, 5))


def test_newton_schulz_takes_the_kernel_only_when_asked_or_on_cuda() -> None:
    """zeropower_via_newtonschulz5's products: triton=True the kernel's, False PyTorch's; "auto" the kernel's only
    for CUDA tensors: on CPU, even with the interpreter on, PyTorch's (bitwise torch.optim.Muon's)."""
    from optim import newton_schulz

    torch_products = (newton_schulz._torch_gram, newton_schulz._torch_poly)
    for x in (torch.randn(4, 6), torch.randn(2, 4, 6, dtype=torch.bfloat16)):
        assert newton_schulz._products(x, "auto") == torch_products
        assert newton_schulz._products(x, False) == torch_products
        assert newton_schulz._products(x, True) == (triton_ns.sym_matmul, newton_schulz._triton_poly)
    with pytest.raises(ValueError, match="triton"):
        newton_schulz._products(torch.randn(4, 6), "yes")


def test_optim_ns_triton_reaches_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config key optim.ns_triton goes through build_optimizer into the Muon group and from there to NS:
    true runs the kernel (float32: the step agrees with false's, PyTorch's products, to NS's 1e-5)."""
    from optim import build_optimizer

    calls = []
    sym_matmul = triton_ns.sym_matmul
    monkeypatch.setattr(triton_ns, "sym_matmul", lambda *a, **k: calls.append(1) or sym_matmul(*a, **k))
    moved = {}
    for ns_triton in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=False), torch.nn.Linear(40, 24, bias=False))
        cfg = {"name": "muon", "lr": 0.02, "ns_dtype": "float32", "ns_triton": ns_triton}
        opt = build_optimizer(model, cfg)
        assert [g["ns_triton"] for g in opt.param_groups] == [ns_triton]
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=_gen(10 + i))
        del calls[:]
        opt.step()
        assert bool(calls) is ns_triton
        moved[ns_triton] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(moved[True], moved[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
