"""What the benchmarks print about the machine they ran on, and a shared profiling helper."""

from __future__ import annotations

import cProfile
import io
import platform
import pstats
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
