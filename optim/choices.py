"""The names the config's `optim` section may take, without importing torch: the config check (train.config) runs
in every command line, and `--print-config` or `python -m launch` need nothing more."""

from __future__ import annotations

NS_METHODS = ("muon", "polar_express")
"""``ns_method`` values: ``"muon"`` (the default: :data:`optim.newton_schulz.NS_COEFFICIENTS` at every step,
torch.optim.Muon's iteration) and ``"polar_express"`` (:data:`optim.newton_schulz.POLAR_EXPRESS_COEFFICIENTS`,
same cost per step)."""

NS_DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
"""``ns_dtype`` values besides ``"auto"``; :data:`optim.muon.NS_DTYPES` maps them to torch dtypes."""

BUILTIN_OPTIMIZERS = ("adamw", "muon")
_optimizer_names: set[str] = set(BUILTIN_OPTIMIZERS)


def optimizer_names() -> list[str]:
    """The names `optim.name` may take, sorted: the built-in optimizers and every name registered with
    :func:`optim.builder.register_optimizer` in this process."""
    return sorted(_optimizer_names)


def add_optimizer_name(name: str) -> None:
    """Called by :func:`optim.builder.register_optimizer` only."""
    _optimizer_names.add(name.lower())
