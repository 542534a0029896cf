"""Training from a `datasets` stream (data/streaming.py): exact tokens, disjoint ranks, exact resume, a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.loader import build_loaders, eval_batches
from data.prepare import is_validation
from data.shards import DataError
from data.stream_source import open_splits
from data.streaming import StreamingTokenLoader
from data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH = 16, 4
TOK = ByteTokenizer()


def _texts(n: int, tag: str = "d") -> list[str]:
    rng = np.random.default_rng(len(tag))
    return [f"{tag}{i}:" + "ab c"[: int(rng.integers(0, 4))] * int(rng.integers(1, 9)) for i in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same 41 documents as one jsonl file (one stream shard) and as a save_to_disk dataset (two)."""
    import datasets

    root = tmp_path_factory.mktemp("stream")
    texts = _texts(41)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"), num_shards=2)
    return {"texts": texts, "jsonl": str(jsonl), "saved": str(root / "saved"), "root": root}


def _train_split(sources: dict[str, object], kind: str) -> object:
    if kind == "jsonl":
        return open_splits("json", data_files=[sources["jsonl"]])["train"]
    return open_splits(str(sources["saved"]))["train"]


def _loader(sources: dict[str, object], kind: str, rank: int = 0, world: int = 1, **kw: object
            ) -> StreamingTokenLoader:
    return StreamingTokenLoader(_train_split(sources, kind), TOK, SEQ, BATCH * world, dp_rank=rank,
                                dp_world=world, **kw)


def _stream(batches: list[tuple[object, object]]) -> np.ndarray:
    """The token stream the batches' windows were cut from (consecutive windows share one token)."""
    rows = [np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1) for x, y in batches]
    windows = np.concatenate(rows)
    return np.concatenate([windows[0], *[w[1:] for w in windows[1:]]])


def _first_epoch_docs(stream: np.ndarray) -> list[str]:
    """The whole documents of a stream, up to the first one seen again (the next epoch)."""
    docs: list[str] = []
    ends = np.flatnonzero(stream == TOK.eos_id)
    for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends, strict=True):
        part = TOK.decode(stream[a + 1:b].tolist())
        if part in docs:
            break
        docs.append(part)
    return docs


def _encoded(texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array([*TOK.encode(t), TOK.eos_id]) for t in texts])


@pytest.mark.parametrize("kind", ["jsonl", "saved"])
def test_one_rank_yields_the_documents_tokens_in_order(sources: dict[str, object], kind: str) -> None:
    expected = _encoded(sources["texts"])  # type: ignore[arg-type]
    loader = _loader(sources, kind)
    batches = [next(loader) for _ in range(len(expected) // (BATCH * SEQ) + 2)]  # into the second epoch
    x, y = batches[0]
    assert x.shape == y.shape == (BATCH, SEQ) and str(x.dtype) == "torch.int64"
    assert np.array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])
    stream = _stream(batches)
    assert np.array_equal(stream[: len(expected)], expected)
    assert np.array_equal(stream[len(expected):], expected[: len(stream) - len(expected)])  # epoch 2, same order
    assert loader.samples_consumed == BATCH * len(batches)
    loader.close()


@pytest.mark.parametrize("kind", ["jsonl", "saved"])
def test_two_ranks_see_disjoint_shares_covering_everything(sources: dict[str, object], kind: str) -> None:
    seen = []
    for rank in (0, 1):
        loader = _loader(sources, kind, rank=rank, world=2, prefetch=0)
        seen.append(_first_epoch_docs(_stream([next(loader) for _ in range(12)])))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(sources["texts"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "workers", "shuffle"), [("jsonl", 1, 0), ("saved", 2, 0), ("jsonl", 1, 7),
                                                            ("saved", 2, 5)])
def test_resume_mid_stream_gives_exactly_the_uninterrupted_batches(sources: dict[str, object], kind: str,
                                                                   workers: int, shuffle: int) -> None:
    """At every position of the first 14 batches (past the first epoch; with a shuffle, inside blocks too)."""
    straight = _loader(sources, kind, workers=workers, shuffle_buffer=shuffle)
    expected = [next(straight) for _ in range(14)]
    straight.close()
    first = _loader(sources, kind, workers=workers, shuffle_buffer=shuffle, prefetch=0)
    for stop in range(1, 13):
        next(first)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it (JSON)
        resumed = _loader(sources, kind, workers=workers, shuffle_buffer=shuffle)
        resumed.load_state_dict(state)
        assert resumed.samples_consumed == stop * BATCH
        for want in expected[stop:stop + 2]:
            got = next(resumed)
            assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(got, want, strict=True)), stop
        resumed.close()
    first.close()
    with pytest.raises(DataError, match="for 1 data-parallel rank"):
        _loader(sources, kind, rank=1, world=2, workers=workers, shuffle_buffer=shuffle).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_buffer"):
        _loader(sources, kind, workers=workers, shuffle_buffer=shuffle + 3).load_state_dict(state)


def test_shuffle_permutes_each_block_anew_every_epoch(sources: dict[str, object]) -> None:
    """shuffle_buffer B: each run of B documents of the stream comes out as a permutation of itself, a different one
    each epoch; every document once per epoch."""
    texts, block = sources["texts"], 7
    loader = _loader(sources, "jsonl", shuffle_buffer=block)
    stream = _stream([next(loader) for _ in range(2 * len(_encoded(texts)) // (BATCH * SEQ) + 2)])  # type: ignore[arg-type]
    loader.close()
    ends = np.flatnonzero(stream == TOK.eos_id)
    docs = [TOK.decode(stream[a + 1:b].tolist()) for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends, strict=True)]
    epochs = [docs[:len(texts)], docs[len(texts):2 * len(texts)]]  # type: ignore[arg-type]
    assert len(epochs[1]) == len(texts)  # type: ignore[arg-type]
    for epoch in epochs:
        assert sorted(epoch) == sorted(texts)  # type: ignore[arg-type]
        assert epoch != texts
        for b in range(0, len(texts), block):  # type: ignore[arg-type]
            assert sorted(epoch[b:b + block]) == sorted(texts[b:b + block])  # type: ignore[index]
    assert epochs[0] != epochs[1]


def test_build_loaders_validation_split_or_held_out_documents(sources: dict[str, object]) -> None:
    root = sources["root"]
    assert isinstance(root, Path)
    val_file = root / "val.jsonl"
    val_texts = _texts(30, tag="validation")
    val_file.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(val_texts)))
    stream = {"path": "json", "data_files": {"train": sources["jsonl"], "validation": str(val_file)}}
    with pytest.raises(DataError, match=r"split 'validation' validation document 0: no field 'body' "
                                        r"\(fields: id, text\); choose one with data.stream.text_field"):
        build_loaders({"stream": {**stream, "text_field": "body"}}, SEQ, BATCH, seed=0)
    loader, val, tok = build_loaders({"stream": {**stream, "text_field": "text"}}, SEQ, BATCH, seed=0)
    assert tok.fingerprint == TOK.fingerprint
    want = _encoded(val_texts)
    assert len(val) == (len(want) - 1) // SEQ  # every validation document, packed like the training stream
    got = _stream([(x, y) for x, y in eval_batches(val, BATCH)])
    assert np.array_equal(got, want[: len(got)])
    # No validation split: documents held out by the hash of their text never train.
    loader, val, _ = build_loaders({"stream": {"path": sources["saved"], "val_fraction": 0.3, "val_docs": 100}},
                                   SEQ, BATCH, seed=0)
    held = {t for t in sources["texts"] if is_validation(t, 0.3)}  # type: ignore[union-attr]
    assert held and len(val) == (len(_encoded(sorted(held))) - 1) // SEQ
    trained = _first_epoch_docs(_stream([next(loader) for _ in range(12)]))
    assert set(trained) == set(sources["texts"]) - held  # type: ignore[arg-type]
    loader.close()
    _, val, _ = build_loaders({"stream": {"path": sources["saved"], "val_fraction": 0.0}}, SEQ, BATCH, seed=0)
    with pytest.raises(DataError, match="no split 'validation' and data.stream.val_fraction is 0"):
        list(eval_batches(val, BATCH))


def test_training_from_a_stream_runs_and_resumes_exactly(sources: dict[str, object], tmp_path: Path) -> None:
    """The trainer, unchanged, on a streamed and shuffled source: finite losses; a checkpoint-and-resume repeats
    them."""
    from train.checkpoint import list_checkpoints
    from train.config import load_config
    from train.trainer import Trainer

    def overrides(out: Path) -> list[str]:
        return [f"train.out_dir={out}", "data.stream.path=json", f"data.stream.data_files=[{sources['jsonl']}]",
                "data.stream.val_fraction=0.2", "data.stream.shuffle_buffer=6", "data.seq_len=16",
                "train.global_batch_size=4",
                "train.micro_batch_size=2", "train.eval_interval=2", "train.eval_batches=1", "train.steps=4",
                "logging.progress=false", "optim.warmup_steps=1", "checkpoint.keep_last=5",
                "train.threads=1"]  # one thread: a few seconds; torch's OpenMP threads crawl on a loaded machine

    def losses(out: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    tiny = ROOT / "configs" / "tiny.yaml"
    Trainer(load_config(tiny, overrides(tmp_path / "straight"))).run()
    straight = losses(tmp_path / "straight")
    assert len(straight) == 4 and all(np.isfinite(v) for v in straight.values())
    cut = tmp_path / "cut"
    Trainer(load_config(tiny, [*overrides(cut), "train.steps=2"])).run()
    assert [s for s, _ in list_checkpoints(cut)] == [2]
    resumed = Trainer(load_config(tiny, overrides(cut)))
    assert resumed.step == 2
    resumed.run()
    assert losses(cut) == straight
