"""optim/triton_ns.py's SYRK kernel compiled for the GPU, against PyTorch's products and Newton–Schulz on CUDA:
what Muon runs on every matrix of every step there (`ns_dtype: auto` is bf16 and `ns_triton: auto` picks the
kernel on CUDA). A CPU dry run needs TRITON_INTERPRET=1 and uses smaller shapes.

The interpreter rounds the kernel's fp32 -> bf16 stores toward zero (measured: every output equals the truncated
fp32 result), a GPU to nearest: so on CUDA the bf16 bounds are those of one round-to-nearest (half an ulp), and
the dry run is allowed a whole ulp (which roughly doubles NS's bf16 error there)."""

from __future__ import annotations

import pytest
import torch

from optim import newton_schulz, triton_ns
from optim.newton_schulz import zeropower_via_newtonschulz5

pytestmark = pytest.mark.gpu

# (cuda shape, cpu dry-run shape): a wide and a tall matrix off the 128-tile grid, a batch of experts [E, out, in]
SHAPES = [((1000, 3000), (40, 70)), ((2048, 768), (72, 24)), ((8, 384, 1024), (3, 24, 40))]
SHAPE_IDS = ["wide", "tall", "experts"]
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: a bf16 ulp is at most this, relative


@pytest.fixture
def kernel_device(device: torch.device) -> torch.device:
    if device.type == "cpu" and not triton_ns._interpret_mode():
        pytest.skip("a CPU dry run of the Triton kernel needs TRITON_INTERPRET=1")
    if not triton_ns.available():
        pytest.skip("Triton is not installed")
    return device


def shape_on(device: torch.device, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, ...]:
    return shapes[0] if device.type == "cuda" else shapes[1]


def gaussian(shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance of a from b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
def test_sym_matmul_bf16_and_fp32_equal_references(kernel_device: torch.device, shapes) -> None:
    """X Xᵀ: bf16 within one output rounding of the exact product of the rounded inputs (the kernel sums in fp32;
    half an ulp, a bf16 ulp being at most 2^-7 = eps relative, plus fp32 summation), bitwise symmetric; fp32 (IEEE
    products: the default matmul precision) within 1e-5 of float64."""
    x32 = gaussian(shape_on(kernel_device, shapes), kernel_device, 0)
    x16 = x32.bfloat16()
    c16 = triton_ns.sym_matmul(x16)
    ref = x16.double() @ x16.double().mT
    rounding = 0.6 * BF16_EPS if kernel_device.type == "cuda" else BF16_EPS  # to nearest / toward zero
    assert c16.dtype == torch.bfloat16 and torch.equal(c16, c16.mT)
    torch.testing.assert_close(c16.double(), ref, rtol=rounding, atol=1e-5 * ref.abs().max().item())
    assert torch.get_float32_matmul_precision() == "highest"
    c32 = triton_ns.sym_matmul(x32)
    ref32 = x32.double() @ x32.double().mT
    torch.testing.assert_close(c32.double(), ref32, rtol=1e-5, atol=1e-5 * ref32.abs().max().item())


@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
def test_newton_schulz_on_the_kernel_equals_eager_in_bf16(kernel_device: torch.device, shapes) -> None:
    """Five quintic NS steps in bf16 on the kernel vs PyTorch's products (torch.optim.Muon's ops). Both round
    every product to bf16, in different orders, so they agree only to bf16's NS noise (each lands 1.5-3% from the
    fp32 NS, in relative Frobenius norm, measured under the interpreter). The bar: the kernel's result lies within
    5% of the fp32 NS and no farther from it than PyTorch's bf16 result (x1.5 on CUDA, + one bf16 ulp; x2.5 in the
    dry run, whose stores truncate)."""
    G = gaussian(shape_on(kernel_device, shapes), kernel_device, 1)
    ref = zeropower_via_newtonschulz5(G, dtype=torch.float32, triton=False)
    ours = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, triton=True)
    eager = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16, triton=False)
    assert ours.dtype == eager.dtype == G.dtype and ours.shape == G.shape
    err_ours, err_eager = rel(ours, ref), rel(eager, ref)
    factor = 1.5 if kernel_device.type == "cuda" else 2.5
    assert err_ours <= 0.05 and err_ours <= factor * err_eager + BF16_EPS, (err_ours, err_eager)
    # and in fp32 the two agree to fp32 rounding
    ours32 = zeropower_via_newtonschulz5(G, dtype=torch.float32, triton=True)
    torch.testing.assert_close(ours32, ref, rtol=1e-4, atol=1e-4)


def test_muon_default_on_cuda_takes_the_kernel(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """NS with its defaults (dtype and triton "auto") on a CUDA matrix runs bf16 on the kernel, as Muon does."""
    if device.type != "cuda":
        pytest.skip("`triton: auto` takes the kernel on CUDA only (on CPU PyTorch's products, by design)")
    if not triton_ns.available():
        pytest.skip("Triton is not installed")
    calls = []
    sym_matmul = triton_ns.sym_matmul
    monkeypatch.setattr(triton_ns, "sym_matmul", lambda x, **k: calls.append(x.dtype) or sym_matmul(x, **k))
    G = gaussian((256, 512), device, 2)
    assert newton_schulz._products(G.bfloat16(), "auto")[0] is not newton_schulz._torch_gram
    out = zeropower_via_newtonschulz5(G)
    assert calls and set(calls) == {torch.bfloat16}
    assert out.dtype == torch.float32 and rel(out, zeropower_via_newtonschulz5(G, dtype=torch.float32)) < 0.05
