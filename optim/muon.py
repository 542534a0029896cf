"""Muon (Moonlight / Kimi K2) for the weight matrices, AdamW for the rest, in one optimizer object.

Per Muon parameter ``W`` of shape ``[..., n, m]`` (a matrix, or a stack ``[E, n, m]`` of E independent
expert matrices) with gradient ``G``, every step::

    M  <- mu * M + G                                   (momentum_buffer)
    U  <- G + mu * M   (nesterov)   or   M             (plain momentum)
    O  <- NS5(U) * 0.2 * sqrt(max(n, m))               (per matrix; RMS matched to AdamW's ~0.2)
    W  <- W - lr * (O + wd * W)                        W.mul_(1 - lr*wd); W.add_(NS5(U), alpha=-lr*0.2*sqrt(max(n, m)))

NS5 is :func:`optim.newton_schulz.zeropower_via_newtonschulz5`. Thanks to the 0.2*sqrt(max(n, m)) factor
Muon reuses AdamW's learning rate and weight decay (Moonlight, sec. 2.2), so one ``lr`` serves both
kinds of groups. On plain 2-D parameters this equals ``torch.optim.Muon(..., adjust_lr_fn=
"match_rms_adamw")``: torch keeps an EMA buffer ``M' = (1 - mu) M`` instead, a positive factor that NS's
normalization removes, so the two agree to float rounding (not bit for bit; tests/test_muon.py states the
tolerance), and their momentum buffers differ by that factor.

Param groups carry ``use_muon``: True groups run Muon (keys ``lr``, ``weight_decay``, ``momentum``,
``nesterov``, ``ns_steps``, ``ns_dtype``, ``ns_triton``, ``ns_method``, ``ns_gram``; state
``momentum_buffer``), False groups run AdamW through ``torch.optim.adamw.adamw``, the functional PyTorch's own
``AdamW.step`` calls, with the same arguments and the same state (``step``, ``exp_avg``, ``exp_avg_sq``), so
they are bitwise ``torch.optim.AdamW`` in every mode it picks (for-loop on CPU, foreach on CUDA, fused when
asked; all three tested on CPU). One optimizer therefore serves the trainer's single LR scheduler,
``state_dict`` / ``load_state_dict`` and torch.distributed.checkpoint.

Distribution hook: all Muon updates of a step (every Muon group with the same NS settings)
go through one call ``orthogonalize(updates, ns)``, ``ns`` being the per-tensor NS function. The default
orthogonalizes each tensor locally, on this process; a distributed scheme (an owner per matrix, shards
assembled and returned by bucketed all-to-alls) plugs in with the same signature,
``optim.distributed_ns.orthogonalize``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.adamw import adamw

from models.dtensor import local
from optim.choices import NS_DTYPE_NAMES
from optim.host_adam import HostAdam
from optim.hparams import adamw_hparams, param_group_dicts, resolve_fused
from optim.newton_schulz import NS_METHODS, NS_STEPS, orthogonalize_batched, zeropower_via_newtonschulz5
from optim.param_groups import ParamGroups

NSFn = Callable[[Tensor], Tensor]
OrthogonalizeFn = Callable[[list[Tensor], NSFn], list[Tensor]]
"""``orthogonalize(updates, ns) -> outputs``: ``outputs[i]`` is ``ns`` applied to ``updates[i]`` (laid out
like it), however the work is spread over processes."""

NS_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in NS_DTYPE_NAMES}
"""Accepted ``ns_dtype`` names besides ``"auto"`` (groups store the name, so state dicts hold only plain
values). ``"auto"``, the default: bfloat16 for tensors on CUDA, float32 elsewhere, resolved per tensor by
:func:`optim.newton_schulz.resolve_dtype` (CPUs run bf16 matmuls ~20x slower than float32)."""

MUON_DEFAULTS: dict[str, Any] = {
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": NS_STEPS,
    "ns_dtype": "auto",
    "ns_triton": "auto",
    "ns_method": "muon",
    "ns_gram": False,
}
"""Config keys the ``muon`` factory reads besides the AdamW ones (lr, weight_decay, betas, eps, fused),
with the values used when a key is missing or null."""

RMS_SCALE = 0.2
"""Muon's update is scaled by ``RMS_SCALE * sqrt(max(n, m))``: an orthogonal n x m matrix has RMS
``1/sqrt(max(n, m))``, so the update gets RMS ~0.2, AdamW's typical update RMS (Moonlight)."""


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """``0.2 * sqrt(max(n, m))`` for a ``[..., n, m]`` parameter (n, m: its last two dims)."""
    return RMS_SCALE * math.sqrt(max(shape[-2], shape[-1]))


def local_orthogonalize(updates: list[Tensor], ns: NSFn) -> list[Tensor]:
    """The single-process :data:`OrthogonalizeFn`: ``ns`` on every update, here, the updates of one matrix shape
    stacked into one batched call (:func:`optim.newton_schulz.orthogonalize_batched`)."""
    return orthogonalize_batched(updates, ns)


def ns_function(steps: int, ns_dtype: str, ns_triton: bool | str = "auto", ns_method: str = "muon",
                ns_gram: bool = False) -> NSFn:
    """The per-tensor NS function for a group's ``ns_steps`` / ``ns_dtype`` / ``ns_triton`` / ``ns_method`` /
    ``ns_gram`` (the ``"auto"`` values are resolved per tensor, by the NS function, where the device is known)."""
    dtype = "auto" if ns_dtype == "auto" else NS_DTYPES[ns_dtype]
    return functools.partial(zeropower_via_newtonschulz5, steps=steps, dtype=dtype, triton=ns_triton,
                             method=ns_method, gram=ns_gram)


def _ns_dtype_name(value: Any) -> str:
    if value == "auto":
        return "auto"
    if isinstance(value, torch.dtype):
        for name, dtype in NS_DTYPES.items():
            if dtype == value:
                return name
    elif isinstance(value, str) and value in NS_DTYPES:
        return value
    raise ValueError(f"ns_dtype must be one of auto, {', '.join(NS_DTYPES)}, got {value!r}")


class Muon(torch.optim.Optimizer):
    """Muon on the ``use_muon=True`` param groups, AdamW (``torch.optim.AdamW``'s math) on the others.

    ``params``: tensors (all Muon) or group dicts; a dict with ``"use_muon": False`` is an AdamW group.
    Keyword defaults fill the keys a group leaves out: ``lr`` and ``weight_decay`` for both kinds;
    ``momentum``, ``nesterov``, ``ns_steps``, ``ns_dtype`` (``"auto"``, the default, or a :data:`NS_DTYPES`
    name or torch dtype; stored as the name), ``ns_triton`` (``"auto"``, True, False: NS's symmetric products
    on the Triton kernel, see optim/newton_schulz.py), ``ns_method`` (``"muon"``, the default: torch.optim.Muon's
    fixed coefficients; ``"polar_express"``: per-step ones, same cost, singular values closer to 1) and ``ns_gram``
    (False, the default; True: the Gram form on matrices at least twice as wide as tall, the same polynomial in
    fewer FLOPs; see optim/newton_schulz.py) for Muon groups; ``betas``, ``eps``,
    ``amsgrad``, ``maximize``, ``foreach``, ``fused`` for AdamW groups (as ``torch.optim.AdamW``).
    Muon parameters must have at least 2 dims (the last two are the matrix; leading dims are a batch
    of independent matrices). ``orthogonalize``: see the module docstring; default
    :func:`local_orthogonalize`; an attribute (kept by deepcopy / pickle), not part of the state dict.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns_dtype: str | torch.dtype = "auto",
        ns_triton: bool | str = "auto",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        *,
        ns_method: str = "muon",
        ns_gram: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        orthogonalize: OrthogonalizeFn | None = None,
        host_adam: HostAdam | None = None,
        ns_device: torch.device | None = None,
    ) -> None:
        self._muon_defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "ns_triton": ns_triton,
            "ns_method": ns_method,
            "ns_gram": ns_gram,
        }
        self._adamw_defaults = {
            "betas": tuple(betas),
            "eps": eps,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": False,
            "differentiable": False,
            "fused": fused,
            "decoupled_weight_decay": True,
        }
        self.orthogonalize: OrthogonalizeFn = orthogonalize or local_orthogonalize
        # `optim.offload: cpu` (parameters, gradients and state in host memory): AdamW groups step on DeepSpeed's
        # CPU kernel, and Muon's Newton–Schulz runs on `ns_device` (the accelerator), its input and output copied.
        self.host_adam, self.ns_device = host_adam, ns_device
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "use_muon": True})

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer pickles only defaults / state / param_groups; deepcopy and pickle keep these too.
        return {
            **super().__getstate__(),
            "_muon_defaults": self._muon_defaults,
            "_adamw_defaults": self._adamw_defaults,
            "orthogonalize": self.orthogonalize,
            "host_adam": self.host_adam,
            "ns_device": self.ns_device,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also what load_state_dict calls: groups saved before a key existed (ns_triton) take its default,
        # as torch's own optimizers do for theirs.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (self._muon_defaults if group["use_muon"] else self._adamw_defaults).items():
                group.setdefault(key, value)

    # --- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill the group's kind-specific defaults, validate it, then add it as ``Optimizer`` does."""
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        use_muon = param_group["use_muon"]
        if not isinstance(use_muon, bool):
            raise ValueError(f"use_muon must be true or false, got {use_muon!r}")
        for key, value in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            param_group.setdefault(key, value)
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set is left for Optimizer to reject (unordered)
            params = list(params)
        param_group["params"] = params
        if use_muon:
            _check_muon_group(param_group, params)
        else:
            _check_adamw_group(param_group)
        super().add_param_group(param_group)

    def describe(self) -> str:
        """One line per param group: its kind tag, algorithm, tensor / element counts, lr and weight decay
        (for the start-of-training log)."""
        lines = []
        for i, g in enumerate(self.param_groups):
            kind = g.get("group", f"group{i}")
            algo = "muon" if g["use_muon"] else "adamw"
            numel = sum(p.numel() for p in g["params"])
            lines.append(
                f"{kind:<10} {algo:<6} {len(g['params']):>5} tensors {numel:>14,} params  "
                f"lr={g['lr']:.3g} weight_decay={g['weight_decay']:.3g}"
            )
        return "\n".join(lines)

    # --- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = []
        for group in self.param_groups:
            if group["use_muon"]:
                muon_groups.append(group)
            else:
                self._adamw_step(group)
        if muon_groups:
            self._muon_step(muon_groups)
        return loss

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        # 1. momentum and the NS input of every Muon parameter with a gradient, bucketed by NS settings
        #    so that each bucket is orthogonalized in one call (one owner assignment when distributed).
        #    Elementwise work as torch._foreach_* over each group's tensors: the same per-element operations
        #    as the per-tensor methods (bitwise), without a Python loop of small ops.
        buckets: dict[tuple, list[tuple[dict[str, Any], Tensor, Tensor]]] = {}
        for group in groups:
            mu, nesterov = group["momentum"], group["nesterov"]
            key = (group["ns_steps"], group["ns_dtype"], group["ns_triton"], group["ns_method"], group["ns_gram"])
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(grad)
                bufs.append(state["momentum_buffer"])
            for idx in _foreach_lists(params):
                ps, gs, ms = [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx]
                torch._foreach_mul_(ms, mu)  # M <- mu M + G
                torch._foreach_add_(ms, gs)
                updates = torch._foreach_add(gs, ms, alpha=mu) if nesterov else ms
                buckets.setdefault(key, []).extend(zip([group] * len(ps), ps, updates, strict=True))
        # 2. orthogonalize, 3. decoupled weight decay and the scaled update.
        for (ns_steps, ns_dtype, ns_triton, ns_method, ns_gram), items in buckets.items():
            ns = ns_function(ns_steps, ns_dtype, ns_triton, ns_method, ns_gram)
            updates = [u for _, _, u in items]
            if self.ns_device is not None:  # offloaded state: Newton–Schulz (and its exchanges) on the accelerator
                updates = [u.to(self.ns_device, non_blocking=True) for u in updates]
            outs = self.orthogonalize(updates, ns)
            if self.ns_device is not None:
                outs = [o.to("cpu", non_blocking=True) for o in outs]
                torch.cuda.current_stream(self.ns_device).synchronize()
            if len(outs) != len(items):
                raise RuntimeError(f"orthogonalize returned {len(outs)} tensors for {len(items)} updates")
            # W <- W (1 - lr wd) - lr scale O: one foreach call per distinct (lr, wd, scale), so that each element
            # sees exactly the per-tensor p.mul_(1 - lr wd); p.add_(o, alpha=-lr scale).
            by_factors: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
            for (group, p, _), o in zip(items, outs, strict=True):
                lr, wd = group["lr"], group["weight_decay"]
                ps, os_ = by_factors.setdefault((1 - lr * wd, -(lr * muon_scale(p.shape)), _foreach_key(p)), ([], []))
                ps.append(p)
                os_.append(o)
            for (decay, alpha, _), (ps, os_) in by_factors.items():
                torch._foreach_mul_(ps, decay)
                torch._foreach_add_(ps, os_, alpha=alpha)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.AdamW.step`` for one group: its lazy state init, then the same functional call."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                # Same placement / dtype of `step` as torch.optim.Adam._init_group.
                if group["fused"] or group["capturable"]:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                else:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        if self.host_adam is not None and not (group["amsgrad"] or group["maximize"]):
            # offloaded: DeepSpeed's CPU kernel on the local shards, in place (optim/host_adam.py)
            # (DTensors: the local shards, the storage the kernel updates in place)
            self.host_adam.update([local(t) for t in params], [local(t) for t in grads],
                                  [local(t) for t in exp_avgs], [local(t) for t in exp_avg_sqs], state_steps,
                                  lr=group["lr"], betas=(beta1, beta2), eps=group["eps"],
                                  weight_decay=group["weight_decay"])
            return
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=None,
            found_inf=None,
            has_complex=has_complex,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


def _foreach_key(t: Tensor) -> tuple:
    """Tensors that may share one torch._foreach_* call: same kind and device, and for DTensors the same mesh
    (DTensor refuses lists that span meshes, e.g. dense matrices on "dp" and expert stacks on the EP mesh)."""
    mesh = getattr(t, "device_mesh", None)
    return type(t), t.device, None if mesh is None else id(mesh)


def _foreach_lists(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` split by :func:`_foreach_key`, each list in the original order."""
    lists: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        lists.setdefault(_foreach_key(t), []).append(i)
    return list(lists.values())


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for a non-fused ``step`` counter (float64 only under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_muon_group(group: dict[str, Any], params: list[Tensor]) -> None:
    for p in params:
        if p.ndim < 2:
            raise ValueError(
                f"Muon needs parameters with >= 2 dims (a matrix or a stack of matrices); got shape "
                f"{tuple(p.shape)}: put it in a group with use_muon=False (AdamW)"
            )
    _check_lr_wd(group)
    _normalize_muon_hparams(group)


def _check_adamw_group(group: dict[str, Any]) -> None:
    _check_lr_wd(group)
    betas = tuple(group["betas"])
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be 2 numbers in [0, 1), got {list(betas)}")
    group["betas"] = betas
    if not group["eps"] >= 0.0:
        raise ValueError(f"eps must be >= 0, got {group['eps']!r}")


def _check_lr_wd(group: dict[str, Any]) -> None:
    if isinstance(group["lr"], Tensor) or not group["lr"] >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {group['lr']!r}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")


# --- the `muon` factory of optim.builder ---------------------------------------------------------


def muon_hparams(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``momentum``, ``nesterov``, ``ns_steps``, ``ns_dtype``, ``ns_triton``, ``ns_method``, ``ns_gram``
    from ``cfg`` (missing or null keys take :data:`MUON_DEFAULTS`); a bad value raises ``ValueError`` naming the key."""
    out = {}
    for key, default in MUON_DEFAULTS.items():
        value = cfg.get(key, None) if cfg is not None else None
        out[key] = default if value is None else value
    _normalize_muon_hparams(out)
    return out


def _normalize_muon_hparams(d: dict[str, Any]) -> None:
    """Check momentum / nesterov / ns_steps / ns_dtype / ns_triton in place (errors name the key) and normalize
    types."""
    momentum = d["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    d["momentum"] = float(momentum)
    if not isinstance(d["nesterov"], bool):
        raise ValueError(f"nesterov must be true or false, got {d['nesterov']!r}")
    steps = d["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {steps!r}")
    d["ns_steps"] = int(steps)
    d["ns_dtype"] = _ns_dtype_name(d["ns_dtype"])
    if d["ns_method"] not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {', '.join(NS_METHODS)}, got {d['ns_method']!r}")
    if not isinstance(d["ns_gram"], bool):
        raise ValueError(f"ns_gram must be true or false, got {d['ns_gram']!r}")
    ns_triton = d["ns_triton"]
    if ns_triton != "auto" and not isinstance(ns_triton, bool):
        raise ValueError(f"ns_triton must be auto, true or false, got {ns_triton!r}")
    if ns_triton is True and importlib.util.find_spec("triton") is None:
        raise ValueError("ns_triton is true but Triton is not installed (pip install triton); use auto or false")


def build_muon(model: nn.Module, groups: ParamGroups, cfg: Mapping[str, Any]) -> Muon:
    """The ``muon`` factory registered in optim/builder.py: Muon on the "matrix" group, AdamW on
    "embedding" (decayed) and "vector" (no decay), one shared peak ``lr``; AdamW's ``betas`` / ``eps`` /
    ``fused`` as the ``adamw`` factory reads them. Groups keep their ``"group"`` tag, in the order
    matrix, embedding, vector."""
    hp = adamw_hparams(cfg)
    mh = muon_hparams(cfg)
    param_groups = param_group_dicts(groups, hp["weight_decay"])
    for g in param_groups:
        g["use_muon"] = g["group"] == "matrix"
    adamw_params = [p for g in param_groups if not g["use_muon"] for p in g["params"]]
    fused = resolve_fused(cfg.get("fused", None) if cfg is not None else None, adamw_params)
    # Under torch.distributed each FSDP-sharded matrix is orthogonalized once, by an owner rank. Also in a one-rank
    # group (bf16 or offload in one process): the parameters are DTensors there too, and NS on their local tensors
    # avoids DTensor dispatch on every one of its matmuls.
    orthogonalize = None
    if dist.is_available() and dist.is_initialized():
        from optim.distributed_ns import orthogonalize
    # As the adamw factory: fused only when chosen, else torch's default (for-loop on CPU, foreach on CUDA).
    return Muon(param_groups, **hp, **mh, fused=True if fused else None, orthogonalize=orthogonalize,
                **offload_kwargs(cfg))


def offload_kwargs(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`optim.offload: cpu` -> Muon's `host_adam` (DeepSpeed's CPU kernel, or None: torch's loop) and `ns_device`
    (the accelerator, when there is one); `none` -> nothing."""
    offload = str(cfg.get("offload", "none") if cfg is not None else "none")
    if offload not in ("none", "cpu"):
        raise ValueError(f"offload must be none or cpu, got {offload!r}")
    if offload == "none":
        return {}
    return {"host_adam": HostAdam.load(),
            "ns_device": torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None}
