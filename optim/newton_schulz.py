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

Two opt-in variants (config ``optim.ns_method`` / ``optim.ns_gram``, both off by default, so the default stays
torch.optim.Muon's iteration): ``method="polar_express"`` changes the coefficients per step
(:data:`POLAR_EXPRESS_COEFFICIENTS`: same cost, singular values much closer to 1), and ``gram=True`` runs
matrices at least :data:`GRAM_MIN_ASPECT` times wider than tall in the Gram form (:func:`_gram_iterations`:
the same polynomial on the small Gram matrix, fewer FLOPs). :func:`orthogonalize_batched` hands every group of
same-shape matrices of a step to this function as one ``[B, n, m]`` stack (the optimizer's single-process path);
the owners of optim/distributed_ns.py call it once per tensor on the ``[k, n, m]`` matrices they own of it. Every
path runs this one function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optim.choices import NS_METHODS

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Quintic coefficients (a, b, c) of Keller Jordan's Muon, used by Moonlight, K2 and torch.optim.Muon."""

NS_STEPS = 5
NS_EPS = 1e-7
"""Lower clamp of the Frobenius norm (as torch.optim.Muon), so an all-zero update stays zero, not NaN."""

POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.386894, -24.371315, 17.726415),  # [0.001, 1.01]  -> [0.0084, 1.9916]
    (4.143016, -3.018622, 0.552651),  # -> [0.0347, 1.9653]
    (3.931203, -2.874124, 0.536723),  # -> [0.1365, 1.8635]
    (3.282834, -2.416580, 0.486534),  # -> [0.4419, 1.5581]
    (2.285007, -1.632388, 0.403069),  # -> [0.8756, 1.1244]
    (1.882282, -1.248533, 0.366556),  # -> [0.9986, 1.0014]
    (1.865378, -1.230820, 0.365442),  # -> [1.0000, 1.0000]; later steps repeat this one
)
"""Per-step quintic coefficients (a, b, c) for ``method="polar_express"`` (the greedy minimax idea of Amsel,
Persson, Musco and Gower, "The Polar Express", 2025; these numbers derived here, not taken from their code):
step k's odd quintic ``p_k`` minimizes ``max |1 - p_k(x)|`` over ``[l_k, 1.01 u_k]``, where ``[l_0, u_0] =
[1e-3, 1]`` and ``[l_{k+1}, u_{k+1}]`` is the image of step k's interval (the comments). The 1% margin keeps a
singular value that rounding puts slightly above the interval from blowing up in the next step. Each step's
polynomial depends only on the steps before it, so the table serves any ``ns_steps`` (steps past its end repeat
its last row). Derived by a linear program on a grid (scipy.optimize.linprog; tests/test_muon.py re-derives
the first rows when scipy is installed). After 5 steps every singular value in ``[1e-3, 1]`` of the norm is in
[0.876, 1.124], against [0.68, 1.20] (of those above 2e-3) for the fixed quintic."""

GRAM_MIN_ASPECT = 2
"""``gram=True`` runs the Gram form on matrices with ``max(n, m) >= GRAM_MIN_ASPECT * min(n, m)``: with
``r = max/min``, 5 steps of the usual form cost ``(20 r + 10) n³`` multiply-adds x2 and the Gram form
``(4 r + 34) n³``, so it pays from r = 1.5 on (r = 2: 0.84x, r = 3: 0.66x, r = 4: 0.56x)."""


def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` per-step coefficients (a, b, c) of ``method`` (:data:`NS_METHODS`)."""
    if method == "muon":
        return [NS_COEFFICIENTS] * steps
    if method == "polar_express":
        table = POLAR_EXPRESS_COEFFICIENTS
        return [table[min(k, len(table) - 1)] for k in range(steps)]
    raise ValueError(f"method must be one of {', '.join(NS_METHODS)}, got {method!r}")


def zeropower_via_newtonschulz5(
    G: torch.Tensor,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype | str = "auto",
    triton: bool | str = "auto",
    method: str = "muon",
    gram: bool = False,
) -> torch.Tensor:
    """Approximately orthogonalize ``G`` (``[n, m]`` or a batch ``[..., n, m]`` of independent
    matrices) by ``steps`` quintic Newton–Schulz iterations computed in ``dtype`` (a torch dtype, or
    ``"auto"``: :func:`resolve_dtype`), the symmetric products on the Triton kernel when ``triton`` says so
    (``"auto"``, ``True`` or ``False``: see the module docstring). ``method`` picks the per-step
    coefficients (:func:`ns_coefficients`: ``"muon"``, the default, is torch.optim.Muon's fixed quintic;
    ``"polar_express"`` the per-step ones); ``gram=True`` runs matrices at least :data:`GRAM_MIN_ASPECT` times
    wider than tall in the Gram form (:func:`_gram_iterations`: the same polynomial, fewer FLOPs). Both are
    opt-in; the defaults are the exact operations described in the module docstring.

    Returns a new tensor of ``G``'s shape and dtype (``G`` itself is never modified): ``U p(S) Vᵀ``
    where ``G = U S Vᵀ`` per matrix and ``p`` is the iterated polynomial applied to ``S / ||G||_F``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    coefficients = ns_coefficients(method, steps)
    n, m = G.shape[-2], G.shape[-1]
    dtype = resolve_dtype(dtype, G.device)
    # A matrix stays 2-D: torch.optim.Muon's exact ops (mm, addmm, one norm), hence its result bit for bit.
    # Anything else becomes one batch [B, n, m]: bmm / baddbmm, each matrix normalized by its own norm.
    X = G.to(dtype) if G.ndim == 2 else G.reshape(-1, n, m).to(dtype)
    if n > m:  # the wide orientation, where X Xᵀ is the smaller Gram matrix
        X = X.mT
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    X = X / norm.clamp(min=eps)
    gram_fn, poly = _products(X, triton)
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    if gram and steps > 0 and max(n, m) >= GRAM_MIN_ASPECT * min(n, m):
        if X.element_size() < 4:  # the squared spectrum needs float32 at least (see _gram_iterations)
            X = X.float()
            gram_fn, poly = _products(X, triton)
        X = _gram_iterations(X, coefficients, gram_fn, poly).to(dtype)
    else:
        for a, b, c in coefficients:
            A = gram_fn(X)  # X Xᵀ
            B = poly(A, b, c)  # b A + c A²
            X = addmm(X, B, X, beta=a)  # a X + B X
    if n > m:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def _gram_iterations(X: torch.Tensor, coefficients: list[tuple[float, float, float]], gram: Gram,
                     poly: Poly) -> torch.Tensor:
    """The NS steps on a wide ``X`` (``[n, m]`` or ``[B, n, m]``, ``n`` well below ``m``, already normalized),
    computed on ``n x n`` matrices only. Each step maps ``X <- P X`` with ``P = a I + b A + c A²`` a polynomial
    in ``A = X Xᵀ``, so after k steps ``X_k = Q_k X_0`` with ``Q_k = P_{k-1} ... P_0``, and since ``P`` commutes
    with ``A``, the next Gram matrix is ``A_{k+1} = P A Pᵀ = A P²``: the iteration never touches the long side
    except for ``A_0 = X_0 X_0ᵀ`` and the final ``Q X_0``. Per step ``A²`` (``poly``), ``A P`` and ``(A P) P``
    (not after the last step) and ``P Q`` (not at the first), all ``n x n``; ``A`` is re-symmetrized after each
    update (``(A + Aᵀ) / 2``) so that rounding does not accumulate an antisymmetric part. The same polynomial as
    the usual form, hence the same singular values up to rounding (tests/test_muon.py compares both, and a
    float64 reference, on ill-conditioned inputs).

    Rounding acts on ``A``, i.e. on squared singular values: float32's ~1e-7 of ``||A||`` is ~3e-4 of the norm
    in singular-value terms, so directions below that come out noisier than in the usual form (relative error of
    the whole result, float32, measured 1e-6 on random inputs and up to 9e-4 on cond-1e4..1e8 inputs, against
    ~1e-5 for the usual form). In bfloat16 the small directions are lost and the error explodes (1e1..1e7 in the
    same measurement), so the caller runs this in float32 at least."""
    A = gram(X)
    Q = None
    last = len(coefficients) - 1
    for k, (a, b, c) in enumerate(coefficients):
        P = poly(A, b, c)  # b A + c A²
        P.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
        Q = P if Q is None else P @ Q
        if k < last:
            A = (A @ P) @ P
            A = (A + A.mT) * 0.5
    return Q @ X


def block_step(X: torch.Tensor, A: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One step of the iteration on a block of columns ``X_j`` of a wide ``X`` (``[n, m_j]``), given the whole
    Gram matrix ``A = X Xᵀ`` (optim/distributed_ns.py sums it over the members of a team, each holding a block):
    ``a X_j + (b A + c A²) X_j``, computed as ``a X_j + A (b X_j + c A X_j)``. The same polynomial, but without
    ``A²``: its ``2 n³`` FLOPs do not split over blocks, while these products (``4 n² m_j``) do."""
    Y = torch.addmm(X, A, X, beta=b, alpha=c)  # b X + c A X
    return torch.addmm(X, A, Y, beta=a)  # a X + A Y


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


def ns_polynomial(s: torch.Tensor, steps: int = NS_STEPS, method: str = "muon") -> torch.Tensor:
    """The scalar map the iteration applies to each normalized singular value, the step polynomials
    composed ``steps`` times (for tests and analysis: ``svdvals(NS(G)) == ns_polynomial(svdvals(G) /
    ||G||_F)`` up to rounding)."""
    for a, b, c in ns_coefficients(method, steps):
        s = a * s + b * s**3 + c * s**5
    return s


LOCAL_BATCH_NUMEL = 1 << 24
"""Default bound of one stacked NS input in the single-process path (elements; 64 MiB of float32): a stack may
hold at most ``max(LOCAL_BATCH_NUMEL, the largest single update)`` elements, so that batching never multiplies
NS's working set (the stack and its 3-4 intermediates) on a large model."""


def orthogonalize_batched(updates: list[torch.Tensor], ns: Callable[[torch.Tensor], torch.Tensor],
                          max_numel: int = LOCAL_BATCH_NUMEL, batch_cpu: bool = False) -> list[torch.Tensor]:
    """``[ns(u) for u in updates]`` with the plain tensors of the same matrix shape ``[n, m]``, dtype and device
    orthogonalized together, one call on their stack ``[B, n, m]`` (a ``[E, n, m]`` expert stack counts ``E``):
    one batched NS instead of B small ones (fewer launches on a GPU; on a CPU the per-matrix products dominate
    and it is about even). A stack holds at most ``max(max_numel, largest update)`` elements (consecutive
    tensors of the group fill it; ``max_numel=0``: never larger than the largest single input, i.e. no more NS
    memory than unbatched). A tensor alone in its stack is passed as it is (a
    matrix keeps the exact 2-D path). ``ns`` must treat leading dims as a batch of independent matrices, as
    :func:`zeropower_via_newtonschulz5` does; on the CPUs tested here ``bmm`` gives the same bits as ``mm`` per
    matrix (tests/test_muon.py asserts it to 1e-6). Subclasses (a DTensor) are passed one by one.

    CPU tensors are passed one by one too unless ``batch_cpu``: on the 2-core EPYC of docs/bench_optim.md (e),
    one thread, NS on a stack of 6 same-shape matrices took 0.98-1.23x the time of 6 separate calls (the
    ``torch.cat`` copy, and MKL's batched GEMM on the transposed tall views), so stacking only pays where launches
    cost something (a GPU)."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        if type(u) is not torch.Tensor or u.ndim < 2 or u.numel() == 0 or (u.device.type == "cpu" and not batch_cpu):
            out[i] = ns(u)
        else:
            groups.setdefault((tuple(u.shape[-2:]), u.dtype, u.device), []).append(i)
    cap = max([max_numel] + [updates[i].numel() for idx in groups.values() for i in idx])
    for (shape, _, _), idx in groups.items():
        stacks: list[list[int]] = []
        size = cap + 1
        for i in idx:
            if size + updates[i].numel() > cap:
                stacks.append([])
                size = 0
            stacks[-1].append(i)
            size += updates[i].numel()
        for stack in stacks:
            if len(stack) == 1:
                out[stack[0]] = ns(updates[stack[0]])
                continue
            flat = [updates[i].reshape(-1, *shape) for i in stack]
            res = ns(torch.cat(flat))
            for i, piece in zip(stack, res.split([f.shape[0] for f in flat]), strict=True):
                out[i] = piece.reshape(updates[i].shape)
    return out  # type: ignore[return-value]
