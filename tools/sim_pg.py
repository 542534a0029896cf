"""A process group for simulating one rank of a large world in one process, recording every collective.

torch's fake process group (`torch.testing._internal.distributed.fake_pg`) lets one process play rank r of a
2048-rank world, but it "hallucinates" results by copying the input into every peer's slot, which takes
minutes for one all-gather of a transformer block at world 2048. This group, a Python `ProcessGroup` like
torch's own threaded test group, instead returns at once with results that are cheap, finite and of the right
shape, and records each call:

- gathers and reduce-scatters leave zeros (the values of a simulated step are meaningless; their sizes are not);
- all-to-alls mirror the input when the sizes allow (every peer is assumed to send this rank what this rank
  sends it: exact under balanced routing, which is how the simulation routes), so expert-parallel split
  sizes exchanged through the group stay consistent;
- all-reduces leave the tensor as is.

Bytes per call are the payload this rank receives under the usual algorithms (ring all-gather / reduce-scatter
/ all-reduce, direct all-to-all, gather to and scatter from a root), and the buffer size of the call.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

BACKEND = "chogori_sim"


@dataclass(frozen=True)
class Collective:
    phase: str
    op: str
    group_size: int
    buffer_bytes: int  # size of the largest buffer of the call (gathered output, scattered input, ...)
    recv_bytes: int  # payload this rank receives


@dataclass
class Ledger:
    """Every collective the simulated rank issued, tagged with the phase set by the caller."""

    phase: str = "setup"
    calls: list[Collective] = field(default_factory=list)

    def add(self, op: str, group_size: int, buffer_bytes: int, recv_bytes: int) -> None:
        self.calls.append(Collective(self.phase, op, group_size, int(buffer_bytes), int(recv_bytes)))

    def summary(self, phase: str | None = None) -> list[dict]:
        """[{phase, op, group_size, calls, buffer_bytes, recv_bytes}] summed per (phase, op, group size)."""
        count: Counter = Counter()
        buffers: Counter = Counter()
        recv: Counter = Counter()
        for c in self.calls:
            if phase is None or c.phase == phase:
                key = (c.phase, c.op, c.group_size)
                count[key] += 1
                buffers[key] += c.buffer_bytes
                recv[key] += c.recv_bytes
        return [{"phase": p, "op": o, "group_size": g, "calls": count[(p, o, g)], "buffer_bytes": buffers[(p, o, g)],
                 "recv_bytes": recv[(p, o, g)]} for p, o, g in count]


LEDGER = Ledger()  # one process plays one rank: one ledger


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _done(result: object = None) -> object:
    fut: Future = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


class SimulatedProcessGroup(dist.ProcessGroup):
    """Rank `rank` of a group of `world_size`; no peer exists. See the module docstring."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self._rank, self._world = rank, world_size

    def size(self) -> int:
        return self._world

    def getBackendName(self) -> str:
        return BACKEND

    @property
    def group_name(self) -> str:  # functional collectives address groups by their registered name
        return dist.distributed_c10d._world.pg_names[self]

    def _record(self, op: str, buffer_bytes: int, recv_bytes: int) -> None:
        LEDGER.add(op, self._world, buffer_bytes, recv_bytes)

    # --- gathers ---------------------------------------------------------------------------------
    def allgather(self, output_tensors, input_tensor, opts=None):
        for outs, inp in zip(output_tensors, input_tensor, strict=True):
            self._record("all_gather", sum(_nbytes(o) for o in outs), (self._world - 1) * _nbytes(inp))
            for o in outs:
                o.zero_()
        return _done(output_tensors)

    def all_gather_single(self, output_tensor, input_tensor, opts=None):
        self._record("all_gather", _nbytes(output_tensor), _nbytes(output_tensor) - _nbytes(input_tensor))
        output_tensor.zero_()
        return _done(output_tensor)

    def all_gather_single_coalesced(self, output_tensor_list, input_tensor_list, opts=None):
        for o, i in zip(output_tensor_list, input_tensor_list, strict=True):
            self.all_gather_single(o, i)
        return _done(output_tensor_list)

    def gather(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        nbytes = sum(_nbytes(t) for t in input_tensors)
        self._record("gather", nbytes * self._world, (self._world - 1) * nbytes if self._rank == root else 0)
        for outs in output_tensors:
            for o in outs:
                o.zero_()
        return _done(output_tensors)

    # --- reductions ------------------------------------------------------------------------------
    def reduce_scatter(self, output_tensor, scatter_list, opts=None):
        for out, chunks in zip(output_tensor, scatter_list, strict=True):
            total = sum(_nbytes(c) for c in chunks)
            self._record("reduce_scatter", total, total - _nbytes(out))
            out.zero_()
        return _done(output_tensor)

    def reduce_scatter_single(self, output_tensor, input_tensor, opts=None):
        self._record("reduce_scatter", _nbytes(input_tensor), _nbytes(input_tensor) - _nbytes(output_tensor))
        output_tensor.zero_()
        return _done(output_tensor)

    def reduce_scatter_single_coalesced(self, output_tensors, input_tensors, opts=None):
        for o, i in zip(output_tensors, input_tensors, strict=True):
            self.reduce_scatter_single(o, i)
        return _done(output_tensors)

    def allreduce(self, tensor_list, opts=None):
        for t in tensor_list:
            self._record("all_reduce", _nbytes(t), 2 * (self._world - 1) * _nbytes(t) // self._world)
        return _done(tensor_list)

    def allreduce_coalesced(self, tensor_list, opts=None):
        return self.allreduce(tensor_list, opts)

    # --- all-to-all, broadcast, scatter, barrier ----------------------------------------------------
    def all_to_all_single(self, output_buffer, input_buffer, output_split_sizes, input_split_sizes, opts=None):
        rows = output_buffer.shape[0] if output_buffer.dim() else 1
        row_bytes = _nbytes(output_buffer) // max(rows, 1)
        mine = output_split_sizes[self._rank] if output_split_sizes else rows // self._world
        self._record("all_to_all", max(_nbytes(output_buffer), _nbytes(input_buffer)),
                     _nbytes(output_buffer) - mine * row_bytes)
        if output_buffer.shape == input_buffer.shape:
            output_buffer.copy_(input_buffer)
        else:
            output_buffer.zero_()
        return _done(output_buffer)

    def alltoall(self, output_tensor_list, input_tensor_list, opts=None):
        total = sum(_nbytes(t) for t in output_tensor_list)
        self._record("all_to_all", total, total - _nbytes(output_tensor_list[self._rank]))
        for o, i in zip(output_tensor_list, input_tensor_list, strict=True):
            o.copy_(i) if o.shape == i.shape else o.zero_()
        return _done(output_tensor_list)

    def broadcast(self, tensor_list, opts=None):
        root = opts.rootRank if opts is not None else 0
        for t in tensor_list:
            self._record("broadcast", _nbytes(t), 0 if self._rank == root else _nbytes(t))
        return _done(tensor_list)

    def scatter(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        nbytes = sum(_nbytes(t) for t in output_tensors)
        self._record("scatter", nbytes * self._world, 0 if self._rank == root else nbytes)
        for o in output_tensors:
            o.zero_()
        return _done(output_tensors)

    def barrier(self, opts=None):
        self._record("barrier", 0, 0)
        return _done(None)


def _create(prefix_store: object, rank: int, world_size: int, timeout: object) -> SimulatedProcessGroup:
    return SimulatedProcessGroup(rank, world_size)


if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])


def init_simulated_world(rank: int, world_size: int) -> None:
    """Make this process rank `rank` of a simulated `world_size`-rank default group (any earlier group is left)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    LEDGER.calls.clear()
    LEDGER.phase = "setup"
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=rank, world_size=world_size)
