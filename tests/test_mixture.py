"""Weighted mixtures of sources: exact proportions, a pure function of (seed, index), resumable, any world size."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data.dataset import MixtureDataset, WindowDataset
from data.loader import TokenBatchLoader, build_loaders
from data.shards import write_shard
from data.tokenizer import ByteTokenizer

SEQ = 8


def _source(root: Path, name: str, lo: int, num_docs: int) -> Path:
    """A prepared-looking source whose token ids all lie in [lo, lo + 50): a sample tells its source."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(lo)
    for split, n in (("train", num_docs), ("val", max(2, num_docs // 4))):
        docs = [rng.integers(lo, lo + 50, size=int(rng.integers(3, 30))) for _ in range(n)]
        write_shard(root / name / split / "part-00000000", docs, tok.fingerprint, tok.vocab_size, tok.eos_id)
    return root / name


def _which(rows: np.ndarray) -> list[int]:
    """Source of each sample row from its token range (the EOS id 256 belongs to every source)."""
    out = []
    for r in rows:
        body = r[r != 256]
        out.append(int(body.min()) // 100)
    return out


@pytest.fixture()
def sources(tmp_path: Path) -> list[WindowDataset]:
    paths = [_source(tmp_path, n, lo, docs) for n, lo, docs in (("a", 0, 40), ("b", 100, 200), ("c", 200, 10))]
    return [WindowDataset([str(p / "train" / "part-00000000")], SEQ, seed=i) for i, p in enumerate(paths)]


def test_block_proportions_are_exact_and_every_source_sample_is_used_once(sources: list[WindowDataset]) -> None:
    mix = MixtureDataset(sources, [0.5, 0.3, 0.2], seed=3)
    assert (mix.block, mix.slots) == (10, [5, 3, 2])
    n = 40 * mix.block
    src, within = mix.locate(np.arange(n))
    assert Counter(src.tolist()) == {0: 200, 1: 120, 2: 80}
    for s, k in ((0, 200), (1, 120), (2, 80)):  # in-source indices 0..k-1, each exactly once, in some order
        assert sorted(within[src == s].tolist()) == list(range(k))
    for b in range(40):  # the proportions hold in every block, not just on average
        assert Counter(src[b * 10 : (b + 1) * 10].tolist()) == {0: 5, 1: 3, 2: 2}
    assert _which(mix.samples(0, 60)) == src[:60].tolist()
    # The rows are the sources' own samples (in the sources' own shuffled orders, wrapping epochs).
    rows = mix.gather(np.arange(n))
    for s in range(3):
        expected = sources[s].gather(within[src == s])
        np.testing.assert_array_equal(rows[src == s], expected)


def test_order_is_keyed_by_seed_and_independent_of_how_it_is_read(sources: list[WindowDataset]) -> None:
    a = MixtureDataset(sources, [1, 1, 2], seed=5)
    b = MixtureDataset(sources, [1, 1, 2], seed=6)
    assert (a.block, a.slots) == (4, [1, 1, 2])
    idx = np.arange(400)
    assert a.locate(idx)[0].tolist() != b.locate(idx)[0].tolist()
    whole = a.samples(0, 400)
    pieces = np.concatenate([a.samples(s, 7) for s in range(0, 399, 7)] + [a.samples(399, 1)])
    np.testing.assert_array_equal(whole, pieces)
    shuffled = np.random.default_rng(0).permutation(400)
    np.testing.assert_array_equal(a.gather(shuffled), whole[shuffled])
    np.testing.assert_array_equal(MixtureDataset(sources, [1, 1, 2], seed=5).samples(123, 9), whole[123:132])


def test_loader_over_a_mixture_resumes_exactly_on_another_world_size(sources: list[WindowDataset]) -> None:
    mix = MixtureDataset(sources, [3, 1, 1], seed=1)
    full = TokenBatchLoader(mix, 8, prefetch=2)
    ref = [next(full)[0] for _ in range(6)]
    full.close()
    halves = [TokenBatchLoader(mix, 8, dp_rank=r, dp_world=2, start_sample=3 * 8, prefetch=1) for r in range(2)]
    for step in range(3, 6):
        got = [next(h)[0] for h in halves]
        assert np.array_equal(np.concatenate(got), ref[step].numpy())
    for h in halves:
        h.close()


@pytest.mark.parametrize(("weights", "match"), [
    ([1, 0, 1], "source 1: mixture weight must be a positive number, got 0"),
    ([1, -2, 1], "got -2"),
    ([1, float("nan"), 1], "got nan"),
    ([1, 1e-9, 1], "source 1: weight 1e-09 is below the mixture resolution"),
])
def test_bad_weights_are_refused_with_the_source_named(sources: list[WindowDataset], weights: list[float],
                                                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixtureDataset(sources, weights, seed=0)


def test_length_is_the_samples_before_any_source_wraps(sources: list[WindowDataset]) -> None:
    mix = MixtureDataset(sources, [1, 1, 1], seed=0, shuffle=False)
    smallest = min(len(s) for s in sources)
    assert len(mix) == smallest * 3
    src, within = mix.locate(np.arange(len(mix)))
    assert all(int(within[src == s].max()) < len(sources[s]) for s in range(3))


def test_build_loaders_with_sources(tmp_path: Path) -> None:
    for n, lo, docs in (("a", 0, 40), ("b", 100, 200)):
        _source(tmp_path, n, lo, docs)
    cfg = {"sources": [{"path": str(tmp_path / "a"), "weight": 0.25}, {"path": str(tmp_path / "b"), "weight": 0.75}],
           "prefetch": 0}
    loader, val, tok = build_loaders(cfg, SEQ, 16, seed=0)
    assert isinstance(tok, ByteTokenizer) and isinstance(val, MixtureDataset)
    counts = Counter()
    for _ in range(10):
        inputs, targets = next(loader)
        rows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)
        counts.update(_which(rows))
    assert counts == {0: 40, 1: 120}
    assert math.isclose(val.weights[0], 0.25)
    # A mixture may not mix tokenizers: a source with another fingerprint is refused by name.
    other = tmp_path / "c" / "train" / "part-00000000"
    write_shard(other, [[1, 2, 3]] * 50, "0123456789abcdef", 300, 299)
    write_shard(tmp_path / "c" / "val" / "part-00000000", [[1, 2, 3]] * 50, "0123456789abcdef", 300, 299)
    cfg["sources"].append({"path": str(tmp_path / "c"), "weight": 1.0, "name": "odd"})
    with pytest.raises(Exception, match="0123456789abcdef.*(data source odd)"):
        build_loaders(cfg, SEQ, 16, seed=0)
