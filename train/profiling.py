"""`train.profile`: trace chosen steps with torch.profiler, to see where time and memory go.

For the steps `[first, last]` every rank writes into `<out_dir>/profile/`:
- `trace-rank<R>-steps<first>-<last>.json`: a Chrome trace (open it in https://ui.perfetto.dev or
  chrome://tracing): CPU ops, CUDA kernels and the trainer's own regions (`chogori/forward_backward`,
  `chogori/clip_grad_norm`, `chogori/stats_reduce`, `chogori/optimizer_step`);
- `ops-rank<R>-steps<first>-<last>.txt`: the same ops as a table, sorted by total time, for a terminal;
- on CUDA, `memory-rank<R>-steps<first>-<last>.pickle`: a memory snapshot (every allocation with its Python
  stack) for https://pytorch.org/memory_viz.

docs/profiling.md walks through reading them. Outside the traced steps nothing is recorded: the profiler is
started before the first traced step and stopped after the last, so the run's other steps pay nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class StepProfiler:
    """Wraps the steps `steps` (a contiguous, ascending list of 1-based step numbers; empty = off)."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (min(steps), max(steps)) if steps else (0, -1)
        self.dir = Path(out_dir) / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._prof: Any = None
        self.written: list[Path] = []

    def before_step(self, step: int) -> None:
        """`step`: the number of the step about to run."""
        if step != self.first or self._prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            # Every allocation and free from here on, with its stack: the snapshot's timeline.
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                            with_stack=False)
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        """`step`: the number of the step just run. The last traced step (or a run that ends early) writes."""
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write what was recorded (also when the run stops before the last traced step)."""
        if self._prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"rank{self.rank}-steps{self.first}-{self.last}"
        trace = self.dir / f"trace-{tag}.json"
        prof.export_chrome_trace(str(trace))
        table = self.dir / f"ops-{tag}.txt"
        sort_by = "cuda_time_total" if self.cuda else "cpu_time_total"
        table.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        self.written += [trace, table]
        if self.cuda:
            snapshot = self.dir / f"memory-{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)


def region(name: str) -> Any:
    """A named region of the step in traces (`chogori/<name>`); costs microseconds when nothing records."""
    return torch.profiler.record_function(f"chogori/{name}")
