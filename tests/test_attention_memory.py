"""The fused attention path (`attn_impl: sdpa`, the default) never holds an [S, S] tensor per head, and its
max logits (QK-Clip's input) and document masking equal the dense eager reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import attention
from models.attention import AttentionMask, MLAttention, document_mask_mod, query_chunk
from models.layers import RotaryEmbedding
from models.transformer import Transformer, document_mask
from tests.model_helpers import gen, randomize_

pytestmark = pytest.mark.usefixtures("single_thread")

S_LONG = 2048


class MaxOutput(TorchDispatchMode):
    """Records the largest number of elements of any op's output (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def long_config(tiny_config, attn_impl):
    # two heads, tiny dims: the [B, H, S, S] eager scores are 8M elements at S = 2048, the rest is small
    return tiny_config(attn_impl=attn_impl, num_attention_heads=2, max_position_embeddings=S_LONG,
                       num_hidden_layers=2, vocab_size=64)


def documents(b: int, s: int, seed: int) -> torch.Tensor:
    """[B, S] ids of packed documents of random lengths (ids restart per row, as the loader's do)."""
    cuts = torch.rand(b, s, generator=gen(seed)) < 8 / s
    cuts[:, 0] = False
    return cuts.cumsum(dim=1)


def attention_layer(cfg, seed: int = 3) -> tuple[MLAttention, RotaryEmbedding]:
    attn = MLAttention(cfg)
    randomize_(attn, seed=seed, std=0.3)
    return attn, RotaryEmbedding(cfg)


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
def test_no_op_output_is_quadratic_at_2048(tiny_config, docs):
    """A forward + backward of a 2-layer model at S = 2048: with the fused path no op output reaches
    B*S*S/2 elements (the eager path, which must fail this, makes [B, H, S, S]); the first layer's max
    logits (8 chunks of 256 rows) equal the eager ones bit for bit."""
    b = 1
    ids = torch.randint(0, 64, (b, S_LONG), generator=gen(1))
    doc_ids = documents(b, S_LONG, seed=2) if docs else None
    largest, max_logits = {}, {}
    for impl in ("eager", "sdpa"):
        model = Transformer(long_config(tiny_config, impl))
        model.init_weights(generator=gen(4))
        with MaxOutput() as m:
            out = model(ids, document_ids=doc_ids)
            F.cross_entropy(out.logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten()).backward()
        largest[impl] = (m.numel, m.op)
        max_logits[impl] = model.max_logits()
    limit = b * S_LONG * S_LONG // 2
    assert largest["eager"][0] >= limit, largest  # the check can fail: eager holds [B, H, S, S]
    assert largest["sdpa"][0] < limit, largest
    # layer 0 sees the same input in both models: bit for bit. Later layers see inputs that differ by the
    # rounding of SDPA's output vs eager softmax @ v, so only to that rounding.
    assert torch.equal(max_logits["sdpa"][0], max_logits["eager"][0])
    for i, v in max_logits["eager"].items():
        torch.testing.assert_close(max_logits["sdpa"][i], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("budget", [200, 2 * 4 * 40 * 17, 2**20], ids=["min-rows", "17-rows", "one-chunk"])
def test_chunked_max_logit_equals_dense_reference(tiny_config, monkeypatch, docs, budget):
    """Chunks of MIN_CHUNK_ROWS (16, 16, then a window reaching back for the last 8 rows), of 17 rows, and a
    single chunk give the eager max bit for bit (same inputs, same matmul kernel per score), running over two
    forwards; the output matches eager to float rounding."""
    monkeypatch.setitem(attention.CHUNK_ELEMENTS, "cpu", budget)
    b, s = 2, 40
    eager, rotary = attention_layer(tiny_config(attn_impl="eager"))
    fused = MLAttention(tiny_config(attn_impl="sdpa"))
    fused.load_state_dict(eager.state_dict())
    rope = rotary(torch.arange(s), torch.float32)
    for seed in (5, 6):
        x = torch.randn(b, s, 32, generator=gen(seed)) * (1 + seed - 5)
        mask = AttentionMask(documents(b, s, seed) if docs else None)
        out_e, out_f = eager(x, rope, mask), fused(x, rope, mask)
        torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.max_logit, eager.max_logit), fused.max_logit - eager.max_logit
    assert torch.isfinite(fused.max_logit).all()


def test_chunk_rows_bounded():
    cpu = torch.device("cpu")
    assert query_chunk(8, 4, 128, cpu) == 128  # the tiny preset runs one chunk
    assert query_chunk(1, 2, 2048, cpu) == 256
    assert query_chunk(1, 64, 32768, cpu) == attention.MIN_CHUNK_ROWS
    assert query_chunk(1, 1, 8, cpu) == 8
    for b, h, s in [(1, 1, 2048), (4, 16, 4096), (1, 64, 32768)]:
        rows = query_chunk(b, h, s, cpu)
        assert b * h * rows * s <= max(attention.CHUNK_ELEMENTS["cpu"], b * h * attention.MIN_CHUNK_ROWS * s)


def test_document_masking_same_loss_and_grads_as_dense_mask(tiny_config):
    """Document masking through the fused path (per-chunk SDPA, mask rows from the ids) gives the loss and
    gradients of today's dense [B, 1, S, S] mask (eager), and a document's logits equal that document alone."""
    cfg = tiny_config(initializer_range=0.15)
    b, s = 2, 48
    ids = torch.randint(0, 128, (b, s), generator=gen(7))
    doc_ids = documents(b, s, seed=8)
    positions = torch.stack([torch.cat([torch.arange(int(n)) for n in row.unique_consecutive(return_counts=True)[1]])
                             for row in doc_ids])
    labels = torch.randint(0, 128, (b, s), generator=gen(9))
    losses, grads, logits = {}, {}, {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = Transformer(cfg.replace(attn_impl=impl))
        model.init_weights(generator=gen(10))
        out = model(ids, positions=positions, document_ids=doc_ids).logits
        loss = F.cross_entropy(out.flatten(0, 1), labels.flatten())
        loss.backward()
        losses[impl], logits[impl] = loss.detach(), out.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["sdpa"], losses["eager"], rtol=1e-6, atol=1e-6)
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # the second document of row 0, run alone from position 0
    starts = (doc_ids[0].diff() != 0).nonzero().flatten() + 1
    lo, hi = int(starts[0]), int(starts[1]) if len(starts) > 1 else s
    with torch.no_grad():
        alone = model(ids[:1, lo:hi]).logits
    torch.testing.assert_close(logits["sdpa"][:1, lo:hi], alone, rtol=1e-5, atol=1e-5)


def test_document_mask_mod_and_rows_equal_dense_mask():
    """The flex_attention mask_mod (CUDA path) and the chunk rows (CPU path) agree with the dense mask."""
    b, s = 2, 33
    doc_ids = documents(b, s, seed=11)
    dense = document_mask(doc_ids)  # [B, 1, S, S]
    bi = torch.arange(b)[:, None, None, None]
    hi = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    qi = torch.arange(s)[None, None, :, None]
    ki = torch.arange(s)[None, None, None, :]
    assert torch.equal(document_mask_mod(doc_ids)(bi, hi, qi, ki), dense)
    assert torch.equal(attention.causal_mask_mod(bi, hi, qi, ki).expand(b, 1, s, s),
                       AttentionMask().rows(0, s, s, torch.device("cpu")).expand(b, 1, s, s))
    mask = AttentionMask(doc_ids)
    assert torch.equal(torch.cat([mask.rows(q0, min(s, q0 + 5), s, torch.device("cpu"))
                                  for q0 in range(0, s, 5)], dim=2), dense)
    expected = dense & torch.ones(s, s, dtype=torch.bool).tril()
    assert torch.equal(dense, expected) and not dense[:, :, 1:, :1].all()  # not plain causal


def test_flex_block_masks_build_on_cpu():
    """The CUDA path's pieces that run anywhere: flex_attention's own vmap over the mask_mod gives the dense
    document mask (so the ids indexing works under vmap), and the BlockMasks build with the right shapes."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    b, s = 2, 200
    doc_ids = documents(b, s, seed=12)
    dense = flex.create_mask(document_mask_mod(doc_ids), b, 1, s, s, device="cpu")
    assert torch.equal(dense, document_mask(doc_ids))
    cpu = torch.device("cpu")
    mask = AttentionMask(doc_ids)
    bm = mask.block_mask(b, s, cpu)
    assert bm.shape == (b, 1, s, s) and mask.block_mask(b, s, cpu) is bm  # built once, shared by the layers
    assert AttentionMask().block_mask(b, s, cpu).shape == (1, 1, s, s)  # causal: broadcast over the batch
    assert attention.flex_kernel_options() in ({"BACKEND": "TRITON"}, {})
