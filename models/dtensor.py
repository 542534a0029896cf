"""DTensor checks that do not import `torch.distributed.tensor`: that import pulls in sympy and costs ~1.2 s of
start-up (more than the rest of the model code), which a process that never makes a DTensor (`tools.plan`, a model
used on its own) need not pay. A DTensor can only exist once its module has been imported, so looking the module
up is enough. The one helper for "this tensor, or its local shard" across the project."""

from __future__ import annotations

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t
