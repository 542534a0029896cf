"""Triton kernel for the symmetric products inside Newton–Schulz: ``C = alpha * X Xᵀ (+ beta * D)``.

Each quintic NS step (optim/newton_schulz.py, which calls this module; this module knows nothing of NS)
computes two symmetric matrices::

    A = X Xᵀ                     (X: [n, k], A: [n, n] symmetric)
    B = b A + c A A = b A + c A Aᵀ  (A symmetric, so A A = A Aᵀ; B symmetric)

A general matmul computes all ``n²`` entries of both. This kernel (a SYRK: "symmetric rank-k update")
tiles ``C`` in ``BLOCK x BLOCK`` blocks and launches one program per block on or below the diagonal
(block row ``i >= `` block column ``j``): ``T (T + 1) / 2`` programs instead of ``T²`` for ``T = ceil(n /
BLOCK)``, so about half the FLOPs. Each off-diagonal block is stored twice, at ``(i, j)`` and, transposed,
at ``(j, i)``. A diagonal block stores its lower triangle and mirrors it into the upper one, so the output
is symmetric bit for bit (``C == C.T`` exactly), whatever order the hardware sums the products in.

Products accumulate in float32 and the result is rounded once to ``X``'s dtype, after the optional
epilogue ``alpha * acc + beta * D`` (``D`` symmetric, e.g. ``A`` itself for ``B``), which mirrors
``torch.addmm(D, X, X.T, beta=beta, alpha=alpha)``. float32 inputs use IEEE fp32 products unless
``torch.get_float32_matmul_precision()`` allows TF32 (as PyTorch's own matmul does). Shapes need not be
multiples of the block (masked loads and stores); ``[B, n, k]`` is a batch of independent matrices (a
second grid axis); strides are arbitrary (a transposed view needs no copy).

The kernel is built lazily on first use, for the mode Triton is in at that moment: with the environment
variable ``TRITON_INTERPRET=1`` it runs on CPU tensors through Triton's interpreter (the tests do this),
otherwise it is compiled for the GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: without it the module still imports and `available()` says False.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """True when Triton can be imported and there is something to run it on: a CUDA device, or the
    interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpret_mode()


def _syrk_body(x_ptr, d_ptr, c_ptr, N, K,
               stride_xb, stride_xn, stride_xk,
               stride_db, stride_dm, stride_dn,
               stride_cb, stride_cm, stride_cn,
               alpha, beta,
               HAS_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    # Left undecorated (annotations are strings under `from __future__ import annotations`): `_kernel()` jits
    # it on first use, so the module imports without Triton and the interpreter can be switched on late.
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    # Linear index over the lower block triangle -> (i, j), j <= i: pid = i (i + 1) / 2 + j. The float
    # sqrt estimate is corrected by one step either way (exact for any grid that fits in int32).
    pf = pid.to(tl.float32)
    i = ((tl.sqrt(8.0 * pf + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    j = pid - i * (i + 1) // 2

    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_n = j * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + bid * stride_xb
    a_ptrs = x_base + offs_m[:, None] * stride_xn + offs_k[None, :] * stride_xk  # rows i-block of X
    b_ptrs = x_base + offs_n[None, :] * stride_xn + offs_k[:, None] * stride_xk  # (rows j-block of X)ᵀ
    mask_m = offs_m < N
    mask_n = offs_n < N

    acc = tl.full((BLOCK, BLOCK), 0.0, tl.float32)  # builtins only (no tl.zeros, tl.cdiv): see _kernel()
    for kb in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        kk = kb * BLOCK_K + offs_k
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & (kk[:, None] < K), other=0.0)
        if UPCAST:  # interpreter only: its dot multiplies bf16 as raw uint16 bits. bf16 x bf16 is exact in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    out = acc * alpha
    if HAS_D:
        d_ptrs = d_ptr + bid * stride_db + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
        d = tl.load(d_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        out += beta * d.to(tl.float32)
    out = out.to(c_ptr.dtype.element_ty)

    c_base = c_ptr + bid * stride_cb
    # Block (i, j) where row >= col, and its transpose at (j, i) where row < col. Off the diagonal (i > j)
    # every row of block i is past every column of block j, so both conditions hold on the whole block;
    # on a diagonal block they keep the lower triangle and mirror it into the strictly upper one.
    c_ptrs = c_base + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    lower = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] >= offs_n[None, :])
    tl.store(c_ptrs, out, mask=lower)
    ct_ptrs = c_base + offs_n[:, None] * stride_cm + offs_m[None, :] * stride_cn
    upper = mask_n[:, None] & mask_m[None, :] & (offs_n[:, None] < offs_m[None, :])
    tl.store(ct_ptrs, tl.trans(out), mask=upper)


_KERNELS: dict[bool, object] = {}


def _kernel():
    """The jitted kernel for the current mode (interpreter or GPU), built on first use: `triton.jit` decides
    between the two when it is applied, so deferring it lets a test set TRITON_INTERPRET after imports.
    Triton's own `@jit` helpers (`tl.zeros`, `tl.cdiv`, ...) are decided once, when triton is imported; the
    kernel calls only builtins (`tl.full`, `tl.dot`, ...) so that it interprets even when triton was imported
    before TRITON_INTERPRET was set."""
    interpret = _interpret_mode()
    if interpret not in _KERNELS:
        if triton is None:
            raise RuntimeError("optim.triton_ns needs Triton (pip install triton)")
        _KERNELS[interpret] = triton.jit(_syrk_body)
    return _KERNELS[interpret]


def _block_sizes(n: int, dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, num_stages). The interpreter gets the smallest tile `tl.dot` accepts
    (16): it runs every program in numpy, where tiny tiles are the fastest. On the GPU: 128-row tiles
    for large matrices, 64 when that would leave too few programs to fill the SMs."""
    if not on_gpu:
        return 16, 16, 4, 1
    block = 128 if n >= 4096 else 64
    block_k = 32 if dtype == torch.float32 else 64
    warps = 8 if block == 128 else 4
    return block, block_k, warps, 3


def sym_matmul(
    x: torch.Tensor,
    *,
    add: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    block: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``alpha * x @ xᵀ + beta * add`` for ``x`` of shape ``[n, k]`` or ``[B, n, k]``, computing only the
    blocks on and below the diagonal (see the module docstring). ``add`` (optional, shape of the result)
    must be symmetric for the result to be; ``beta`` is ignored without it. Returns a new tensor of
    ``x``'s dtype, exactly symmetric. ``block``/``block_k`` override the tile sizes (powers of 2, >= 16).
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"sym_matmul needs [n, k] or [B, n, k], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sym_matmul supports {SUPPORTED_DTYPES}, got {x.dtype}")
    on_gpu = x.is_cuda
    if not on_gpu and not _interpret_mode():
        raise RuntimeError("sym_matmul on a CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1)")
    squeeze = x.ndim == 2
    x3 = x.unsqueeze(0) if squeeze else x
    nb, n, k = x3.shape
    c = torch.empty(nb, n, n, dtype=x.dtype, device=x.device)
    if add is not None:
        if tuple(add.shape) != ((n, n) if squeeze else (nb, n, n)):
            raise ValueError(f"add must have the result's shape, got {tuple(add.shape)} for x {tuple(x.shape)}")
        d3 = add.unsqueeze(0) if squeeze else add
    else:
        d3 = c  # never read (HAS_D=False); any pointer with valid strides will do
    if n == 0 or nb == 0:
        return c.squeeze(0) if squeeze else c
    BLOCK, BLOCK_K, warps, stages = _block_sizes(n, x.dtype, on_gpu)
    BLOCK = block or BLOCK
    BLOCK_K = block_k or BLOCK_K
    if BLOCK < 16 or BLOCK & (BLOCK - 1) or BLOCK_K < 16 or BLOCK_K & (BLOCK_K - 1):
        raise ValueError(f"block sizes must be powers of 2 >= 16, got {BLOCK}, {BLOCK_K}")
    precision = "ieee"
    if x.dtype == torch.float32 and on_gpu and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    t = -(-n // BLOCK)
    grid = (t * (t + 1) // 2, nb)
    launch = {} if not on_gpu else {"num_warps": warps, "num_stages": stages}
    with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
        _kernel()[grid](
            x3, d3, c, n, k,
            x3.stride(0), x3.stride(1), x3.stride(2),
            d3.stride(0), d3.stride(1), d3.stride(2),
            c.stride(0), c.stride(1), c.stride(2),
            float(alpha), float(beta),
            HAS_D=add is not None, BLOCK=BLOCK, BLOCK_K=BLOCK_K, PRECISION=precision,
            UPCAST=not on_gpu and x.dtype == torch.bfloat16,
            **launch,
        )
    return c.squeeze(0) if squeeze else c


def sym_square(a: torch.Tensor, *, add: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0,
               block: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``alpha * a @ a + beta * add`` for a symmetric ``a`` (``[n, n]`` or ``[B, n, n]``): since ``a = aᵀ``,
    ``a @ a = a @ aᵀ``, the same kernel as `sym_matmul`. ``sym_square(A, add=A, alpha=c, beta=b)`` is
    NS's ``B = b A + c A²``. Symmetry of ``a`` is the caller's promise (not checked: it would cost a pass)."""
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"sym_square needs square matrices, got shape {tuple(a.shape)}")
    return sym_matmul(a, add=add, alpha=alpha, beta=beta, block=block, block_k=block_k)

