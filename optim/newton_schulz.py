"""Newton–Schulz orthogonalization, the core of Muon: ``G = U S Vᵀ  ->  ~ U Vᵀ`` without an SVD.

The quintic iteration (Keller Jordan's Muon; Moonlight; Kimi K2) on ``X0 = G / ||G||_F``:

    A = X Xᵀ;   B = b A + c A²;   X <- a X + B X        (a, b, c) = (3.4445, -4.7750, 2.0315)

acts on each singular value separately, ``s <- p(s) = a s + b s³ + c s⁵``, and keeps the singular
vectors. Dividing by the Frobenius norm puts every singular value in ``(0, 1]``; the coefficients
maximize the slope at 0 (``p'(0) = a``, so tiny singular values grow ``a^steps`` ≈ 490x in 5 steps)
at the price of not converging to exactly 1: after 5 steps every singular value that started above
~2e-3 of the norm ends in roughly [0.68, 1.13] (the tests measure the band), which Muon does not mind.

The products run in ``dtype`` on the "wide" orientation: a tall matrix (rows > cols) is transposed first
so that ``X Xᵀ`` is the smaller Gram matrix, and transposed back at the end. ``dtype="auto"`` (the default
here, in the optimizer and in the config) is bfloat16 for a CUDA tensor, as in torch.optim.Muon and
Moonlight, and float32 elsewhere: CPUs without bf16 matrix units run bf16 matmuls ~20x slower than float32
(tiny preset: 1.1 s vs 0.05 s per Muon step on 2 EPYC cores). On a 2-D input the operations are exactly
those of ``torch.optim._muon._zeropower_via_newtonschulz`` (same casts, norm, clamp, ``addmm`` calls), so
with ``dtype=torch.bfloat16`` the result is bitwise that of PyTorch's Muon, and with ``float32`` bitwise
PyTorch's algorithm run in float32. A ``[..., n, m]`` input is a batch of independent matrices (a stack of
routed experts ``[E, out, in]``): each one is normalized by its own norm and iterated with batched products
(``baddbmm``).

One loop serves every case; only the two symmetric products of a step (``X Xᵀ`` and ``b A + c A²``) vary:
PyTorch's (``mm`` / ``addmm`` on a matrix, ``bmm`` / ``baddbmm`` on a batch) or optim/triton_ns.py's kernel,
which computes one triangle of each (about half the FLOPs): same math, fp32 accumulation, but no longer
bitwise torch.optim.Muon's. ``triton="auto"`` takes the kernel on a CUDA GPU (sm80+) with Triton installed
and PyTorch's products otherwise (always on CPU); ``True`` / ``False`` force the choice (``True`` on a CPU
tensor runs Triton's interpreter, which needs ``TRITON_INTERPRET=1``: the tests do this). The optimizer
passes the config's ``optim.ns_triton`` here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Quintic coefficients (a, b, c) of Keller Jordan's Muon, used by Moonlight, K2 and torch.optim.Muon."""

NS_STEPS = 5
NS_EPS = 1e-7
"""Lower clamp of the Frobenius norm (as torch.optim.Muon), so an all-zero update stays zero, not NaN."""


def zeropower_via_newtonschulz5(
    G: torch.Tensor,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype | str = "auto",
    triton: bool | str = "auto",
) -> torch.Tensor:
    """Approximately orthogonalize ``G`` (``[n, m]`` or a batch ``[..., n, m]`` of independent
    matrices) by ``steps`` quintic Newton–Schulz iterations computed in ``dtype`` (a torch dtype, or
    ``"auto"``: :func:`resolve_dtype`), the symmetric products on the Triton kernel when ``triton`` says so
    (``"auto"``, ``True`` or ``False``: see the module docstring).

    Returns a new tensor of ``G``'s shape and dtype (``G`` itself is never modified): ``U p(S) Vᵀ``
    where ``G = U S Vᵀ`` per matrix and ``p`` is the iterated polynomial applied to ``S / ||G||_F``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = NS_COEFFICIENTS
    n, m = G.shape[-2], G.shape[-1]
    dtype = resolve_dtype(dtype, G.device)
    # A matrix stays 2-D: torch.optim.Muon's exact ops (mm, addmm, one norm), hence its result bit for bit.
    # Anything else becomes one batch [B, n, m]: bmm / baddbmm, each matrix normalized by its own norm.
    X = G.to(dtype) if G.ndim == 2 else G.reshape(-1, n, m).to(dtype)
    if n > m:  # the wide orientation, where X Xᵀ is the smaller Gram matrix
        X = X.mT
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    X = X / norm.clamp(min=eps)
    gram, poly = _products(X, triton)
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        A = gram(X)  # X Xᵀ
        B = poly(A, b, c)  # b A + c A²
        X = addmm(X, B, X, beta=a)  # a X + B X
    if n > m:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """NS's compute dtype on ``device``: ``dtype`` itself, or for ``"auto"`` bfloat16 on CUDA and float32
    elsewhere (see the module docstring)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or 'auto', got {dtype!r}")
    return dtype


Gram = Callable[[torch.Tensor], torch.Tensor]
"""``gram(X) = X Xᵀ`` (``X``: ``[n, k]`` or ``[B, n, k]``)."""
Poly = Callable[[torch.Tensor, float, float], torch.Tensor]
"""``poly(A, b, c) = b A + c A A`` (``A`` symmetric)."""


def _torch_gram(X: torch.Tensor) -> torch.Tensor:
    return X @ X.mT  # on a matrix, torch.optim.Muon's `X @ X.T` (the same view)


def _torch_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    return (torch.addmm if A.ndim == 2 else torch.baddbmm)(A, A, A, beta=b, alpha=c)


def _triton_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    return _kernels().sym_square(A, add=A, alpha=c, beta=b)


def _products(X: torch.Tensor, triton: bool | str) -> tuple[Gram, Poly]:
    """The ``(gram, poly)`` pair NS on ``X`` (2-D or 3-D, in the compute dtype) uses: PyTorch's or the kernel's."""
    if triton not in ("auto", True, False):
        raise ValueError(f"triton must be 'auto', True or False, got {triton!r}")
    if triton is True or (triton == "auto" and _triton_auto(X)):
        return _kernels().sym_matmul, _triton_poly
    return _torch_gram, _torch_poly


def _triton_auto(X: torch.Tensor) -> bool:
    """``triton="auto"``: the kernel for a plain CUDA tensor (not a DTensor) on sm80+ in a dtype it supports,
    when Triton is installed."""
    if type(X) is not torch.Tensor or not X.is_cuda:
        return False
    if torch.cuda.get_device_capability(X.device) < (8, 0):
        return False
    kernels = _kernels()
    return kernels.triton is not None and X.dtype in kernels.SUPPORTED_DTYPES


def _kernels():
    """The module optim.triton_ns. Imported on first use rather than at the top because it imports Triton
    (~0.35 s), which every run that never takes the kernel (any CPU run) would pay for at start-up."""
    from optim import triton_ns

    return triton_ns


def ns_polynomial(s: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The scalar map the iteration applies to each normalized singular value, ``p`` composed
    ``steps`` times (for tests and analysis: ``svdvals(NS(G)) == ns_polynomial(svdvals(G) / ||G||_F)``
    up to rounding)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s
