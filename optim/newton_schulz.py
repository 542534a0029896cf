"""Newton–Schulz orthogonalization, the core of Muon: ``G = U S Vᵀ  ->  ~ U Vᵀ`` without an SVD.

The quintic iteration (Keller Jordan's Muon; Moonlight; Kimi K2) on ``X0 = G / ||G||_F``:

    A = X Xᵀ;   B = b A + c A²;   X <- a X + B X        (a, b, c) = (3.4445, -4.7750, 2.0315)

acts on each singular value separately, ``s <- p(s) = a s + b s³ + c s⁵``, and keeps the singular
vectors. Dividing by the Frobenius norm puts every singular value in ``(0, 1]``; the coefficients
maximize the slope at 0 (``p'(0) = a``, so tiny singular values grow ``a^steps`` ≈ 490x in 5 steps)
at the price of not converging to exactly 1: after 5 steps every singular value that started above
~2e-3 of the norm ends in roughly [0.68, 1.13] (the tests measure the band), which Muon does not mind.

The products run in ``dtype`` (bfloat16 by default, as in torch.optim.Muon and Moonlight) on the
"wide" orientation: a tall matrix (rows > cols) is transposed first so that ``X Xᵀ`` is the smaller
Gram matrix, and transposed back at the end. On a 2-D input the operations are exactly those of
``torch.optim._muon._zeropower_via_newtonschulz`` (same casts, norm, clamp, ``addmm`` calls), so with
``dtype=torch.bfloat16`` the result is bitwise that of PyTorch's Muon, and with ``float32`` bitwise
PyTorch's algorithm run in float32. A ``[..., n, m]`` input is a batch of independent matrices (a
stack of routed experts ``[E, out, in]``): each one is normalized by its own norm and iterated with
batched products (``baddbmm``).

On a CUDA GPU (sm80+) with Triton, the two symmetric products of each step (``X Xᵀ`` and ``b A + c A²``) run
on optim/triton_ns.py's kernel, which computes one triangle (about half the FLOPs): same math, fp32
accumulation, but no longer bitwise torch.optim.Muon's. ``CHOGORI_TRITON_NS=0`` keeps PyTorch's products
there too; on CPU they are always PyTorch's.
"""

from __future__ import annotations

import os

import torch

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Quintic coefficients (a, b, c) of Keller Jordan's Muon, used by Moonlight, K2 and torch.optim.Muon."""

NS_STEPS = 5
NS_EPS = 1e-7
"""Lower clamp of the Frobenius norm (as torch.optim.Muon), so an all-zero update stays zero, not NaN."""


def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalize ``G`` (``[n, m]`` or a batch ``[..., n, m]`` of independent
    matrices) by ``steps`` quintic Newton–Schulz iterations computed in ``dtype``.

    Returns a new tensor of ``G``'s shape and dtype (``G`` itself is never modified): ``U p(S) Vᵀ``
    where ``G = U S Vᵀ`` per matrix and ``p`` is the iterated polynomial applied to ``S / ||G||_F``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = NS_COEFFICIENTS
    n, m = G.shape[-2], G.shape[-1]
    transpose = n > m
    if G.ndim == 2:
        # Exactly torch.optim.Muon's sequence of ops (bitwise-equal results in the same dtype).
        X = G.to(dtype)
        if transpose:
            X = X.T
        X = X / X.norm().clamp(min=eps)
        sym = _triton_sym(X)
        for _ in range(steps):
            if sym is not None:  # CUDA only: one triangle of each symmetric product
                A = sym.sym_matmul(X)
                B = sym.sym_square(A, add=A, alpha=c, beta=b)
            else:
                A = X @ X.T
                B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        if transpose:
            X = X.T
        return X.to(G.dtype)

    batch_shape = G.shape[:-2]
    X = G.reshape(-1, n, m).to(dtype)
    if transpose:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    sym = _triton_sym(X)
    for _ in range(steps):
        if sym is not None:  # CUDA only: one triangle of each symmetric product
            A = sym.sym_matmul(X)
            B = sym.sym_square(A, add=A, alpha=c, beta=b)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transpose:
        X = X.mT
    return X.reshape(*batch_shape, n, m).to(G.dtype)


def _triton_sym(X: torch.Tensor):
    """The module optim.triton_ns when NS on ``X`` should take its symmetric products from the Triton kernel:
    ``X`` a 2-D or 3-D CUDA tensor (sm80+) in float32/bfloat16/float16, Triton importable, and the environment
    variable ``CHOGORI_TRITON_NS`` not ``0``. None otherwise (always on CPU): PyTorch's products."""
    if type(X) is not torch.Tensor or not X.is_cuda or X.ndim not in (2, 3):  # not DTensors either
        return None
    if os.environ.get("CHOGORI_TRITON_NS", "1") == "0":
        return None
    if torch.cuda.get_device_capability(X.device) < (8, 0):
        return None
    try:
        from optim import triton_ns
    except ImportError:
        return None
    if triton_ns.triton is None or X.dtype not in triton_ns.SUPPORTED_DTYPES:
        return None
    return triton_ns


def ns_polynomial(s: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The scalar map the iteration applies to each normalized singular value, ``p`` composed
    ``steps`` times (for tests and analysis: ``svdvals(NS(G)) == ns_polynomial(svdvals(G) / ||G||_F)``
    up to rounding)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s
