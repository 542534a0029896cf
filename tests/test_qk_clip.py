"""QK-Clip (optim/qk_clip.py): per-head rescaling of q/k rows, checked by recomputing the max logits, on
plain weights and on FSDP2-sharded weights (2 real gloo ranks, uneven shards) against one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from models import ModelConfig, Transformer
from optim.qk_clip import (
    HeadLayout,
    clipped_heads,
    head_gammas,
    head_row_scales,
    qk_clip_,
    scale_rows_,
)
from tests.dist_harness import reporting_rank, run_reporting_ranks

pytestmark = pytest.mark.usefixtures("single_thread")

TAU = 10.0
# Per-layer, per-head factors the q and k_nope rows are inflated by: with TINY_MODEL's init the max logits
# (~1 before) land on both sides of TAU in every layer.
INFLATE = {0: [1.0, 6.0, 12.0, 30.0], 1: [20.0, 2.0, 40.0, 1.0]}


# --- helpers ------------------------------------------------------------------------------------------------
def _q_proj(attn: torch.nn.Module) -> torch.nn.Linear:
    return attn.q_proj if attn.cfg.q_lora_rank is None else attn.q_b_proj


@torch.no_grad()
def _inflate(model: Transformer, factors: dict[int, list[float]]) -> None:
    """Multiply head h's q rows (nope and rope) and its kv_b rows (k_nope and v) by factors[layer][h]."""
    cfg = model.cfg
    for i, attn in enumerate(model.attention_layers()):
        f = torch.tensor(factors[i])
        _q_proj(attn).weight.mul_(f.repeat_interleave(cfg.qk_head_dim)[:, None])
        attn.kv_b_proj.weight.mul_(f.repeat_interleave(cfg.qk_nope_head_dim + cfg.v_head_dim)[:, None])


def _record_attention_inputs(model: Transformer, x: torch.Tensor) -> dict[int, tuple]:
    """Run the model once and keep each attention layer's inputs (hidden states, rope)."""
    inputs: dict[int, tuple] = {}
    hooks = [attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args))
             for i, attn in enumerate(model.attention_layers())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _replay_max_logits(model: Transformer, inputs: dict[int, tuple]) -> dict[int, torch.Tensor]:
    """Fresh forward of each attention layer alone on recorded inputs: its max logits with the current weights
    (the layer's input does not move when an earlier layer is clipped)."""
    out = {}
    with torch.no_grad():
        for i, attn in enumerate(model.attention_layers()):
            attn.reset_max_logit()
            attn(*inputs[i])
            out[i] = attn.max_logit.clone()
    return out


def _row_parts(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head, is_rope) of every q row; (head, is_v) of every kv_b row."""
    dn, dr, dv, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    q_head = torch.arange(h).repeat_interleave(dn + dr)
    q_rope = torch.tensor(([False] * dn + [True] * dr) * h)
    kv_head = torch.arange(h).repeat_interleave(dn + dv)
    kv_v = torch.tensor(([False] * dn + [True] * dv) * h)
    return q_head, q_rope, kv_head, kv_v


# --- the per-row scale layout -------------------------------------------------------------------------------
def test_head_row_scales_layout_by_hand() -> None:
    gamma = torch.tensor([0.25, 1.0])  # head 0 clipped (sqrt = 0.5), head 1 not
    q = head_row_scales(gamma, 2, 1, "q")  # dn=2, dr=1
    assert q.tolist() == [0.5, 0.5, 0.25, 1.0, 1.0, 1.0]
    kv = head_row_scales(gamma, 2, 3, "kv")  # dn=2, dv=3: the v rows are never scaled
    assert kv.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    gamma = torch.tensor([1.0, 0.04])
    assert head_row_scales(gamma, 1, 2, "q").tolist() == pytest.approx([1, 1, 1, 0.2, 0.04, 0.04])
    assert head_row_scales(gamma, 1, 2, "kv").tolist() == pytest.approx([1, 1, 1, 0.2, 1, 1])
    with pytest.raises(ValueError, match="kind"):
        head_row_scales(gamma, 1, 2, "k")


def test_head_gammas() -> None:
    s = torch.tensor([200.0, 100.0, 50.0, float("-inf"), float("inf"), float("nan"), 100.5])
    assert clipped_heads(s, 100.0).tolist() == [True, False, False, False, False, False, True]
    g = head_gammas(s, 100.0)
    assert g[0].item() == 0.5 and g[-1].item() == pytest.approx(100 / 100.5, rel=1e-7)
    assert g[1:6].tolist() == [1.0] * 5  # at tau, below, no forward yet (-inf), overflow / nan: untouched


def test_scale_rows_only_writes_rows_with_scale_not_one() -> None:
    w = torch.randn(5, 3)
    w[1, 0] = float("nan")
    before = w.clone()
    scale = torch.tensor([1.0, 1.0, 0.5, 1.0, 2.0])
    scale_rows_(w, scale)
    assert torch.equal(w[[0, 3]], before[[0, 3]]) and torch.isnan(w[1, 0])
    assert torch.equal(w[2], before[2] * 0.5) and torch.equal(w[4], before[4] * 2)
    b = torch.randn(5, dtype=torch.bfloat16)
    expect = (b.float() * scale).to(torch.bfloat16)
    scale_rows_(b, scale)
    assert torch.equal(b, expect)
    with pytest.raises(ValueError, match="scale"):
        scale_rows_(w, torch.ones(4))


# --- the clip on a whole model --------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_clip_brings_every_head_to_tau_and_leaves_the_rest_alone(tiny_config, q_lora_rank: int | None) -> None:
    cfg = tiny_config(num_hidden_layers=2, q_lora_rank=q_lora_rank)  # layer 0 dense, layer 1 MoE
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    _inflate(model, INFLATE)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    inputs = _record_attention_inputs(model, x)
    max_logits = model.max_logits()
    clip = {i: clipped_heads(s, TAU) for i, s in max_logits.items()}
    assert all(c.any() and not c.all() for c in clip.values()), f"want clipped and unclipped heads: {max_logits}"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    counts = qk_clip_(model, tau=TAU)  # default: the model's own max logits

    assert counts == {i: int(c.sum()) for i, c in clip.items()}
    # Fresh forward of each attention layer on its (unchanged) input: clipped heads sit at tau, the rest
    # did not move.
    after = _replay_max_logits(model, inputs)
    for i in max_logits:
        assert (after[i] <= TAU * (1 + 1e-5)).all(), (i, after[i])
        torch.testing.assert_close(after[i][clip[i]], torch.full_like(after[i][clip[i]], TAU), rtol=1e-4, atol=0)
        torch.testing.assert_close(after[i][~clip[i]], max_logits[i][~clip[i]], rtol=1e-6, atol=0)
    # A fresh forward of the whole model: the first layer's input is unchanged, so the same holds there.
    model.reset_max_logits()
    with torch.no_grad():
        model(x)
    assert (model.max_logits()[0] <= TAU * (1 + 1e-5)).all()

    # The weights: only the clipped heads' q rows and k_nope rows moved, by sqrt(gamma) / gamma.
    q_head, q_rope, kv_head, kv_v = _row_parts(cfg)
    q_name = "q_proj" if q_lora_rank is None else "q_b_proj"
    state = model.state_dict()
    changed = set()
    for i in max_logits:
        gamma = (TAU / max_logits[i].double()).where(clip[i], torch.ones((), dtype=torch.float64))
        q_scale = torch.where(q_rope, gamma[q_head], gamma[q_head].sqrt())
        kv_scale = torch.where(kv_v, torch.ones(()), gamma[kv_head].sqrt())
        for name, kept, scale in ((f"layers.{i}.self_attn.{q_name}.weight", ~clip[i][q_head], q_scale),
                                  (f"layers.{i}.self_attn.kv_b_proj.weight", ~clip[i][kv_head] | kv_v, kv_scale)):
            changed.add(name)
            old, new = before[name], state[name]
            assert torch.equal(new[kept], old[kept]), f"{name}: rows of unclipped heads / v rows changed"
            torch.testing.assert_close(new.double(), old.double() * scale[:, None], rtol=1e-6, atol=0)
            assert not torch.equal(new, old)
    for name, value in state.items():  # o_proj, kv_a_proj_with_mqa (shared rope key), q_a_proj, FFNs, ...
        if name not in changed:
            assert torch.equal(value, before[name]), f"{name} changed"


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_one_layer_model_fresh_forward_max_logit_is_tau(tiny_config, q_lora_rank: int | None) -> None:
    """End to end: forward, clip, reset, forward again -> every head's max logit <= tau (== tau if clipped)."""
    cfg = tiny_config(num_hidden_layers=1, first_k_dense_replace=1, q_lora_rank=q_lora_rank)
    torch.manual_seed(1)
    model = Transformer(cfg)
    _inflate(model, {0: INFLATE[0]})
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model.train()
    model(x)
    s = model.max_logits()
    counts = qk_clip_(model, s, tau=TAU)
    model.reset_max_logits()
    with torch.no_grad():
        model(x)
    new, clip = model.max_logits()[0], clipped_heads(s[0], TAU)
    assert counts == {0: int(clip.sum())} and 0 < counts[0] < cfg.num_attention_heads
    assert (new <= TAU * (1 + 1e-5)).all()
    torch.testing.assert_close(new[clip], torch.full_like(new[clip], TAU), rtol=1e-4, atol=0)


def test_nothing_to_clip_is_a_no_op_and_wrappers_are_unwrapped(tiny_config) -> None:
    cfg = tiny_config(num_hidden_layers=2)
    torch.manual_seed(2)
    model = Transformer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert qk_clip_(model) == {0: 0, 1: 0}  # no forward since the reset: every max logit is -inf
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert qk_clip_(model, tau=100.0) == {0: 0, 1: 0}  # max logits ~1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    # Activation-checkpoint wrappers around the blocks; layers missing from `max_logits` are skipped.
    for name in list(model.layers):
        model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)
    s = {1: torch.tensor([1.0, 40.0, 1.0, 20.0])}
    assert qk_clip_(model, s, tau=TAU) == {1: 2}
    attn = model.layers["1"]._checkpoint_wrapped_module.self_attn
    layout = HeadLayout.of(attn)
    assert layout.q_proj is attn.q_b_proj and layout.num_heads == 4
    gamma = head_gammas(s[1], TAU)
    old_q = before["layers.1.self_attn.q_b_proj.weight"]
    expect = (old_q * head_row_scales(gamma, 8, 8, "q")[:, None])
    assert torch.equal(attn.q_b_proj.weight, expect)
    assert torch.equal(model.layers["0"]._checkpoint_wrapped_module.self_attn.q_b_proj.weight,
                       before["layers.0.self_attn.q_b_proj.weight"])

    with pytest.raises(ValueError, match="tau"):
        qk_clip_(model, s, tau=0.0)
    with pytest.raises(ValueError, match="shape"):
        qk_clip_(model, {0: torch.ones(3)}, tau=TAU)


def test_selective_checkpointing_leaves_torch_alone_and_ignores_profiler_annotations(tiny_config) -> None:
    """parallel.fsdp's selective activation checkpointing: the max logits QK-Clip reads and every gradient equal
    those without checkpointing, a profiler annotation that runs only in the recompute (as FSDP2's hooks can)
    is ignored, and torch's global SAC_IGNORED_OPS is left as it was."""
    import copy

    from torch.utils import checkpoint as ckpt

    from parallel.fsdp import apply_activation_checkpointing

    ignored = set(ckpt.SAC_IGNORED_OPS)
    cfg = tiny_config(num_hidden_layers=2)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(model, "selective")
    recomputing = False

    def annotate(module: torch.nn.Module, args: tuple) -> None:
        if recomputing:
            with torch.profiler.record_function("in the recompute only"):
                pass

    for block in model.layers.values():
        block._checkpoint_wrapped_module.mlp.register_forward_pre_hook(annotate)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    grads, logits = {}, {}
    for name, m in (("ref", ref), ("selective", model)):
        out = m(ids)
        recomputing = True
        (out.logits.float().pow(2).mean() + out.balance_loss).backward()
        recomputing = False
        grads[name] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()}
        logits[name] = m.max_logits()
    assert grads["selective"].keys() == grads["ref"].keys()
    for n, g in grads["ref"].items():
        torch.testing.assert_close(grads["selective"][n], g, rtol=0, atol=0, msg=n)  # the same ops, recomputed
    torch.testing.assert_close(logits["selective"], logits["ref"], rtol=0, atol=0)
    assert set(ckpt.SAC_IGNORED_OPS) == ignored


# --- FSDP2-sharded weights on 2 gloo ranks ---------------------------------------------------------------------
# 3 heads, dn=3, dr=2, dv=2: q and kv_b weights have 15 rows, sharded 8 / 7, and head 1 straddles the cut.
SHARD_MODEL = dict(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=2,
    num_attention_heads=3, kv_lora_rank=8, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=2,
    max_position_embeddings=32, initializer_range=0.1, rope_theta=10000.0,
)
SHARD_INFLATE = {0: [30.0, 1.0, 10.0], 1: [1.0, 20.0, 5.0]}
# Global max logits given to every rank (as after the trainer's all-reduce MAX): heads 0, 2 of layer 0 and
# the straddling head 1 of layer 1 are clipped; -inf (no forward) is left alone.
SHARD_LOGITS = {0: torch.tensor([200.0, 5.0, 50.0]), 1: torch.tensor([3.0, 40.0, float("-inf")])}
WORLD = 2


def _shard_model(q_lora_rank: int | None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHARD_MODEL, q_lora_rank=q_lora_rank))
    _inflate(model, SHARD_INFLATE)
    return model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: FSDP2-shard the models, run forward+backward, QK-Clip, gather the full state dicts."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    with reporting_rank(rank, world, port, out) as report:
        mesh = init_device_mesh("cpu", (world,))
        results: dict = {}
        for q_lora_rank in (None, 6):
            model = _shard_model(q_lora_rank)
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            x = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
            model.train()
            model(x).logits.float().pow(2).mean().backward()  # the clip runs after backward + step
            q = _q_proj(model.layers["1"].self_attn).weight
            assert isinstance(q, DTensor), type(q)
            report[f"q_local_rows_{q_lora_rank}"] = q.to_local().shape[0]
            logits = {i: s.clone() for i, s in model.max_logits().items()}
            for s in logits.values():
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
            counts = qk_clip_(model, SHARD_LOGITS, tau=TAU)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            results[str(q_lora_rank)] = {"counts": counts, "logits": logits, "state": state}
        # scale_rows_ on hand-made DTensors: an empty shard (1 row on 2 ranks), uneven rows, a column shard,
        # a replicated weight and a 1-D bias.
        gen = torch.Generator().manual_seed(4)
        cases = {"empty": ([1, 4], Shard(0)), "uneven": ([5, 3], Shard(0)), "cols": ([4, 5], Shard(1)),
                 "replicated": ([3, 2], Replicate()), "bias": ([5], Shard(0))}
        tensors = {}
        for name, (shape, placement) in cases.items():
            full = torch.randn(shape, generator=gen)
            scale = torch.rand(shape[0], generator=gen).where(torch.arange(shape[0]) % 2 == 0, torch.ones(()))
            d = distribute_tensor(full.clone(), mesh, [placement])  # Replicate would alias `full`
            scale_rows_(d, scale)
            tensors[name] = (full, scale, d.full_tensor())
        results["tensors"] = tensors
        if rank == 0:
            torch.save(results, Path(out) / "results.pt")


def test_fsdp2_sharded_clip_equals_single_process(tmp_path: Path) -> None:
    try:
        reports = run_reporting_ranks(_worker, WORLD, tmp_path, timeout=120.0)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    rows = 3 * (3 + 2)
    for q_lora_rank in (None, 6):
        # Uneven shards: 15 rows -> 8 + 7.
        assert [reports[r][f"q_local_rows_{q_lora_rank}"] for r in range(WORLD)] == [math.ceil(rows / 2), rows // 2]
        got = results[str(q_lora_rank)]
        ref = _shard_model(q_lora_rank)
        x = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
        ref.train()
        ref(x)
        for i, s in ref.max_logits().items():  # the sharded forward saw the same logits
            torch.testing.assert_close(got["logits"][i], s, rtol=1e-5, atol=1e-5)
        before = {k: v.clone() for k, v in ref.state_dict().items()}
        counts = qk_clip_(ref, SHARD_LOGITS, tau=TAU)
        assert got["counts"] == counts == {0: 2, 1: 1}
        expected = ref.state_dict()
        assert sorted(got["state"]) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(got["state"][name], value), f"q_lora_rank={q_lora_rank}: {name} differs"
        q_name = "q_proj" if q_lora_rank is None else "q_b_proj"
        for name in (f"layers.1.self_attn.{q_name}.weight", "layers.1.self_attn.kv_b_proj.weight"):
            assert not torch.equal(expected[name], before[name])  # the straddling head 1 was clipped
    for name, (full, scale, gathered) in results["tensors"].items():
        expect = full.clone()
        scale_rows_(expect, scale)
        assert torch.equal(gathered, expect), name
