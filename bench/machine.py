"""What the benchmarks print about the machine they ran on, and a shared profiling helper."""

from __future__ import annotations

import cProfile
import io
import platform
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal and thousands separators."""
    return f"{1e3 * seconds:,.1f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_top(fn: Callable[[], Any], lines: int) -> tuple[Any, str]:
    """(fn's result, cProfile's top `lines` functions by own time, from the column header on)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        result = fn()
    finally:
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(lines)
    body = out.getvalue()
    return result, (body[body.find("ncalls"):] if "ncalls" in body else body).rstrip()


def matmul_peak_tflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> float:
    """A measured matmul peak of this machine: 2*n^3 / t of an n x n `torch.mm`, best of `repeats` (after one
    warmup call). The denominator of a CPU MFU, where no datasheet peak applies."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)  # first call pays for thread-pool start-up and allocation
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12
