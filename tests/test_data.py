"""Tests of data/: tokenizer, shard format, permutation, loaders and the built-in corpus."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.builtin import builtin_corpus, default_cache_dir, is_validation
from data.dataset import FeistelPermutation, WindowDataset
from data.loader import TokenBatchLoader, build_loaders, eval_batches
from data.shards import ShardError, open_shard, token_dtype, write_shard
from data.tokenizer import ByteTokenizer, tokenizer_from_fingerprint

REPO = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


def _write(path: Path, docs: list[np.ndarray], vocab_size: int = 259, eos_id: int = 256) -> dict:
    return write_shard(path, docs, "test-fp", vocab_size, eos_id)


def _random_docs(rng: np.random.Generator, n: int, vocab: int = 256) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=int(rng.integers(0, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three small shards (~10k tokens each) of random documents."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        p = root / f"shard-{k:05d}"
        _write(p, _random_docs(rng, 100))
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials() -> None:
    text = "def f(x):\n    return 'héllo wörld, 世界 🚀'\n"
    ids = TOK.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert len(ids) > len(text)  # multi-byte characters
    assert TOK.decode(ids) == text
    assert TOK.decode(np.asarray(ids)) == text
    assert TOK.decode(torch.tensor(ids).tolist()) == text
    assert TOK.encode("") == [] and TOK.decode([]) == ""
    assert (TOK.vocab_size, TOK.eos_id, TOK.bos_id, TOK.pad_id) == (259, 256, 257, 258)
    assert TOK.special_tokens == {"<|eos|>": 256, "<|bos|>": 257, "<|pad|>": 258}
    # specials are dropped, broken UTF-8 becomes U+FFFD rather than raising
    assert TOK.decode([TOK.bos_id, *TOK.encode("ab"), TOK.eos_id, TOK.pad_id]) == "ab"
    assert TOK.decode([0xE4, 0xB8]) == "\ufffd"
    with pytest.raises(ValueError, match="259"):
        TOK.decode([259])


def test_tokenizer_fingerprint_is_stable() -> None:
    fp = TOK.fingerprint
    assert isinstance(fp, str) and len(fp) == 16 and fp == ByteTokenizer().fingerprint
    assert fp == "ebbbb8846bfd51e3"  # sha256("byte-v1")[:16]: changing it orphans every existing shard
    assert isinstance(tokenizer_from_fingerprint(fp), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_fingerprint("0" * 16)


# ---------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path) -> None:
    docs = [np.array([1, 2, 3]), [], np.array([255, 0]), list(range(100))]
    manifest = _write(tmp_path / "s", docs)
    shard = open_shard(tmp_path / "s", expected_fingerprint="test-fp", verify_checksum=True)
    expected = np.concatenate([np.append(np.asarray(d, dtype=np.int64), 256) for d in docs])
    assert shard.num_tokens == manifest["num_tokens"] == len(expected) == 109
    assert shard.num_docs == 4 and isinstance(shard.num_tokens, int)
    assert shard.dtype == np.uint16 and manifest["dtype"] == "uint16"
    np.testing.assert_array_equal(shard.tokens, expected)
    assert shard.doc_starts.dtype == np.uint64
    assert shard.doc_starts.tolist() == [0, 4, 5, 8]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shard.document(i), np.asarray(d))
        assert int(shard.document(i, with_eos=True)[-1]) == 256
    assert set(os.listdir(tmp_path)) == {"s"}  # no temp dir left behind
    assert set(os.listdir(tmp_path / "s")) == {"tokens.bin", "docs.idx", "manifest.json"}
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["tokenizer_fingerprint"] == "test-fp" and m["vocab_size"] == 259 and m["version"] == 1
    assert len(m["tokens_sha256"]) == 64
    with pytest.raises(FileExistsError):
        _write(tmp_path / "s", docs)


def test_shard_dtype_selection(tmp_path: Path) -> None:
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(163840) == np.uint32
    big = [np.array([0, 65535, 65536, 163839])]
    _write(tmp_path / "big", big, vocab_size=163840, eos_id=163839)
    shard = open_shard(tmp_path / "big", verify_checksum=True)
    assert shard.dtype == np.uint32
    assert shard.tokens.tolist() == [0, 65535, 65536, 163839, 163839]
    assert (tmp_path / "big" / "tokens.bin").stat().st_size == 5 * 4
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _write(tmp_path / "bad", [np.array([259])])
    assert not (tmp_path / "bad").exists()


def test_shard_write_is_atomic(tmp_path: Path) -> None:
    def docs():
        yield np.arange(10)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        _write(tmp_path / "s", docs())
    assert os.listdir(tmp_path) == []  # neither a shard nor a temp dir


@pytest.mark.parametrize("damage", ["truncated", "longer", "bad_json", "missing_manifest", "missing_field",
                                    "checksum", "fingerprint", "docs_truncated"])
def test_bad_shards_raise_shard_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s"
    _write(path, [np.arange(50), np.arange(30)])
    open_shard(path, expected_fingerprint="test-fp", verify_checksum=True)  # fine before the damage
    tokens, manifest, docs = path / "tokens.bin", path / "manifest.json", path / "docs.idx"
    kwargs: dict = {}
    if damage == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-2])
        culprit = tokens
    elif damage == "longer":
        tokens.write_bytes(tokens.read_bytes() + b"\0\0")
        culprit = tokens
    elif damage == "bad_json":
        manifest.write_text(manifest.read_text()[:-20])
        culprit = manifest
    elif damage == "missing_manifest":
        manifest.unlink()
        culprit = manifest
    elif damage == "missing_field":
        m = json.loads(manifest.read_text())
        del m["num_tokens"]
        manifest.write_text(json.dumps(m))
        culprit = manifest
    elif damage == "checksum":
        raw = bytearray(tokens.read_bytes())
        raw[10] ^= 1  # same size: only the checksum can tell
        tokens.write_bytes(bytes(raw))
        open_shard(path)  # the cheap checks pass
        kwargs = {"verify_checksum": True}
        culprit = tokens
    elif damage == "fingerprint":
        kwargs = {"expected_fingerprint": TOK.fingerprint}
        culprit = manifest
    else:
        docs.write_bytes(docs.read_bytes()[:-1])
        culprit = docs
    with pytest.raises(ShardError) as err:
        open_shard(path, **kwargs)
    assert str(culprit) in str(err.value)
    assert err.value.path == str(culprit)


def test_missing_shard_directory(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=str(tmp_path / "nope")):
        open_shard(tmp_path / "nope")


# ---------------------------------------------------------------- permutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4096, 4097])
def test_permutation_is_a_bijection(n: int) -> None:
    perm = FeistelPermutation(n, seed=1234)
    mapped = perm.map(np.arange(n))
    assert sorted(mapped.tolist()) == list(range(n))
    assert [perm(i) for i in range(n)] == mapped.tolist()  # scalar and vectorised paths agree
    with pytest.raises(IndexError):
        perm(n)


def test_permutation_depends_on_seed_and_shuffles() -> None:
    n = 1000
    a = FeistelPermutation(n, 0).map(np.arange(n))
    b = FeistelPermutation(n, 1).map(np.arange(n))
    assert np.array_equal(a, FeistelPermutation(n, 0).map(np.arange(n)))
    assert (a != b).mean() > 0.9
    assert (a != np.arange(n)).mean() > 0.9
    # far from sorted: consecutive samples come from unrelated parts of the corpus
    assert np.abs(np.diff(a.astype(np.int64))).mean() > n / 10
    # a corpus-scale permutation is evaluated without building anything of its size
    huge = FeistelPermutation(3_700_000_000, 7)
    idx = np.array([0, 1, 2, 3_699_999_999])
    out = huge.map(idx)
    assert len(set(out.tolist())) == 4 and int(out.max()) < 3_700_000_000
    assert out.tolist() == [huge(int(i)) for i in idx]


# ---------------------------------------------------------------- datasets and loaders


def _stream(paths: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(open_shard(p).tokens, dtype=np.int64) for p in paths])


def test_window_dataset_layout(small_shards: list[str]) -> None:
    seq = 16
    stream = _stream(small_shards)
    ds = WindowDataset(small_shards, seq_len=seq, seed=0, shuffle=False)
    assert ds.num_tokens == len(stream) and len(ds) == (len(stream) - 1) // seq
    for i in [0, 1, len(ds) // 2, len(ds) - 1]:
        w = ds[i]
        assert w.dtype == np.int64 and w.shape == (seq + 1,)
        np.testing.assert_array_equal(w, stream[i * seq : i * seq + seq + 1])
    # windows cross shard boundaries: the one straddling the end of shard 0 is the stream's
    n0 = open_shard(small_shards[0]).num_tokens
    i = n0 // seq
    np.testing.assert_array_equal(ds[i], stream[i * seq : i * seq + seq + 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    shuffled = WindowDataset(small_shards, seq_len=seq, seed=0, shuffle=True)
    order = [shuffled.window_index(i) for i in range(len(shuffled))]
    assert sorted(order) == list(range(len(ds))) and order != sorted(order)
    np.testing.assert_array_equal(shuffled[3], ds[order[3]])
    clone = pickle.loads(pickle.dumps(shuffled))
    assert len(pickle.dumps(shuffled)) < 10_000  # the memory maps are reopened, not copied
    np.testing.assert_array_equal(clone[5], shuffled[5])


def test_window_dataset_rejects_mixed_tokenizers(tmp_path: Path, small_shards: list[str]) -> None:
    write_shard(tmp_path / "other", [np.arange(100)], "other-fp", 259, 256)
    with pytest.raises(ShardError, match="other"):
        WindowDataset([small_shards[0], str(tmp_path / "other")], 16, 0)
    with pytest.raises(ShardError, match="fingerprint|tokenizer"):
        WindowDataset(small_shards, 16, 0, expected_fingerprint=TOK.fingerprint)
    with pytest.raises(ValueError, match="too few"):
        WindowDataset(small_shards, 10**9, 0)


def _take(loader: TokenBatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=True) if len(a) == len(b) else []
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in pairs)


def test_loader_batches_determinism_and_targets(small_shards: list[str]) -> None:
    ds = WindowDataset(small_shards, seq_len=16, seed=3)
    batches = _take(TokenBatchLoader(ds, 8), 5)
    for x, y in batches:
        assert x.dtype == torch.long and x.shape == y.shape == (8, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert _same(batches, _take(TokenBatchLoader(WindowDataset(small_shards, 16, 3), 8), 5))
    assert _same(batches, _take(TokenBatchLoader(ds, 8, prefetch=0), 5))  # prefetch changes nothing
    other = _take(TokenBatchLoader(WindowDataset(small_shards, 16, 4), 8), 5)
    assert not _same(batches, other)
    # rows are exactly the dataset's samples, in order
    x0, y0 = batches[1]
    for r in range(8):
        window = torch.from_numpy(ds[8 + r])
        assert torch.equal(x0[r], window[:-1]) and torch.equal(y0[r], window[1:])


def test_loader_resume_is_exact(small_shards: list[str]) -> None:
    ds = WindowDataset(small_shards, seq_len=16, seed=5)
    reference = _take(TokenBatchLoader(ds, 6), 10)
    first = TokenBatchLoader(ds, 6)
    assert _same(_take(first, 4), reference[:4])
    state = first.state_dict()
    assert state == {"samples_consumed": 24} and type(state["samples_consumed"]) is int
    resumed = TokenBatchLoader(WindowDataset(small_shards, seq_len=16, seed=5), 6)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 6), reference[4:])
    assert _same(_take(TokenBatchLoader(ds, 6, start_sample=24), 6), reference[4:])
    # rewinding a prefetching loader drops what it had read ahead
    rewound = TokenBatchLoader(ds, 6, prefetch=3)
    _take(rewound, 3)
    rewound.load_state_dict({"samples_consumed": 0})
    assert _same(_take(rewound, 2), reference[:2])
    rewound.close()


def test_loader_order_does_not_depend_on_world_size(small_shards: list[str]) -> None:
    ds = WindowDataset(small_shards, seq_len=16, seed=9)
    reference = _take(TokenBatchLoader(ds, 8), 6)
    for world in (2, 4):
        ranks = [TokenBatchLoader(ds, 8, dp_rank=r, dp_world=world) for r in range(world)]
        per_rank = [_take(loader, 6) for loader in ranks]
        for step in range(6):
            x = torch.cat([per_rank[r][step][0] for r in range(world)])
            y = torch.cat([per_rank[r][step][1] for r in range(world)])
            assert per_rank[0][step][0].shape == (8 // world, 16)
            assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])
    # resume a world-size-1 run on 2 ranks
    single = TokenBatchLoader(ds, 8)
    _take(single, 2)
    halves = []
    for r in range(2):
        loader = TokenBatchLoader(ds, 8, dp_rank=r, dp_world=2)
        loader.load_state_dict(single.state_dict())
        halves.append(next(loader)[0])
    assert torch.equal(torch.cat(halves), reference[2][0])
    with pytest.raises(ValueError, match="divisible"):
        TokenBatchLoader(ds, 6, dp_world=4)


def test_loader_wraps_epochs(small_shards: list[str]) -> None:
    ds = WindowDataset(small_shards[:1], seq_len=64, seed=2)
    n = len(ds)
    epoch0 = ds.samples(0, n)
    epoch1 = ds.samples(n, n)
    as_set = lambda a: sorted(map(tuple, a.tolist()))
    assert as_set(epoch0) == as_set(epoch1) == as_set(np.stack([ds.window(w) for w in range(n)]))
    assert not np.array_equal(epoch0, epoch1)  # each epoch is shuffled afresh
    # a batch straddling the epoch boundary is the tail of epoch 0 followed by the head of epoch 1
    straddle = ds.samples(n - 2, 4)
    np.testing.assert_array_equal(straddle, np.concatenate([epoch0[-2:], epoch1[:2]]))
    loader = TokenBatchLoader(ds, 4, start_sample=n - 2)
    assert torch.equal(next(loader)[0], torch.from_numpy(straddle[:, :-1]))


def test_eval_batches(small_shards: list[str]) -> None:
    val = WindowDataset(small_shards, seq_len=16, seed=0, shuffle=False)
    a = list(eval_batches(val, 8, 3))
    assert len(a) == 3 and _same(a, list(eval_batches(val, 8, 3)))
    assert torch.equal(a[1][0][0], torch.from_numpy(val[8][:-1]))
    for world in (2, 4):
        per_rank = [list(eval_batches(val, 8, 3, dp_rank=r, dp_world=world)) for r in range(world)]
        for b in range(3):
            assert torch.equal(torch.cat([per_rank[r][b][0] for r in range(world)]), a[b][0])
    assert len(list(eval_batches(val, 8, 10**6))) == len(val) // 8  # never wraps around
    assert len(list(eval_batches(val, 8, None))) == len(val) // 8


def test_build_loaders_from_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 1)):
        for k in range(n):
            write_shard(tmp_path / split / f"{k:05d}", _random_docs(rng, 50), TOK.fingerprint, 259, 256)
    (tmp_path / "train" / ".00009.tmp-abc").mkdir()  # an unfinished shard is ignored
    train, val, tok = build_loaders({"source": str(tmp_path), "cache_dir": None}, 32, 4, seed=0,
                                    dp_rank=1, dp_world=2)
    assert isinstance(tok, ByteTokenizer)
    assert len(train.dataset.shard_paths) == 3 and not val.shuffle
    x, y = next(train)
    assert x.shape == (2, 32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ShardError, match="no shards"):
        build_loaders({"source": str(tmp_path / "empty")}, 32, 4, seed=0)
    with pytest.raises(ShardError, match="does not exist"):
        build_loaders({"source": str(tmp_path / "train")}, 32, 4, seed=0)


# ---------------------------------------------------------------- built-in corpus


@pytest.fixture(scope="module")
def builtin_concurrent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """Build the built-in corpus with two processes racing on the same empty cache dir.

    The test holds the build lock for a moment first: neither process may start building while it is
    held, and once released both contend for it at the same time.
    """
    import fcntl

    import data.builtin as builtin

    cache = tmp_path_factory.mktemp("cache")
    name = f"builtin-{builtin.corpus_fingerprint(TOK, builtin.stdlib_files())}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(cache / f"{name}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        cmd = [sys.executable, "-m", "data.builtin", str(cache)]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        time.sleep(1.0)  # long enough to start up and (without the lock) to build
        assert [p.poll() for p in procs] == [None, None]
        assert [p.name for p in cache.iterdir()] == [f"{name}.lock"]  # nobody built behind the lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(out.split())
    return cache, outputs


def test_builtin_concurrent_build_is_safe(builtin_concurrent: tuple[Path, list[list[str]]]) -> None:
    cache, outputs = builtin_concurrent
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    built = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert len(built) == 1 and built[0].startswith("builtin-")  # one corpus, no leftover temp dirs
    for path in outputs[0]:
        open_shard(path, expected_fingerprint=TOK.fingerprint, verify_checksum=True)
    mtime = os.stat(Path(outputs[0][0]) / "manifest.json").st_mtime_ns
    assert list(builtin_corpus(cache, progress=False)) == outputs[0]  # reused, not rebuilt
    assert os.stat(Path(outputs[0][0]) / "manifest.json").st_mtime_ns == mtime


def test_builtin_corpus_contents(builtin_concurrent: tuple[Path, list[list[str]]]) -> None:
    cache, _ = builtin_concurrent
    train_path, val_path = builtin_corpus(cache, progress=False)
    train, val = open_shard(train_path), open_shard(val_path)
    assert train.num_tokens > 1_000_000 and val.num_tokens > 10_000
    assert train.num_tokens > 10 * val.num_tokens
    assert train.dtype == np.uint16 and train.vocab_size == TOK.vocab_size
    files = train.manifest["metadata"]["files"]
    assert files == sorted(files) and not any(is_validation(f) for f in files)
    assert all(is_validation(f) for f in val.manifest["metadata"]["files"])
    assert train.num_docs == len(files)
    ds = WindowDataset([train_path], seq_len=512, seed=0)
    text = "".join(TOK.decode(ds[i]) for i in range(20))
    assert sum(text.count(k) for k in ("def ", "import ", "return", "self")) > 20
    loader, val_ds, tok = build_loaders({"source": "builtin", "cache_dir": str(cache)}, 128, 4, seed=0)
    assert isinstance(tok, ByteTokenizer) and val_ds.shard_paths == [val_path]
    assert next(loader)[0].shape == (4, 128)


def test_builtin_recovers_from_a_crashed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data.builtin as builtin

    monkeypatch.setenv("CHOGORI_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path and default_cache_dir("/x") == Path("/x")
    # a small stand-in standard library keeps this fast
    lib = tmp_path / "lib"
    for i in range(60):
        (lib / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (lib / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}  # é\n" * 50)
    (lib / "site-packages").mkdir()
    (lib / "site-packages" / "thirdparty.py").write_text("x = 1\n")
    files = builtin.stdlib_files(lib)
    assert len(files) == 60 and [f[0] for f in files] == sorted(f[0] for f in files)
    monkeypatch.setattr(builtin, "stdlib_files", lambda: files)
    name = f"builtin-{builtin.corpus_fingerprint(TOK, files)}"
    (tmp_path / name / "train").mkdir(parents=True)  # what a crash could leave: half a corpus
    (tmp_path / f".{name}.tmp-dead").mkdir()
    train, val = builtin_corpus(progress=False)
    assert Path(train).parent.name == name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["lib", name, f"{name}.lock"])
    shard = open_shard(train, verify_checksum=True)
    assert TOK.decode(shard.document(0)).startswith("def f")


def test_cached_order_blocks_give_the_permutation_exactly(small_shards: list[str], monkeypatch) -> None:
    """Window ids come from cached blocks of the order; in any access pattern they are the permutation's."""
    monkeypatch.setattr(WindowDataset, "ORDER_BLOCK", 7)  # many block edges in a small dataset
    ds = WindowDataset(small_shards, seq_len=16, seed=11)
    n = len(ds)
    rng = np.random.default_rng(3)
    for indices in (np.arange(3 * n), rng.integers(0, 5 * n, size=500), np.array([n - 1, n, 7, 6, 2 * n + 13])):
        expected = [ds.permutation(int(g) // n)(int(g) % n) for g in indices]
        assert ds.windows_of(indices).tolist() == expected
    assert len(ds._order_cache) <= 8


def test_vectorised_gather_equals_window_by_window(small_shards: list[str]) -> None:
    """`gather` copies rows of a sliding-window view per shard; windows crossing shards take the slow path."""
    for seq in (5, 64, 1000):
        ds = WindowDataset(small_shards, seq_len=seq, seed=2)
        idx = np.arange(3 * len(ds))  # every window of three epochs, many crossing a shard boundary
        rows = ds.gather(idx)
        expected = np.stack([ds.window(int(w)) for w in ds.windows_of(idx)])
        np.testing.assert_array_equal(rows, expected)
