"""models.init: world-size-independent initialisation.

Single-process properties, then real multi-process checks: W gloo ranks (processes forked from a
forkserver) fill DTensors / an FSDP2-sharded model, and their gathered values must equal bit for bit the
single-process init computed here, in the pytest process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import ModelConfig, Transformer
from models.init import block_seed, canonical_name, init_normal_
from tests.dist_harness import reporting_rank, run_reporting_ranks

SEED, STD = 1234, 0.02

# A small DeepSeek-V3-shaped model: MLA with q_lora, 1 dense + 1 MoE layer, 8 experts (2 per token).
SMALL = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, first_k_dense_replace=1,
    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
    rope_theta=10000.0, max_position_embeddings=64, initializer_range=0.05,
)


def reference(shape: list[int], name: str, dtype: str = "float32", block_rows: int = 64) -> torch.Tensor:
    t = torch.empty(shape, dtype=getattr(torch, dtype))
    init_normal_(t, name, SEED, STD, block_rows=block_rows)
    return t


# ============================================================================ single process
def test_deterministic_per_seed_and_name() -> None:
    a, b = reference([70, 33], "w"), reference([70, 33], "w")
    assert torch.equal(a, b)
    other_seed = torch.empty(70, 33)
    init_normal_(other_seed, "w", SEED + 1, STD)
    assert not torch.equal(a, other_seed)
    assert not torch.equal(a, reference([70, 33], "v"))
    # no two blocks share a stream: rows 0 and 64 (first rows of blocks 0 and 1) differ
    assert not torch.equal(a[0], a[64])
    assert len({block_seed(s, n, b) for s in (0, 1) for n in ("a", "b") for b in range(100)}) == 400


def test_block_rows_is_part_of_the_function() -> None:
    """block_rows does not affect determinism (same block_rows -> same values, whatever the shard), but
    it picks the streams: another block_rows gives other, equally distributed values. It also sets the
    memory of one generated block and the excess a rank draws at its shard's edges."""
    a, b = reference([100, 8], "w", block_rows=16), reference([100, 8], "w", block_rows=16)
    assert torch.equal(a, b)
    assert torch.equal(a[:16], reference([16, 8], "w", block_rows=16))  # block 0 alone
    c = reference([100, 8], "w", block_rows=7)
    assert not torch.equal(a, c)
    assert c.std().item() == pytest.approx(STD, rel=0.1)


def test_statistics_of_a_large_matrix() -> None:
    w = reference([512, 1024], "big")
    assert w.std().item() == pytest.approx(STD, rel=0.01)
    assert abs(w.mean().item()) < 5 * STD / w.numel() ** 0.5
    assert abs(w[:, 0].mean().item()) < 5 * STD / 512**0.5  # columns are not correlated with rows


def test_rows_view_dtype_and_errors() -> None:
    """The value of an element depends on its row in the [prod(shape[:-1]), cols] view only."""
    stacked = reference([8, 6, 4], "e")
    assert torch.equal(stacked.view(48, 4), reference([48, 4], "e"))
    assert torch.equal(reference([9, 7], "b", dtype="bfloat16"), reference([9, 7], "b").to(torch.bfloat16))
    noncontig = torch.empty(7, 9).t()
    init_normal_(noncontig, "t", SEED, STD)
    assert torch.equal(noncontig, reference([9, 7], "t"))
    empty = torch.empty(0, 5)
    init_normal_(empty, "z", SEED, STD)
    with pytest.raises(ValueError, match="meta"):
        init_normal_(torch.empty(3, 3, device="meta"), "m", SEED, STD)


def test_any_row_subset_in_any_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard may own any set of rows, listed in any order (the general path behind _StridedShard):
    each local row gets the values of its global row."""
    import models.init as init

    full = reference([10, 3, 4], "p", block_rows=4)
    dim0, dim1 = torch.tensor([7, 2, 3, 9]), torch.tensor([2, 0])
    local = torch.empty(4, 2, 4, dtype=torch.float64)  # also a dtype other than the generated float32
    monkeypatch.setattr(init, "shard_indices", lambda t: (local, [dim0, dim1, torch.arange(4)]))
    init_normal_(torch.empty(10, 3, 4), "p", SEED, STD, block_rows=4)  # the global tensor's stand-in
    assert torch.equal(local, full[dim0][:, dim1].double())


def test_canonical_name_strips_wrappers() -> None:
    assert canonical_name("layers.3._checkpoint_wrapped_module.mlp.gate_proj.weight") == \
        "layers.3.mlp.gate_proj.weight"
    assert canonical_name("_orig_mod.layers._fsdp_wrapped_module.0.norm.weight") == "layers.0.norm.weight"


def test_transformer_init_weights() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = ModelConfig(**SMALL)
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(SEED)
    b.init_weights(seed=SEED)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for name, p in a.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif p.dim() == 1:
            assert torch.all(p == 0), name
        else:
            assert torch.equal(p, _scaled_reference(p, name, cfg.initializer_range)), name
    # another seed changes every matrix; the old generator argument maps to its initial seed
    b.init_weights(SEED + 1)
    assert not torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    b.init_weights(generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(a.layers["1"].mlp.experts.gate_up_proj, b.layers["1"].mlp.experts.gate_up_proj)
    # wrapped blocks keep their names, hence their init
    for key, block in list(b.layers.items()):
        b.layers[key] = checkpoint_wrapper(block)
    b.init_weights(SEED)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert n1 == canonical_name(n2) and torch.equal(p1, p2), n2
    # default: a seed drawn from torch's global RNG
    torch.manual_seed(5)
    c = Transformer(cfg)
    torch.manual_seed(5)
    assert torch.equal(c.lm_head.weight, Transformer(cfg).lm_head.weight)


def _scaled_reference(p: torch.Tensor, name: str, std: float) -> torch.Tensor:
    t = torch.empty(p.shape, dtype=p.dtype)
    init_normal_(t, name, SEED, std)
    return t


# =========================================================================== multi-process
# (case id, shape, dtype, block_rows, mesh ("1d" or "2d"), placements as (kind, dim) pairs)
CASES_1D = [
    ("even2d", [8, 5], "float32", 64, [("S", 0)]),
    ("uneven2d", [7, 5], "float32", 64, [("S", 0)]),
    ("tiny_rows", [3, 4], "float32", 64, [("S", 0)]),  # W=4: the last rank holds no row
    ("multiblock", [130, 3], "float32", 16, [("S", 0)]),  # shards cut blocks
    ("experts_s0", [8, 6, 4], "float32", 64, [("S", 0)]),
    ("experts_s1", [8, 6, 4], "float32", 4, [("S", 1)]),  # per-expert row ranges, blocks span experts
    ("experts_s1_uneven", [3, 7, 4], "float32", 5, [("S", 1)]),
    ("replicated", [6, 4], "float32", 64, [("R", 0)]),
    ("bf16", [9, 7], "bfloat16", 64, [("S", 0)]),
    ("strided_1d", [8, 5], "float32", 2, [("SS", 0)]),  # sf=2: each rank holds two separate row ranges
]
CASES_2D = [
    ("ep_dp_s0_s1", [8, 6, 4], "float32", 64, [("S", 0), ("S", 1)]),
    ("ep_dp_s1_s0", [8, 6, 4], "float32", 4, [("S", 1), ("S", 0)]),
    ("strided", [8, 6, 4], "float32", 4, [("SS", 0), ("S", 0)]),  # FSDP2 Shard(0) on top of EP Shard(0)
    ("both_dim0_uneven", [7, 5], "float32", 2, [("S", 0), ("S", 0)]),
    ("s1_replicate", [3, 6, 4], "float32", 64, [("S", 1), ("R", 0)]),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[Path, dict[int, dict]]]:
    """ranks(W) -> (output dir, per-rank reports) of one W-rank run, shared by the tests below."""
    runs: dict[int, tuple[Path, dict[int, dict]] | str] = {}

    def get(world: int) -> tuple[Path, dict[int, dict]]:
        if world not in runs:
            out = tmp_path_factory.mktemp(f"world{world}")
            try:
                runs[world] = (out, run_reporting_ranks(_worker_main, world, out))
            except RuntimeError as e:
                runs[world] = str(e)
        run = runs[world]
        if isinstance(run, str):
            pytest.fail(run, pytrace=False)
        return run

    return get


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_dtensors_match_single_process(world: int, ranks) -> None:
    out, reports = ranks(world)
    gathered = torch.load(out / "tensors.pt")
    cases = CASES_1D + (CASES_2D if world == 4 else [])
    extra = ["fsdp_ep_s0", "fsdp_ep_s1"] if world == 4 else []
    assert sorted(gathered) == sorted([c[0] for c in cases] + extra)
    for case, shape, dtype, block_rows, _ in cases:
        expected = reference(shape, case, dtype, block_rows)
        assert torch.equal(gathered[case], expected), f"{case}: sharded init differs from single process"
    if world == 4:
        for case in extra:  # built like parallel/: EP Shard(0) over "ep", then FSDP2 over "dp_mod_ep"
            assert torch.equal(gathered[case], reference([8, 6, 4], "experts", block_rows=4)), case
        assert reports[0]["placements"]["fsdp_ep_s0"].startswith("(_StridedShard"), reports[0]
        assert any(r["local_shapes"]["tiny_rows"][0] == 0 for r in reports.values())  # an empty shard
    for r in reports.values():
        assert "last dim" in r["last_dim_error"], r["last_dim_error"]


def test_fsdp2_model_init_matches_single_process(ranks) -> None:
    out, reports = ranks(2)
    saved = torch.load(out / "model.pt")
    plain = Transformer(ModelConfig(**SMALL))
    plain.init_weights(SEED)
    expected = plain.state_dict()
    got = {canonical_name(k): v for k, v in saved["state_dict"].items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{key}: FSDP2 init differs from single process"
    assert all(r["sharded_params"] > 0 for r in reports.values())
    assert reports[0]["logits_equal"], "FSDP2 forward differs from the single-process forward (same process)"
    with torch.no_grad():  # and from this process's (other thread count: allow reduction-order noise)
        torch.testing.assert_close(saved["logits"], plain(saved["ids"]).logits, rtol=1e-5, atol=1e-6)


# ================================================================================ rank side
def _placements(spec: list[tuple[str, int]], split_factor: int) -> list:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    make = {"S": Shard, "R": lambda _: Replicate(),
            "SS": lambda d: _StridedShard(d, split_factor=split_factor)}
    return [make[kind](dim) for kind, dim in spec]


def _worker_tensors(rank: int, world: int, out: Path) -> dict:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    report: dict = {"local_shapes": {}, "placements": {}}
    gathered = {}
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep")) if world == 4 else None
    cases = [(c, mesh1) for c in CASES_1D] + [(c, mesh2) for c in CASES_2D if mesh2 is not None]
    for (case, shape, dtype, block_rows, spec), mesh in cases:
        dt = distribute_tensor(torch.empty(shape, dtype=getattr(torch, dtype)), mesh, _placements(spec, 2))
        init_normal_(dt, case, SEED, STD, block_rows=block_rows)
        report["local_shapes"][case] = list(dt.to_local().shape)
        gathered[case] = dt.full_tensor()

    if mesh2 is not None:  # the expert layout parallel/ builds: EP Shard(0) over "ep", then FSDP2
        for case, fsdp_dim in (("fsdp_ep_s0", 0), ("fsdp_ep_s1", 1)):
            ep = mesh2["ep"]
            module = nn.Module()
            local = torch.empty(8 // ep.size(), 6, 4)
            module.w = nn.Parameter(DTensor.from_local(local, ep, [Shard(0)], run_check=False,
                                                       shape=torch.Size([8, 6, 4]), stride=(24, 4, 1)))
            fully_shard(module, mesh=mesh2["dp_mod_ep"], shard_placement_fn=lambda p, d=fsdp_dim: Shard(d))
            init_normal_(module.w, "experts", SEED, STD, block_rows=4)
            report["placements"][case] = str(tuple(module.w.placements))
            gathered[case] = module.w.full_tensor()

    last = distribute_tensor(torch.empty(4, 8), mesh1, [Shard(1)])
    try:
        init_normal_(last, "last", SEED, STD)
        report["last_dim_error"] = "no error raised"
    except NotImplementedError as e:
        report["last_dim_error"] = str(e)
    if rank == 0:
        torch.save(gathered, out / "tensors.pt")
    return report


def _worker_model(rank: int, world: int, out: Path) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    cfg = ModelConfig(**SMALL)
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = Transformer(cfg)
    for key, block in list(model.layers.items()):  # names gain `_checkpoint_wrapped_module.`
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(rank)  # the init must not depend on the global RNG either
    model.init_weights(SEED)
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids).logits
    report = {"sharded_params": sharded}
    if rank == 0:
        plain = Transformer(cfg)
        plain.init_weights(SEED)
        with torch.no_grad():
            report["logits_equal"] = bool(torch.equal(logits, plain(ids).logits))
        torch.save({"state_dict": {k: v.detach().clone() for k, v in state.items()}, "ids": ids,
                    "logits": logits}, out / "model.pt")
    return report


def _worker_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank: W=2 runs the DTensor cases and the FSDP2 model, W=4 the DTensor cases (1-D and 2-D
    meshes). Writes rank{rank}.json with its report or the traceback of what failed."""
    with reporting_rank(rank, world, port, out) as report:
        report.update(_worker_tensors(rank, world, Path(out)))
        if world == 2:
            report.update(_worker_model(rank, world, Path(out)))
