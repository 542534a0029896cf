"""Shared pytest fixtures (keep this file small: only fixtures several test files use)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from models import ModelConfig
from tests.dist_harness import FourRankRun, four_rank_overrides, torchrun

# A DeepSeek-V3-shaped network small enough for CPU tests: MLA with q_lora, 1 dense + 2 MoE layers,
# 8 routed experts (2 per token), 1 shared expert.
TINY_MODEL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
    n_group=1, topk_group=1, rope_theta=10000.0, max_position_embeddings=256, initializer_range=0.1,
)


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    """Factory: `tiny_config(**overrides)` -> a small, valid ModelConfig."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY_MODEL, **overrides})

    return make


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module's tests with one intra-op thread (restored afterwards): for tiny tensors extra threads
    only add overhead, and they spin badly when the CPU is shared. Use with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROJECT_PACKAGES = ("models", "optim", "parallel", "data", "train", "launch", "tools", "bench", "tests")


def _compile_project_bytecode() -> None:
    """Write the project's .pyc files once, up front: the suite starts a few hundred Python processes (CLI runs,
    torchrun ranks), and where PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) each would
    otherwise compile every project module from source again, ~0.2 s of its start-up. Python still reads .pyc
    files under that setting; it only never writes them."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    for package in PROJECT_PACKAGES:
        compileall.compile_dir(root / package, quiet=2)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the project's bytecode (above), and start building DeepSpeed's CPU Adam op (tests/test_offload.py
    needs it) in the background at low priority, so that its one-off JIT compile (about a minute on 2 cores)
    overlaps the tests before it instead of adding to them. torch's extension builder locks its cache, so the test
    that loads the op waits for this build or finds it done; once built (TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions) this returns in a second."""
    if sys.dont_write_bytecode:
        _compile_project_bytecode()
    if importlib.util.find_spec("deepspeed") is None or os.environ.get("CHOGORI_NO_PREBUILD"):
        return
    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)"
    subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     preexec_fn=lambda: os.nice(19) if hasattr(os, "nice") else None)  # noqa: PLW1509


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start tests/test_simulate.py's world-2048 simulations as soon as the session is known to run them: they run
    in the background at low priority while the tests before them leave CPU idle (the suite keeps ~1.1 of 2 cores
    busy), instead of adding ~100 s at the end."""
    if config.option.collectonly:
        return
    if any(item.path.name == "test_simulate.py" and item.name.startswith("test_world_2048") for item in items):
        from tests.test_simulate import start_simulations

        start_simulations()


@pytest.fixture(scope="session")
def four_rank_run(tmp_path_factory: pytest.TempPathFactory) -> FourRankRun:
    """One real `torchrun --nproc-per-node 4` run of the trainer with expert parallelism (tests/dist_harness.py
    `four_rank_overrides`), shared by the tests that check what such a run produces (its losses against one
    process, exact resume, resharding, export): on 2 cores each 4-process launch costs half a minute."""
    root = tmp_path_factory.mktemp("four-rank")
    out, cache = root / "run", str(root / "cache")
    done = torchrun(4, four_rank_overrides(out, cache, **{"parallel.ep": 2, "checkpoint.interval": 4,
                                                         "checkpoint.keep_last": 3, "checkpoint.async_save": "true"}))
    return FourRankRun(out=out, cache_dir=cache, stdout=done.stdout)
