"""Marks every test under tests/gpu `gpu` and skips it without a CUDA device.

`CHOGORI_GPU_TESTS_DEVICE=cpu` is an opt-in dry run of the suite's logic on CPU (for developing it on a machine
without a GPU): the device-generic tests then run on CPU, and the ones that only mean something on CUDA (flex
attention's max scores, two GPUs) skip with their reason. The Triton test dry-runs only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DEVICE_ENV = "CHOGORI_GPU_TESTS_DEVICE"
HERE = Path(__file__).resolve().parent


def dry_run() -> bool:
    """True when the suite is asked to run on CPU (CHOGORI_GPU_TESTS_DEVICE=cpu)."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if value not in ("", "cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_ENV} must be 'cuda' (the default) or 'cpu', got {value!r}")
    return value == "cpu"


@pytest.hookimpl(tryfirst=True)  # before `-m` selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None
    if not dry_run() and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"needs a CUDA device (or {DEVICE_ENV}=cpu for a CPU dry run)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_leftover_process_group() -> None:
    """A default process group left initialized by an earlier test module (a gloo one from a CPU test, say) would
    be taken over by the next Trainer on CUDA: start every test here without one. The suite's own trainers leave
    theirs (Trainer.close)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def loud_recompile_limit() -> Iterator[None]:
    """flex_attention is compiled for static shapes (models/attention.py), so each new shape, dtype or mask layout
    is one more compiled entry of the same function, and this suite makes more than dynamo's limit of 8 in one
    session; past it dynamo would silently run eager flex_attention (the unfused reference, not the kernel under
    test). Allow 64, and fail rather than fall back."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the suite runs on: cuda (the current device), or cpu in a dry run."""
    return torch.device("cpu") if dry_run() else torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the builtin corpus for every trainer run of the session (tokenized once)."""
    return tmp_path_factory.mktemp("corpus-cache")
