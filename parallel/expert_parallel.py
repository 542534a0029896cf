"""Expert parallelism: each rank of an EP group holds E/ep whole experts; tokens travel by all-to-all.

Per MoE layer (the model computes the routing and sorts token copies by global expert id first):

    tokens, counts[E], gates, token_idx ──(pre-hook)──► gather the copies (sorted by expert) ─► exchange counts
        ─► all_to_all_single(copies) with uneven splits ─► regroup received rows by local expert
        ─► GroupedExperts (local weights, grouped GEMM; no gates, no gather)
        ─(post-hook)─► undo the regrouping ─► reverse all_to_all_single ─► rows back in sorted order
        ─► scale by the gates, sum each token's copies

The exchange is installed as forward hooks on the model's own `GroupedExperts` module instead of a
wrapper module, so parameter names (and therefore checkpoints) are the same with and without EP. Both
all-to-alls use the autograd-aware functional collective, so the backward pass sends gradients back the
same way. Expert weights become DTensors sharded on dim 0 over the "ep" mesh dim, which is what lets
torch.distributed.checkpoint reshard them to another `ep`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from models.moe import GroupedExperts, sum_copies
from models.stats import is_recomputing
from models.transformer import Transformer


def shard_experts(experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
    """Replace each stacked [E, ...] parameter by a DTensor Shard(0) over `ep_mesh` keeping only this
    rank's E/ep experts (works on the meta device: nothing is communicated)."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for name, param in list(experts.named_parameters(recurse=False)):
        n_local = param.shape[0] // ep
        local = param.detach()[rank * n_local:(rank + 1) * n_local].clone()
        dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=param.shape,
                                stride=param.stride())
        setattr(experts, name, nn.Parameter(dt, requires_grad=param.requires_grad))


def _regroup_index(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns received rows, laid out (source rank, local expert), into (local expert,
    source rank) blocks — the contiguous per-expert groups a grouped GEMM needs. `total`: the rows received
    (`recv_counts.sum()`, already on the host)."""
    ranks, n_local = recv_counts.shape
    flat = recv_counts.flatten()
    starts = torch.cumsum(flat, 0) - flat  # start row of each (rank, expert) block
    by_expert = recv_counts.t().flatten()  # block lengths in (expert, rank) order
    block_starts = starts.view(ranks, n_local).t().flatten()
    block_id = torch.repeat_interleave(torch.arange(by_expert.numel(), device=flat.device), by_expert,
                                       output_size=total)
    offset_in_block = torch.arange(total, device=flat.device) - torch.repeat_interleave(
        torch.cumsum(by_expert, 0) - by_expert, by_expert, output_size=total)
    return block_starts[block_id] + offset_in_block


class _Dispatcher:
    """Holds the EP group and, between the pre- and post-hook of one call, that call's routing plan."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group, self.ep = group, ep
        self.plan: list[tuple[Any, ...]] = []
        # Bytes of token rows this rank's forward dispatch + combine calls exchanged (benchmarks). Forwards only:
        # not a recompute (selective checkpointing replays the kept result; full recompute sends them again, as the
        # backward's all-to-alls do, neither counted here).
        self.bytes_sent = 0

    def dispatch(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # Called as experts(tokens, counts, scale, token_idx) (or experts(sorted rows, counts)): the copies are
        # gathered here and travel; the routing weights (scale) stay: `combine` applies them to the rows that come
        # back and sums each token's copies, as GroupedExperts does itself when it runs without EP.
        x, counts, scale, token_idx = (*args, None, None, None)[:4]
        if token_idx is not None:
            x = x.index_select(0, token_idx)  # (its backward is an index_add, far cheaper than x[idx]'s)
        with torch.no_grad():
            counts = counts.to(torch.int64)
            # recv[i*El + e]: rank i -> my expert e. The functional collective, so that selective checkpointing
            # keeps its result and a recompute exchanges nothing again (parallel/fsdp.py).
            recv = all_to_all_single(counts, None, None, self.group).wait()
            recv = recv.view(self.ep, -1)
            # all_to_all_single takes its split sizes as host integers: the dispatch's one device->host wait
            # per MoE layer and forward (a device-side dispatch would remove it; docs/architecture.md).
            sizes = torch.cat([counts.view(self.ep, -1).sum(1), recv.sum(1)]).tolist()
            send_splits, recv_splits = sizes[:self.ep], sizes[self.ep:]
            order = _regroup_index(recv, sum(recv_splits))
            local_counts = recv.sum(0)
        x_recv = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, self.group)
        self.plan.append((send_splits, recv_splits, order, scale, token_idx, args[0].shape[0]))
        if not is_recomputing():
            self.bytes_sent += (sum(send_splits) + sum(recv_splits)) * x.shape[-1] * x.element_size()
        return x_recv.index_select(0, order), local_counts

    def combine(self, module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor:
        send_splits, recv_splits, order, scale, token_idx, num_tokens = self.plan.pop()
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        y = all_to_all_single_autograd(y.index_select(0, back), send_splits, recv_splits, self.group)
        if scale is not None:
            y = (y * scale.unsqueeze(-1)).to(y.dtype)
        return y if token_idx is None else sum_copies(y, token_idx, num_tokens)


def apply_expert_parallel(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` and route its tokens through all-to-all."""
    if ep_mesh.size() == 1:
        return
    for moe in model.moe_layers():
        shard_experts(moe.experts, ep_mesh)
        d = _Dispatcher(ep_mesh.get_group(), ep_mesh.size())
        moe.experts.register_forward_pre_hook(d.dispatch)
        moe.experts.register_forward_hook(d.combine)
        moe.experts._ep_dispatcher = d  # type: ignore[attr-defined]


def dispatch_bytes(model: nn.Module) -> int:
    """Bytes this rank sent through all MoE all-to-alls since the model was parallelized."""
    return sum(m._ep_dispatcher.bytes_sent for m in model.modules()
               if hasattr(m, "_ep_dispatcher"))
