"""Streaming loader: this rank's batches of the global sample sequence, read ahead by a background thread.

What sample ``g`` is (windows over packed shards, shuffled on the fly, mixed by weight) is defined in
`data/dataset.py`. Here: step ``s`` with global batch ``G`` uses global samples ``[s*G, (s+1)*G)``, and
data-parallel rank ``r`` of ``W`` reads only its contiguous slice of ``G // W`` of them through memory maps.
The order therefore does not depend on the world size, and resuming needs only the number of samples
consumed. `build_loaders` turns a `data:` config section (the built-in corpus, a directory written by
`python -m data.prepare`, or a weighted mixture of them; or a `datasets` stream, data/streaming.py) into the
train loader and the validation set.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.dataset import MixtureDataset, WindowDataset, derive_seed, open_source
from data.shards import DataError, ShardError, open_shard
from data.stream_source import cfg_get
from data.tokenizer import Tokenizer, tokenizer_from_fingerprint

Dataset = WindowDataset | MixtureDataset


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def document_positions(inputs: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, document_ids), both [B, S], of packed windows, for document-masked attention.

    A document starts after each EOS (the EOS itself ends the previous document); the window's first
    token starts document 0 wherever it falls in its document. Positions restart at 0 in each document.
    Everything follows from the tokens, so any loader and any resumed run produce the same masks.
    """
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    document_ids = starts.long().cumsum(dim=1)
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of own document
    return index - first, document_ids


class TokenBatchLoader:
    """Infinite iterator of this rank's ``(inputs, targets)`` LongTensors, each ``[G // dp_world, seq_len]``.

    The state is one integer, the number of global samples consumed (G per batch yielded), so a run can
    resume on any world size that divides G. Up to `prefetch` batches are read ahead by one background
    thread; that never changes what is yielded (each batch is a pure function of its first sample index).
    """

    def __init__(
        self, dataset: Dataset, global_batch_size: int, dp_rank: int = 0, dp_world: int = 1,
        start_sample: int = 0, prefetch: int = 2,
    ) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"need 0 <= dp_rank < dp_world, got dp_rank={dp_rank}, dp_world={dp_world}")
        if global_batch_size % dp_world:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_world "
                             f"{dp_world}; pick a global batch that is a multiple of the data-parallel size")
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        self.dataset = dataset
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_world = int(dp_rank), int(dp_world)
        self.local_batch_size = self.global_batch_size // self.dp_world
        self.samples_consumed = int(start_sample)
        self.prefetch = max(0, int(prefetch))
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: deque[tuple[int, Future[tuple[torch.Tensor, torch.Tensor]]]] = deque()

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    def batch_at(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of the step whose first global sample is `sample` (no state change)."""
        first = sample + self.dp_rank * self.local_batch_size
        return _to_batch(self.dataset.samples(first, self.local_batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.samples_consumed
        if self.prefetch == 0:
            batch = self.batch_at(start)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chogori-prefetch")
            if self._ahead and self._ahead[0][0] != start:  # the position was changed: drop stale work
                self._drop_ahead()
            while len(self._ahead) < self.prefetch + 1:
                nxt = start + len(self._ahead) * self.global_batch_size
                self._ahead.append((nxt, self._pool.submit(self.batch_at, nxt)))
            batch = self._ahead.popleft()[1].result()
        self.samples_consumed = start + self.global_batch_size
        return batch

    def _drop_ahead(self) -> None:
        for _, fut in self._ahead:
            fut.cancel()
        self._ahead.clear()

    def state_dict(self) -> dict[str, int]:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "stream" in state:  # a streamed run's position names no sample of these shards
            raise DataError("data.source: the checkpoint's data position is one of a data.stream source, not of "
                            "prepared shards; resume with the data config it was trained with")
        consumed = int(state["samples_consumed"])
        if consumed < 0:
            raise ValueError(f"samples_consumed must be >= 0, got {consumed}")
        self._drop_ahead()
        self.samples_consumed = consumed

    def close(self) -> None:
        """Stop the prefetch thread (it is also stopped at interpreter exit)."""
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(
    val_dataset: Dataset, batch_size: int, num_batches: int | None = None, dp_rank: int = 0,
    dp_world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same evaluation batches on every call: global batches of `batch_size` from the dataset's start.

    Rank `dp_rank` gets its contiguous ``batch_size // dp_world`` slice of each. At most as many batches as
    the dataset holds whole (never wraps, so no sample is counted twice); every rank yields the same number
    of batches, so collectives in the evaluation loop line up. `num_batches=None` means all of them.
    """
    if batch_size < 1 or batch_size % dp_world or not 0 <= dp_rank < dp_world:
        raise ValueError(f"need batch_size ({batch_size}) >= 1 divisible by dp_world ({dp_world}) and "
                         f"0 <= dp_rank ({dp_rank}) < dp_world")
    available = len(val_dataset) // batch_size
    if available == 0:
        raise DataError(f"train.global_batch_size: {batch_size} sequences are more than the validation set holds "
                        f"({len(val_dataset)} windows of data.seq_len + 1 = {val_dataset.seq_len + 1} tokens), so "
                        "there is no eval batch; lower it or data.seq_len, or set train.eval_interval=0")
    count = available if num_batches is None else min(int(num_batches), available)
    local = batch_size // dp_world
    for b in range(count):
        rows = val_dataset.samples(b * batch_size + dp_rank * local, local)
        yield _to_batch(rows)


def _sources(data_cfg: Any) -> list[tuple[str, float, str, str]]:
    """(path, weight, name, config key) of every configured source: `data.sources` if given, else `data.source`."""
    listed = cfg_get(data_cfg, "sources", None) or []
    if not listed:
        path = str(cfg_get(data_cfg, "source", "builtin"))
        return [(path, 1.0, path, "data.source")]
    out = []
    for i, src in enumerate(listed):
        path = cfg_get(src, "path", None)
        if not path:
            raise DataError(f"data.sources[{i}].path: is missing")
        weight = cfg_get(src, "weight", 1.0)
        name = str(cfg_get(src, "name", None) or f"data.sources[{i}] ({path})")
        out.append((str(path), weight, name, f"data.sources[{i}].path"))
    return out


def build_loaders(
    data_cfg: Any, seq_len: int, global_batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
    vocab_size: int | None = None,
) -> tuple[TokenBatchLoader, Dataset, Tokenizer]:
    """(train loader, validation dataset, tokenizer) for a `data:` config section.

    Keys: `source` — "builtin" (the Python standard library corpus) or a prepared directory; `sources` — a
    list of {path, weight, name} mixed by weight (replaces `source`); `cache_dir` — where the built-in corpus
    lives (null: default); `prefetch` — batches read ahead (default 2). Every source must use one tokenizer.
    `vocab_size` (the model's; None: no check) must cover the tokenizer, and every batch read is checked to
    hold only ids below it (`TokenIdError` names the shard file and offset). Every rank may call this at once.
    `stream` — a `datasets` source streamed and tokenized on the fly instead (data/streaming.py).
    """
    stream = cfg_get(data_cfg, "stream", None)
    if cfg_get(stream, "path", None):
        from data.streaming import build_stream_loaders

        return build_stream_loaders(stream, seq_len, global_batch_size, seed, dp_rank=dp_rank,  # type: ignore[return-value]
                                    dp_world=dp_world, vocab_size=vocab_size,
                                    prefetch=int(cfg_get(data_cfg, "prefetch", 2)))
    cache_dir = cfg_get(data_cfg, "cache_dir", None)
    prefetch = int(cfg_get(data_cfg, "prefetch", 2))
    sources = _sources(data_cfg)
    opened = []
    for path, _, _, key in sources:
        try:
            opened.append(open_source(path, cache_dir, progress=dp_rank == 0))
        except DataError as e:
            raise DataError(f"{key}: {e}") from e
    fingerprint = open_shard(opened[0][0][0]).tokenizer_fingerprint
    search = [Path(path) for path, _, _, _ in sources if path != "builtin"]
    tokenizer = tokenizer_from_fingerprint(fingerprint, search=search)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"model.vocab_size: {vocab_size} is smaller than the data's tokenizer, which has "
                        f"{tokenizer.vocab_size} ids; raise it to at least {tokenizer.vocab_size}")
    trains, vals = [], []
    for i, ((train_paths, val_paths), (_, _, name, key)) in enumerate(zip(opened, sources, strict=True)):
        try:
            source_seed = seed if len(sources) == 1 else derive_seed(seed, 0x5EED, i)
            trains.append(WindowDataset(train_paths, seq_len, source_seed, shuffle=True,
                                        expected_fingerprint=fingerprint, vocab_size=vocab_size))
            vals.append(WindowDataset(val_paths, seq_len, seed, shuffle=False, expected_fingerprint=fingerprint,
                                      vocab_size=vocab_size))
        except ShardError as e:
            raise ShardError(e.path, f"{str(e).split(': ', 1)[-1]} (data source {name})") from e
        except ValueError as e:
            raise DataError(f"{key}: {e} (data source {name})") from e
    if len(sources) == 1:
        train, val = trains[0], vals[0]
    else:
        names, weights = [n for _, _, n, _ in sources], [w for _, w, _, _ in sources]
        train: Dataset = MixtureDataset(trains, weights, seed, names=names)
        val = MixtureDataset(vals, weights, seed, names=names, shuffle=False)
    loader = TokenBatchLoader(train, global_batch_size, dp_rank=dp_rank, dp_world=dp_world, prefetch=prefetch)
    return loader, val, tokenizer
