"""Training straight from a `datasets` stream: tokenized on the fly, packed, sharded, resumable.

For users who skip `python -m data.prepare`. Data-parallel rank ``r`` of ``W``, with ``K`` workers, reads
sub-stream ``r * K + k`` of ``W * K`` (`datasets.distributed.split_dataset_by_node`: whole shards when
their number divides, else every ``W * K``-th document). Each worker tokenizes its documents, appends EOS
after each (as prepared shards do) and cuts the token stream into windows of ``seq_len + 1`` tokens that
share one boundary token (`data/dataset.py`'s windows); batch ``i`` of the rank is ``G / W`` consecutive
windows of worker ``i mod K``. An exhausted sub-stream starts its next epoch on its own.

**Shuffling** (`shuffle_buffer` B > 0) is a block shuffle: each worker reads its documents B at a time in stream
order and tokenizes each block in a permutation seeded by (seed, epoch, sub-stream, block number). Unlike a
sliding shuffle buffer (`IterableDataset.shuffle`, whose buffer a resume cannot restore), a block is re-read from
its first document, so a resume is exact with shuffling too.

**State.** Per worker: the epoch, the `IterableDataset.state_dict()` at the start of the current block, the block's
number and how many of its documents are tokenized, and the tokens read but not yet batched; plus which worker
is next. Each batch carries the state after it, so the state of the last batch *yielded* is exact even with
batches read ahead, and a resume at the same world size and worker count continues with exactly the batches an
uninterrupted run would have seen.

What this gives up against prepared shards is listed in docs/data.md ("Streaming without prepare").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch

from data.shards import DataError
from data.stream_source import text_of
from data.tokenizer import Tokenizer

_DOCS_PER_CALL = 32  # documents per tokenizer call; also bounds the tokens a state carries beyond a batch


def _is_held_out(text: str, fraction: float) -> bool:
    from data.prepare import is_validation  # the same hash split as prepared datasets

    return is_validation(text, fraction)


def _windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """`count` windows of ``seq_len + 1`` tokens starting every `seq_len` tokens, as int64 [count, seq_len+1]."""
    view = np.lib.stride_tricks.sliding_window_view(tokens[:count * seq_len + 1], seq_len + 1)
    return np.ascontiguousarray(view[::seq_len], dtype=np.int64)


def _tokens(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each non-empty document's ids followed by EOS (empty documents are dropped, as `prepare` drops them)."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    out = []
    for ids in tokenizer.encode_batch_arrays(texts):
        if ids.size:
            out += [ids.astype(np.int64, copy=False), eos]
    return out


def _read(rows: Iterator[Any], count: int, where: str) -> list[Any]:
    """Up to `count` rows; what `datasets` raises while reading (bad files, schema clashes) names the stream."""
    try:
        return list(islice(rows, count))
    except DataError:
        raise
    except Exception as e:  # datasets and its builders raise many types
        raise DataError(f"{where}: reading the stream failed ({type(e).__name__}: {' '.join(str(e).split())})") \
            from e


class _SubStream:
    """One worker's documents -> batches of windows, each paired with the state that resumes right after it.

    Documents are read in blocks of `shuffle_buffer` (`_DOCS_PER_CALL` without shuffling) and tokenized
    `_DOCS_PER_CALL` at a time, in a seeded permutation of the block when shuffling (`node`: this sub-stream's
    index, so sub-streams shuffle differently)."""

    def __init__(self, make: Callable[[int], Any], tokenizer: Tokenizer, text_field: str, seq_len: int,
                 rows: int, held_out: float, where: str, shuffle_buffer: int = 0, seed: int = 0,
                 node: int = 0) -> None:
        self.make, self.tokenizer, self.text_field = make, tokenizer, text_field
        self.seq_len, self.rows, self.held_out, self.where = seq_len, rows, held_out, where
        self.shuffle_buffer, self.seed, self.node = shuffle_buffer, seed, node

    def _order(self, epoch: int, block: int, n: int) -> np.ndarray:
        if self.shuffle_buffer <= 0:
            return np.arange(n)
        seed = self.seed % 2**64  # numpy's seeds are non-negative; train.seed may be any integer
        return np.random.default_rng([seed, epoch, self.node, block]).permutation(n)

    def batches(self, state: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        epoch, ds_state = int(state["epoch"]), state.get("dataset")
        block, done = int(state.get("block", 0)), int(state.get("done", 0))
        buf = np.asarray(state.get("buffer", []), dtype=np.int64)
        need = self.rows * self.seq_len + 1
        size = self.shuffle_buffer if self.shuffle_buffer > 0 else _DOCS_PER_CALL
        while True:
            ds = self.make(epoch)
            if ds_state is not None:
                ds.load_state_dict(ds_state)
            fresh, added, it = ds_state is None and block == 0, 0, iter(ds)
            while rows := _read(it, size, f"{self.where} epoch {epoch}"):
                after = ds.state_dict()  # the next block starts here
                first = block * size
                order = self._order(epoch, block, len(rows))
                for start in range(done, len(rows), _DOCS_PER_CALL):
                    picked = order[start:start + _DOCS_PER_CALL]
                    texts = [text_of(rows[i], self.text_field, f"{self.where} epoch {epoch} document {first + i}")
                             for i in picked]
                    if self.held_out > 0:  # validation documents never train
                        texts = [t for t in texts if not _is_held_out(t, self.held_out)]
                    parts = _tokens(self.tokenizer, texts)
                    added += sum(p.size for p in parts)
                    buf = np.concatenate([buf, *parts])
                    done = start + len(picked)
                    # Where to resume: inside this block (re-read from its start), or at the next one.
                    at = ({"dataset": ds_state, "block": block, "done": done} if done < len(rows)
                          else {"dataset": after, "block": block + 1, "done": 0})
                    while buf.size >= need:
                        batch = _windows(buf, self.seq_len, self.rows)
                        buf = buf[self.rows * self.seq_len:]  # the last window's last token starts the next one
                        yield batch, {"epoch": epoch, **at, "buffer": buf}
                ds_state, block, done = after, block + 1, 0
            if fresh and added == 0:
                raise DataError(f"{self.where}: an epoch yielded no tokens (no non-empty documents in this share "
                                "of the stream; fewer documents or shards than ranks x workers?)")
            epoch, ds_state, block, done = epoch + 1, None, 0, 0


class _ReadAhead:
    """A generator run in a daemon thread, up to `depth` items ahead; its exception re-raised on `get`."""

    def __init__(self, items: Iterator[Any], depth: int, name: str) -> None:
        self._items, self._q = items, queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((False, e))

    def get(self) -> Any:
        ok, value = self._q.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class StreamingTokenLoader:
    """Infinite iterator of this rank's ``(inputs, targets)`` LongTensors, each ``[G // dp_world, seq_len]``,
    from a streamed `datasets.IterableDataset`; the same interface and state protocol as `TokenBatchLoader`.

    `dataset` is the whole (unsplit) training split; this loader takes its rank's share. `workers` threads
    each tokenize their own sub-stream (the `tokenizers` library releases the GIL while encoding);
    `prefetch` batches per worker are read ahead (0: read inline). `shuffle_buffer` > 0 shuffles documents
    within consecutive blocks of that many (the module's docstring; a new permutation every epoch). `held_out` > 0
    drops the documents that `data.prepare`'s hash split puts in validation at that fraction.
    """

    def __init__(
        self, dataset: Any, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, dp_rank: int = 0,
        dp_world: int = 1, text_field: str = "text", workers: int = 1, prefetch: int = 2, shuffle_buffer: int = 0,
        seed: int = 0, held_out: float = 0.0, name: str = "data.stream",
    ) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"need 0 <= dp_rank < dp_world, got dp_rank={dp_rank}, dp_world={dp_world}")
        if global_batch_size < 1 or global_batch_size % dp_world:
            raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of dp_world "
                             f"{dp_world}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.dataset, self.tokenizer, self.text_field = dataset, tokenizer, text_field
        self._seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_world = int(dp_rank), int(dp_world)
        self.local_batch_size = self.global_batch_size // self.dp_world
        self.workers, self.prefetch = int(workers), max(0, int(prefetch))
        self.shuffle_buffer, self.seed, self.held_out, self.name = int(shuffle_buffer), int(seed), held_out, name
        self.samples_consumed = 0  # global samples (G per step), as TokenBatchLoader counts them
        self._next = 0
        self._states: list[dict[str, Any]] = [{"epoch": 0, "dataset": None, "block": 0, "done": 0,
                                               "buffer": np.zeros(0, np.int64)} for _ in range(self.workers)]
        self._running: list[Any] | None = None

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def _node(self, worker: int) -> int:
        return self.dp_rank * self.workers + worker

    def _substream(self, worker: int) -> Callable[[int], Any]:
        from datasets.distributed import split_dataset_by_node

        def make(epoch: int) -> Any:  # a fresh object per epoch: a loaded state would otherwise stick to it
            ds = split_dataset_by_node(self.dataset, rank=self._node(worker), world_size=self.dp_world * self.workers)
            ds.set_epoch(epoch)
            return ds

        return make

    def _start(self) -> list[Any]:
        running = []
        for k in range(self.workers):
            where = f"{self.name} (rank {self.dp_rank} of {self.dp_world}, worker {k} of {self.workers})"
            sub = _SubStream(self._substream(k), self.tokenizer, self.text_field, self._seq_len,
                             self.local_batch_size, self.held_out, where, self.shuffle_buffer, self.seed, self._node(k))
            items = sub.batches(self._states[k])
            running.append(_ReadAhead(items, self.prefetch, f"chogori-stream-{k}") if self.prefetch else items)
        return running

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._running is None:
            self._running = self._start()
        k = self._next
        source = self._running[k]
        rows, state = source.get() if isinstance(source, _ReadAhead) else next(source)
        self._states[k] = state
        self._next = (k + 1) % self.workers
        self.samples_consumed += self.global_batch_size
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: where each worker's stream stands after the last batch yielded."""
        states = [{"epoch": s["epoch"], "dataset": s["dataset"], "block": s["block"], "done": s["done"],
                   "buffer": np.asarray(s["buffer"]).tolist()} for s in self._states]
        return {"samples_consumed": self.samples_consumed,
                "stream": {"world": self.dp_world, "rank": self.dp_rank, "workers": self.workers,
                           "next": self._next, "shuffle_buffer": self.shuffle_buffer, "states": states}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stream = state.get("stream")
        if stream is None:
            raise DataError(f"{self.name}: the checkpoint's data position is one of prepared shards "
                            "(samples consumed), not of a stream; resume with the data config it was trained with")
        here = (self.dp_world, self.workers)
        there = (int(stream["world"]), int(stream["workers"]))
        if here != there or int(stream["rank"]) != self.dp_rank:
            raise DataError(f"{self.name}: the checkpoint's stream position is for {there[0]} data-parallel rank(s) x "
                            f"{there[1]} worker(s) (rank {stream['rank']}), this run has {here[0]} x {here[1]} (rank "
                            f"{self.dp_rank}); a stream's position does not carry over to another split. Resume with "
                            "the same layout and data.stream.workers, or train from prepared shards")
        # A position inside a block means "the first `done` documents of the block's permutation"; another block
        # size or an older checkpoint (which shuffled with `IterableDataset.shuffle`, a state without blocks)
        # would read other documents there.
        there_buffer = stream.get("shuffle_buffer", None if self.shuffle_buffer else 0)
        if there_buffer != self.shuffle_buffer:
            raise DataError(f"{self.name}: the checkpoint's stream position was written with data.stream."
                            f"shuffle_buffer={'an older shuffle' if there_buffer is None else there_buffer}, this run "
                            f"has {self.shuffle_buffer}; resume with the shuffle_buffer it was trained with")
        self.close()
        self.samples_consumed = int(state["samples_consumed"])
        self._next = int(stream["next"])
        self._states = [{"epoch": int(s["epoch"]), "dataset": s["dataset"], "block": int(s.get("block", 0)),
                         "done": int(s.get("done", 0)), "buffer": np.asarray(s["buffer"], dtype=np.int64)}
                        for s in stream["states"]]

    def close(self) -> None:
        """Stop the worker threads (a later `next` restarts them from the current state)."""
        for source in self._running or []:
            if isinstance(source, _ReadAhead):
                source.close()
        self._running = None

    def __del__(self) -> None:
        for source in getattr(self, "_running", None) or []:
            if isinstance(source, _ReadAhead):
                source._stop.set()


class InMemoryWindows:
    """A small validation set held in memory: windows as `eval_batches` reads them (``samples``, ``len``)."""

    def __init__(self, rows: np.ndarray, seq_len: int) -> None:
        self.rows, self.seq_len = rows, seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def samples(self, start: int, count: int) -> np.ndarray:
        return self.rows[start:start + count]


class NoValidation:
    """Stands in for a validation set the stream does not have: any use raises the reason, naming the keys."""

    def __init__(self, reason: str, seq_len: int) -> None:
        self.reason, self.seq_len = reason, seq_len

    def __len__(self) -> int:
        raise DataError(self.reason)

    def samples(self, start: int, count: int) -> np.ndarray:
        raise DataError(self.reason)


def validation_windows(dataset: Any, tokenizer: Tokenizer, seq_len: int, text_field: str, docs: int,
                       held_out: float = 0.0, where: str = "data.stream") -> InMemoryWindows:
    """The first `docs` documents of `dataset` (with `held_out` > 0: the first `docs` that the hash split holds
    out), packed into windows like the training stream: the same on every rank, whatever the world size."""
    texts: list[str] = []
    rows, seen = iter(dataset), 0
    while len(texts) < docs and (chunk := _read(rows, _DOCS_PER_CALL, f"{where} (validation)")):
        for row in chunk:
            text = text_of(row, text_field, f"{where} validation document {seen}")
            seen += 1
            if len(texts) < docs and (held_out <= 0 or _is_held_out(text, held_out)):
                texts.append(text)
    parts = [np.zeros(0, np.int64)]
    for start in range(0, len(texts), _DOCS_PER_CALL):
        parts += _tokens(tokenizer, texts[start:start + _DOCS_PER_CALL])
    tokens = np.concatenate(parts)
    count = max(0, (tokens.size - 1) // seq_len)
    return InMemoryWindows(_windows(tokens, seq_len, count) if count else np.zeros((0, seq_len + 1), np.int64),
                           seq_len)


def build_stream_loaders(
    stream: Any, seq_len: int, global_batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
    vocab_size: int | None = None, prefetch: int = 2,
) -> tuple[StreamingTokenLoader, InMemoryWindows | NoValidation, Tokenizer]:
    """(train loader, validation set, tokenizer) for a `data.stream` config section (docs/configuration.md)."""
    from data.stream_source import cfg_get, open_splits
    from data.tokenizer import load_tokenizer

    def get(key: str, default: Any = None) -> Any:
        return cfg_get(stream, key, default)

    path, split, text_field = str(get("path")), str(get("split", "train")), str(get("text_field", "text"))
    tokenizer = load_tokenizer(str(get("tokenizer", "byte")))
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"model.vocab_size: {vocab_size} is smaller than data.stream.tokenizer, which has "
                        f"{tokenizer.vocab_size} ids; raise it to at least {tokenizer.vocab_size}")
    splits = open_splits(path, get("name"), get("data_files"))
    if split not in splits:
        raise DataError(f"data.stream.split: {path!r} has split(s) {', '.join(sorted(splits))}, not {split!r}")
    val_split, val_docs = get("val_split", "validation"), int(get("val_docs", 500))
    val_fraction = float(get("val_fraction", 0.05))
    if val_split is not None and val_split == split:
        raise DataError(f"data.stream.val_split: {val_split!r} is the training split; name another, or null to hold "
                        "documents out of the training split (data.stream.val_fraction)")
    held_out = 0.0
    if val_split is not None and val_split in splits:
        val: InMemoryWindows | NoValidation = validation_windows(splits[val_split], tokenizer, seq_len, text_field,
                                                                 val_docs, where=f"data.stream split {val_split!r}")
    elif val_fraction > 0:  # no validation split: hold documents out of the training split by a hash of the text
        held_out = val_fraction
        val = validation_windows(splits[split], tokenizer, seq_len, text_field, val_docs, held_out,
                                 where=f"data.stream split {split!r}")
    else:
        val = NoValidation(f"data.stream: {path!r} has no split {val_split!r} and data.stream.val_fraction is 0, so "
                           "there is no validation data; set data.stream.val_split or val_fraction, or "
                           "train.eval_interval=0", seq_len)
    loader = StreamingTokenLoader(
        splits[split], tokenizer, seq_len, global_batch_size, dp_rank=dp_rank, dp_world=dp_world,
        text_field=text_field, workers=int(get("workers", 1)), prefetch=prefetch,
        shuffle_buffer=int(get("shuffle_buffer", 0)), seed=seed, held_out=held_out)
    return loader, val, tokenizer
