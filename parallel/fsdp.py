"""FSDP2 wrapping and activation checkpointing, applied to the plain model from outside."""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as _fully_shard
from torch.distributed.tensor import Shard

# SAC's two dispatch modes are private to torch: subclassed (as xformers does) so that the ops SAC ignores are
# ours to choose without writing to torch's module-global SAC_IGNORED_OPS.
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
)

from models.moe import MoE
from models.stats import recomputing
from models.transformer import Transformer
from parallel.mesh import dp_mesh as flattened_dp_mesh

# Selective checkpointing keeps what is expensive to recompute (matmuls, attention, the all-to-all's
# inputs) and recomputes the cheap elementwise work (norms, SwiGLU, RoPE) — the split K2 reports using.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# Kept whatever the grad mode, since these run with grad off. Never send the tokens twice: the all-to-all's
# results (the split sizes' under no_grad, the tokens' inside the autograd function that wraps the collective).
# The routed experts' grouped GEMMs, which run inside their own autograd function (models.moe._ExpertFFN).
_SAVE_ALWAYS = set()
if hasattr(torch.ops, "_c10d_functional"):
    _SAVE_ALWAYS.add(torch.ops._c10d_functional.all_to_all_single.default)
if hasattr(torch.ops.aten, "_grouped_mm"):
    _SAVE_ALWAYS.add(torch.ops.aten._grouped_mm.default)


def _profiler_ops() -> set:
    """Every overload of the profiler's `record_function` ops."""
    ops = set()
    for name in ("_record_function_enter", "_record_function_enter_new", "_record_function_exit"):
        packet = getattr(torch.ops.profiler, name, None)
        ops.update(getattr(packet, overload) for overload in (packet.overloads() if packet is not None else []))
    return ops


# FSDP2's hooks annotate with profiler `record_function` ops, and the experts' FSDP hooks run a different
# number of times in the forward and in SAC's recompute, which SAC reports as a mismatch. Annotations are not
# tensor computation, so SAC should pass them through as it does detach. Our SAC modes ignore them on top of a
# copy of torch's SAC_IGNORED_OPS: torch's global set is never modified, so any other SAC user in the process
# keeps torch's behaviour.
_SAC_IGNORED_OPS = frozenset(SAC_IGNORED_OPS) | _profiler_ops()


class _IgnoreOps:
    """Runs the ops in `_SAC_IGNORED_OPS` untouched, before SAC's mode would record or replay them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SAC_IGNORED_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Caching(_IgnoreOps, _CachingTorchDispatchMode):
    """SAC's forward mode: runs each op and stores the outputs the policy saves."""


class _Cached(_IgnoreOps, _CachedTorchDispatchMode):
    """SAC's recompute mode: returns the stored outputs, runs the rest again."""


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    # A matmul under no_grad (attention's chunked max-logit pass) is not needed by backward: keeping it would
    # hold every chunk until backward.
    if (op in _SAVE_OPS and torch.is_grad_enabled()) or op in _SAVE_ALWAYS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[_Caching, contextlib.AbstractContextManager]:
    """`create_selective_checkpoint_contexts(_selective_policy)` with our ignored ops: the forward and the
    recompute mode share one storage. The recompute is marked (`models.stats.recomputing`) so the layers do
    not count their statistics twice."""
    storage: dict = defaultdict(dict)
    return _Caching(_selective_policy, storage), _marked(_Cached(None, storage))  # (the replay takes no policy)


def _full_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Full recompute: nothing special in the forward; the recompute is marked, as above."""
    return contextlib.nullcontext(), recomputing()


@contextlib.contextmanager
def _marked(mode: contextlib.AbstractContextManager) -> Iterator[None]:
    with mode, recomputing():
        yield


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """`none`, `selective` (op-level: save matmul outputs, recompute the rest) or `full` (recompute each
    block from its input). Wraps blocks in place; parameter names gain `_checkpoint_wrapped_module.`,
    which torch.distributed.checkpoint and optim/ strip."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"parallel.activation_checkpointing must be none|selective|full, got '{mode}'")
    for name, block in list(model.layers.items()):
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_full_contexts)
        else:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_selective_contexts)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, roots: list[nn.Module] | None = None,
               reshard_after_forward: bool = True, offload: bool = False) -> None:
    """Shard each block, then the root (embeddings, final norm, LM head), over the flattened "dp" mesh.

    `roots`: the modules to shard last as FSDP roots instead of `model` (a pipeline rank's stage views, which
    hold the embedding / head when they are the first / last stage). `reshard_after_forward=False` keeps each
    block's weights gathered from its forward to its backward: no second all-gather per micro-batch, at the
    memory of the unsharded block (what a pipeline with many micro-batches in flight wants). `offload`: FSDP2's
    CPUOffloadPolicy, the sharded parameters and gradients (and so the optimizer state) in host memory, copied to
    the device for each all-gather (pinned host memory only where there is an accelerator to copy to).

    Mixed precision is FSDP2's: parameters are stored (and the optimizer steps) in fp32, gathered for compute in
    `param_dtype`, gradients reduced in `reduce_dtype`; the router keeps fp32 under any policy.

    Routed experts are sharded separately over "dp_mod_ep" (they are already split over "ep"). Their
    gradient is the sum over the EP group's tokens, so FSDP must divide it by the whole data-parallel
    size, not by the size of its own mesh, for every parameter to get the gradient of the global mean loss.
    """
    dp_mesh = flattened_dp_mesh(mesh)
    ep = mesh["ep"].size()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if offload:
        host = {"offload_policy": CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")}
        fully_shard = functools.partial(_fully_shard, **host)
    else:
        fully_shard = _fully_shard
    # The router scores in fp32 (DeepSeek-V3): a bf16 copy of its weight flips near-tied top-k choices. So under
    # a low-precision policy the router is its own FSDP unit whose parameters are gathered in fp32.
    router_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    low_precision = param_dtype is not None and param_dtype != torch.float32
    for block in model.layers.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        if isinstance(inner.mlp, MoE) and low_precision:
            fully_shard(inner.mlp.gate, mesh=dp_mesh, mp_policy=router_mp)
        if isinstance(inner.mlp, MoE) and ep > 1:
            experts = inner.mlp.experts
            dp_mod_ep = mesh["dp_mod_ep"]
            n_local = experts.down_proj.shape[0] // ep
            # Shard the expert dim when there are enough local experts to go round, else each matrix's row dim
            # (dim 2 of gate_up_proj [E, 2, I, H], dim 1 of down_proj [E, H, I]).
            by_expert = n_local >= dp_mod_ep.size()
            fully_shard(experts, mesh=dp_mod_ep, mp_policy=mp,
                        shard_placement_fn=lambda p, e=by_expert: Shard(0) if e else Shard(p.ndim - 2),
                        reshard_after_forward=reshard_after_forward)
            experts.set_gradient_divide_factor(float(dp_mesh.size()))
            # Gloo has no PREMUL_SUM, so scale outside the collective. Only when a reduce-scatter really
            # runs: on a 1-rank mesh FSDP already divides in its copy path, and forcing sum would divide twice.
            if dp_mod_ep.size() > 1 and dist.get_backend(dp_mod_ep.get_group()) == "gloo":
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for root in roots if roots is not None else [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)
