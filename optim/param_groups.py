"""Sort a model's trainable parameters into the groups the optimizers treat differently.

Muon (Moonlight / Kimi K2) orthogonalizes the update of every weight *matrix* inside the transformer
blocks, while token embeddings, the LM head and 1-D tensors (norm gains, biases) stay on AdamW. Even
with plain AdamW the same split decides weight decay (none on "vector" tensors). Keeping the split in
one place means every optimizer, and the start-of-training log, agree on which tensor is which.

Groups (always all three keys, in this order, possibly empty):

* ``"matrix"``: 2-D to 4-D weights: attention projections (``q_proj``, ``q_a_proj``, ``q_b_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), dense and shared-expert FFNs, the router gate
  ``[E, H]`` and stacked routed experts, ``down_proj`` ``[E, out, in]`` and ``gate_up_proj`` ``[E, 2, out, in]``
  (E, resp. 2E, separate matrices to Muon: every leading dim is a batch dim).
* ``"embedding"``: the token embedding and the LM head (names ending ``embed_tokens.weight`` or
  ``lm_head.weight``), whatever their shape: Muon's spectral-norm argument does not hold for them.
* ``"vector"``: everything else: 0-D / 1-D tensors (norm weights, biases) and, as an AdamW catch-all,
  tensors of more than 4 dimensions, which no layer of this model has.

Names are matched on components after dropping wrapper components that ``torch.compile``, activation
checkpointing and FSDP1 insert (``_orig_mod.``, ``_checkpoint_wrapped_module.``, ...), so a wrapped
model is grouped exactly like the bare one.
"""

from __future__ import annotations

from torch import nn

GROUP_KINDS: tuple[str, ...] = ("matrix", "embedding", "vector")
"""The group names, in the order :func:`split_params` returns them."""

WRAPPER_COMPONENTS: frozenset[str] = frozenset(
    {
        "_orig_mod",  # torch.compile's OptimizedModule
        "_checkpoint_wrapped_module",  # torch.distributed activation checkpoint wrapper
        "_fsdp_wrapped_module",  # FSDP1
        "_offload_wrapped_module",  # CPU offload wrapper
    }
)
"""Name components added by module wrappers; they carry no meaning for grouping."""

_EMBEDDING_SUFFIXES: tuple[tuple[str, ...], ...] = (("embed_tokens", "weight"), ("lm_head", "weight"))

NamedParams = list[tuple[str, nn.Parameter]]
ParamGroups = dict[str, NamedParams]


def canonical_name(name: str) -> str:
    """``name`` without wrapper components, e.g. ``_orig_mod.layers.0.mlp.gate.weight`` ->
    ``layers.0.mlp.gate.weight``; used for matching only, groups keep the original names."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def classify_param(name: str, param: nn.Parameter) -> str:
    """The group kind (one of :data:`GROUP_KINDS`) of one parameter, from its name and shape."""
    parts = tuple(canonical_name(name).split("."))
    if any(parts[-len(suffix) :] == suffix for suffix in _EMBEDDING_SUFFIXES):
        return "embedding"
    if param.ndim in (2, 3, 4):
        return "matrix"
    return "vector"


def split_params(model: nn.Module) -> ParamGroups:
    """Classify the trainable (``requires_grad``) parameters of ``model`` by kind.

    Returns ``{"matrix": [...], "embedding": [...], "vector": [...]}`` of ``(name, parameter)``
    pairs in ``model.named_parameters()`` order. Every trainable parameter appears exactly once
    (tied weights, e.g. a shared embedding / LM head, are listed once under their first name).
    """
    groups: ParamGroups = {kind: [] for kind in GROUP_KINDS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[classify_param(name, param)].append((name, param))
    return groups


def describe_groups(groups: ParamGroups) -> str:
    """A small table (group, #tensors, #params) printed at the start of training, so a mistake in
    the split (say, the LM head landing in "matrix") is visible before any compute is spent."""
    rows = [(kind, len(params), sum(p.numel() for _, p in params)) for kind, params in groups.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    name_w = max(len("group"), *(len(r[0]) for r in rows))
    count_w = max(len("tensors"), *(len(f"{r[1]:,}") for r in rows))
    numel_w = max(len("params"), *(len(f"{r[2]:,}") for r in rows))
    lines = [f"{'group':<{name_w}}  {'tensors':>{count_w}}  {'params':>{numel_w}}"]
    lines += [f"{kind:<{name_w}}  {count:>{count_w},}  {numel:>{numel_w},}" for kind, count, numel in rows]
    return "\n".join(lines)
