"""Expensive multi-process work that tests read, started in the background as soon as collection knows a selected
test needs it (tests/conftest.py `pytest_collection_modifyitems`), instead of when the test is reached.

On 2 cores the serial suite keeps about 1.2 busy (session 9: 1,216 CPU-seconds in a 1,006 s run): single-process
tests leave the second core idle and tests waiting on signals or sockets leave both. The shared 4-rank run and its
stop/resume twin, the README's commands and the world-2048 simulations run here, at most two jobs at a time (the
simulations peak at 11 GB each), their processes at nice 10 so the foreground tests keep priority; a test then waits
for its job. The work and every assertion are those of running it inside the test; only the start moves earlier,
and an assertion failing in a job is raised again by the test that reads it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_POOL: ThreadPoolExecutor | None = None
_JOBS: dict[str, Future] = {}
_ROOT: Path | None = None


def lower_priority() -> None:
    """`preexec_fn` for a background job's processes: nice 10."""
    os.nice(10)


def workdir() -> Path:
    """A temporary directory for background jobs' files (removed when the session's process exits)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="chogori-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def start(name: str, job: Callable[[], Any]) -> Future:
    """Submit `job` under `name` unless it already was (first come, first run; two at a time)."""
    global _POOL
    if name not in _JOBS:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="background-fixture")
        _JOBS[name] = _POOL.submit(job)
    return _JOBS[name]


def result(name: str, job: Callable[[], Any]) -> Any:
    """The result of job `name` (started now if collection did not start it), raising what it raised."""
    return start(name, job).result()
