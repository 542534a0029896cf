"""AdamW on host (CPU) tensors with DeepSpeed's vectorised CPU Adam kernel, for `optim.offload: cpu`.

What DeepSpeed does better than torch here is one thing: `DeepSpeedCPUAdam`'s C++ kernel (AVX, OpenMP) steps
fp32 parameters in host memory several times faster than `torch.optim.AdamW`'s CPU loop. Its optimizer class is
not used: handed FSDP2's DTensor parameters it crashes, and its state would live outside the optimizer that
torch.distributed.checkpoint saves. So the optimizer keeps its own state (`step`, `exp_avg`, `exp_avg_sq`, the
same as `torch.optim.AdamW`, so checkpoints move between offloaded and plain runs) and calls the kernel on the
local shards, which it updates in place.

Without deepspeed, or when its op cannot be built, `HostAdam.load()` warns once, naming the extra to install, and
returns None: the caller then steps with torch's own AdamW on the host.

The op is compiled once per machine by torch's JIT extension builder (about 70 s on 2 cores) into
`TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`): set it to a persistent directory on clusters.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch

_EXTRA = 'pip install -e ".[deepspeed]"'
_loaded: HostAdam | None = None
_failed: str | None = None
_ids = itertools.count(10_000)  # kernel optimizer ids, apart from DeepSpeedCPUAdam's own counter


class HostAdam:
    """DeepSpeed's CPU Adam kernel in AdamW mode (decoupled weight decay, bias correction), one kernel-side
    optimizer object per (betas, eps) pair; `update` is torch.optim.AdamW's step on host tensors."""

    def __init__(self, op: object) -> None:
        self._op = op
        self._opt_ids: dict[tuple[float, float, float], int] = {}

    @staticmethod
    def load() -> HostAdam | None:
        """The kernel (built or loaded once per process), or None with one warning if it is not available."""
        global _loaded, _failed
        if _loaded is not None or _failed is not None:
            return _loaded
        try:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            _loaded = HostAdam(CPUAdamBuilder().load(verbose=False))
        except Exception as e:  # ImportError, or the compiler / ninja failing: same fallback, said once
            _failed = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"optim.offload=cpu: DeepSpeed's CPU Adam kernel is not available ({_failed}); the host "
                          f"optimizer step runs torch.optim.AdamW's loop instead (slower). Install it with {_EXTRA}",
                          stacklevel=2)
        return _loaded

    def _opt_id(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> int:
        key = (betas[0], betas[1], eps)
        if key not in self._opt_ids:
            self._opt_ids[key] = next(_ids)
            self._op.create_adam(self._opt_ids[key], lr, betas[0], betas[1], eps, weight_decay, True, False)
        return self._opt_ids[key]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """One AdamW step of each (plain, contiguous, fp32, CPU) tensor in place; `steps` are torch.optim's
        scalar step counters, incremented here as torch.optim.AdamW does."""
        opt_id = self._opt_id(lr, betas, eps, weight_decay)
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
            step += 1
            self._op.adam_update(opt_id, int(step.item()), lr, betas[0], betas[1], eps, weight_decay, True, p,
                                 g.contiguous(), m, v)


def reset_for_tests() -> None:
    """Forget the load outcome (tests exercise the fallback and the kernel in one process)."""
    global _loaded, _failed
    _loaded, _failed = None, None
