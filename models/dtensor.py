"""DTensor checks that do not import `torch.distributed.tensor`: that import pulls in sympy and costs ~1.2 s of
every process's start-up (more than the rest of the model code), and a process that never made a DTensor
(one-process training, `tools.plan`, `--print-config`) need not pay it. A DTensor can only exist once its module
has been imported, so looking the module up is enough."""

from __future__ import annotations

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t
