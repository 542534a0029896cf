"""`train.compile`: each transformer block compiled (inductor on CPU) trains to the same losses as eager, and the MoE
layer compiles into one graph both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.moe import MoE
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: a minute or two on 2 cores


def test_compiled_blocks_train_like_eager(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """20 tiny steps (shrunk batch) compiled and eager: losses equal within 1e-4, the compile time logged once,
    and the blocks really compiled (their forward is dynamo's)."""
    losses = {}
    for compiled in (False, True):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"train.out_dir={tmp_path / str(compiled)}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=20",
            "data.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=0",
            "logging.progress=false", "checkpoint.save_final=false", f"train.compile={str(compiled).lower()}"])
        trainer = Trainer(cfg)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.model.layers.values()) \
            == compiled
        capsys.readouterr()
        trainer.run()
        out = capsys.readouterr().out
        assert out.count("torch.compile: step 1 took") == int(compiled), out
        records = [json.loads(line) for line in (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in records if "loss" in r]
    assert len(losses[True]) == 20
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)) < 1e-4
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_compiles_into_one_graph_both_ways(tiny_config, dtype: torch.dtype) -> None:
    """The MoE layer — routing, the sort, the expert FFN's custom autograd function with its grouped GEMMs —
    compiles with `fullgraph=True` (a graph break raises) and equals eager forward and backward: the backward's
    gradient halves are written without a non-contiguous `out=`, and the fp32 grouped GEMM is a custom op rather
    than a `torch.compiler.disable` region (either broke the graph before). On CPU every grouped GEMM of the
    compiled code, bf16 too, is that op: inductor tracing `_grouped_mm` itself dropped the transposed weight copy
    made for oneDNN's bf16 GEMM, and the compiled bf16 step ran 2x slower than eager (bench/moe_layer.py)."""
    from torch._inductor.utils import run_and_get_code

    cfg = tiny_config(hidden_size=64, moe_intermediate_size=32)  # rows 16-byte aligned: the grouped-GEMM path
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer.to(dtype)
    x = torch.randn(2, 16, 64, dtype=dtype, requires_grad=True)
    eager_out = layer(x)[0]
    eager_out.float().square().sum().backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    compiled = torch.compile(layer, fullgraph=True)

    def fwd_bwd() -> torch.Tensor:
        out = compiled(x)[0]
        out.float().square().sum().backward()
        return out

    compiled_out, codes = run_and_get_code(fwd_bwd)
    calls = [c.count("= torch.ops.chogori.grouped_mm.default(") for c in codes]
    assert calls == [2, 4], calls  # forward: gate/up and down; backward: their input and weight gradients
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(compiled_out, eager_out, **tol)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-3}
    for a, b in zip([x.grad] + [p.grad for p in layer.parameters()], eager, strict=True):
        torch.testing.assert_close(a, b, **tol)
