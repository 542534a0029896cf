"""Speed of the Triton SYRK kernel (optim/triton_ns.py) against cuBLAS, on one GPU.

    python bench/ns_triton.py --sizes 1024 2048 4096 8192 --dtype bf16

For each n: ``sym_matmul(x)`` vs ``torch.matmul(x, x.T)`` on a square ``[n, n]`` x (the Gram matrix ``A = X Xᵀ``
of an NS step, and with it the ``A²`` product), and a whole 5-step NS: PyTorch's
(``zeropower_via_newtonschulz5(triton=False)``) vs the kernel's (``triton=True``). The SYRK
does half the FLOPs of the full product, so 2x is its ceiling; TFLOP/s are counted on the full product's
``2 n² k`` FLOPs for both, so the columns compare directly. Needs CUDA and Triton; exits otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from optim import triton_ns  # noqa: E402
from optim.newton_schulz import zeropower_via_newtonschulz5  # noqa: E402


def timeit(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/ns_triton.py needs a CUDA GPU (the kernel's CPU path is Triton's interpreter, "
                 "which checks correctness, not speed): nothing to measure here.")
    if triton_ns.triton is None:
        sys.exit("bench/ns_triton.py needs Triton (pip install triton).")
    os.environ.pop("TRITON_INTERPRET", None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, median of {args.iters}")
    print("| n | torch X·Xᵀ ms | SYRK ms | TFLOP/s torch / SYRK | speed-up | max abs err | "
          "NS torch ms | NS Triton ms | NS speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        x = torch.randn(n, n, device="cuda", dtype=dtype) / n**0.5
        t_ref = timeit(lambda x=x: torch.matmul(x, x.T), iters=args.iters)
        t_syrk = timeit(lambda x=x: triton_ns.sym_matmul(x), iters=args.iters)
        err = (triton_ns.sym_matmul(x).float() - torch.matmul(x, x.T).float()).abs().max().item()
        flops = 2 * n**3
        t_ns = timeit(lambda x=x: zeropower_via_newtonschulz5(x, dtype=dtype, triton=False), iters=args.iters)
        t_ns_tr = timeit(lambda x=x: zeropower_via_newtonschulz5(x, dtype=dtype, triton=True), iters=args.iters)
        print(f"| {n} | {t_ref:.3f} | {t_syrk:.3f} | {flops / t_ref / 1e9:.0f} / {flops / t_syrk / 1e9:.0f} | "
              f"{t_ref / t_syrk:.2f}x | {err:.2e} | {t_ns:.2f} | {t_ns_tr:.2f} | {t_ns / t_ns_tr:.2f}x |")


if __name__ == "__main__":
    main()
