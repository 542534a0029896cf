"""Streaming loader: fixed windows over the packed token stream, in a seeded order computed on the fly.

The global sample order is a pure function of (seed, global sample index):

- The shards' tokens, taken in the order given, form one stream (documents are already separated by EOS).
  Window ``w`` is the ``seq_len + 1`` tokens starting at token ``w * seq_len``: consecutive windows share
  one boundary token so every token is predicted exactly once, and **windows may cross shard boundaries**
  (nothing is wasted at the end of a shard). There are ``(num_tokens - 1) // seq_len`` windows.
- Sample ``i`` of epoch ``e`` is window ``P_e(i)`` where ``P_e`` is a keyed Feistel permutation of
  ``[0, num_windows)`` (cycle-walking over the next even power of two). It costs O(1) memory and time per
  sample, so start-up and memory do not grow with the corpus (15T tokens = ~3.7B windows of 4096).
- Global sample ``g`` is sample ``g % num_windows`` of epoch ``g // num_windows``; each epoch has its own
  permutation key, derived from (seed, epoch).
- Step ``s`` with global batch ``G`` uses global samples ``[s*G, (s+1)*G)``; data-parallel rank ``r`` of
  ``W`` reads only its contiguous slice of ``L = G // W`` of them. The order therefore does not depend on
  the world size, and resuming needs only the number of samples consumed.
"""

from __future__ import annotations

import bisect
import operator
import os
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.shards import Shard, ShardError, is_shard, open_shard
from data.tokenizer import Tokenizer, tokenizer_from_fingerprint

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fast, well-mixing bijection of 64-bit integers."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    """`_mix64` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64, as wanted)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_seed(seed: int, *salt: int) -> int:
    """A 64-bit key from a seed and integers (e.g. the epoch); distinct inputs give unrelated keys."""
    h = _mix64(seed & _MASK64)
    for s in salt:
        h = _mix64(h ^ _mix64((s + _GOLDEN) & _MASK64))
    return h


class FeistelPermutation:
    """A pseudo-random bijection of ``[0, n)`` keyed by `seed`, evaluated per index without any table.

    A balanced Feistel network is a bijection of ``[0, 4**h)`` whatever its round function; indices that
    land outside ``[0, n)`` are encrypted again (cycle walking) until they fall inside, which keeps it a
    bijection of ``[0, n)``. The domain is at most 4x ``n``, so fewer than 4 walks are needed on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int) -> None:
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = int(n)
        self.seed = int(seed)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [derive_seed(seed, 0xFE1, r) for r in range(self.ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        """The image of index `i` (0 <= i < n)."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a permutation of size {self.n}")
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x

    def _encrypt_np(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64(self.mask)
        left, right = x >> half, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix64_np(right ^ np.uint64(k)) & mask)
        return (left << half) | right

    def map(self, indices: np.ndarray) -> np.ndarray:
        """Vectorised `__call__` over an integer array (same results); returns uint64."""
        idx = np.asarray(indices)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"indices out of range for a permutation of size {self.n}")
        with np.errstate(over="ignore"):
            x = self._encrypt_np(idx.astype(np.uint64))
            out = x >= np.uint64(self.n)
            while out.any():
                x[out] = self._encrypt_np(x[out])
                out = x >= np.uint64(self.n)
        return x


class WindowDataset:
    """Windows of ``seq_len + 1`` tokens over the packed stream of `shard_paths` (see the module doc).

    ``dataset[i]`` is sample ``i`` of epoch 0 as an int64 array; `samples` reads any run of global samples
    (epochs wrap) and is what the loaders use. With ``shuffle=False`` sample ``i`` is window ``i``.
    Picklable: memory maps are reopened in the receiving process instead of being copied.
    """

    def __init__(
        self, shard_paths: list[str], seq_len: int, seed: int, shuffle: bool = True,
        expected_fingerprint: str | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not shard_paths:
            raise ValueError("WindowDataset needs at least one shard path")
        self.shard_paths = [str(p) for p in shard_paths]
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._expected_fingerprint = expected_fingerprint
        self._open()
        first = self._shards[0]
        self.tokenizer_fingerprint = first.tokenizer_fingerprint
        self.vocab_size = first.vocab_size
        self.num_tokens = sum(s.num_tokens for s in self._shards)
        self.num_windows = max(0, (self.num_tokens - 1) // self.seq_len)
        if self.num_windows == 0:
            raise ValueError(f"the shards hold {self.num_tokens} tokens, too few for one window of "
                             f"seq_len + 1 = {self.seq_len + 1}: {self.shard_paths}")
        self._perms: dict[int, FeistelPermutation] = {}

    def _open(self) -> None:
        shards = [open_shard(p, expected_fingerprint=self._expected_fingerprint) for p in self.shard_paths]
        first = shards[0]
        for s in shards[1:]:
            if (s.tokenizer_fingerprint, s.vocab_size) != (first.tokenizer_fingerprint, first.vocab_size):
                raise ShardError(s.path, f"tokenizer {s.tokenizer_fingerprint!r} / vocab {s.vocab_size} "
                                         f"differs from {first.path}'s; one dataset must use one tokenizer")
        self._shards: list[Shard] = [s for s in shards if s.num_tokens > 0]
        self._starts: list[int] = []  # stream offset of each non-empty shard (Python ints: 64-bit safe)
        pos = 0
        for s in self._shards:
            self._starts.append(pos)
            pos += s.num_tokens
        if not self._shards:
            self._shards, self._starts = shards[:1], [0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_shards"], state["_starts"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.num_windows

    def permutation(self, epoch: int = 0) -> FeistelPermutation | None:
        """The window order of `epoch` (None when not shuffling: the identity)."""
        if not self.shuffle:
            return None
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 8:
                self._perms.clear()
            perm = self._perms[epoch] = FeistelPermutation(
                self.num_windows, self.seed if epoch == 0 else derive_seed(self.seed, epoch))
        return perm

    def window_index(self, i: int, epoch: int = 0) -> int:
        """Which window sample `i` of `epoch` is."""
        i = operator.index(i)
        if not 0 <= i < self.num_windows:
            raise IndexError(f"sample {i} out of range for {self.num_windows} windows")
        perm = self.permutation(epoch)
        return i if perm is None else perm(i)

    def window(self, w: int) -> np.ndarray:
        """Window `w` in stream order: tokens [w*seq_len, w*seq_len + seq_len + 1), as int64."""
        n = self.seq_len + 1
        start = operator.index(w) * self.seq_len
        out = np.empty(n, dtype=np.int64)
        k = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        while filled < n:
            shard = self._shards[k]
            lo = start + filled - self._starts[k]
            take = min(n - filled, shard.num_tokens - lo)
            out[filled : filled + take] = shard.tokens[lo : lo + take]
            filled += take
            k += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        if i < 0:
            i += self.num_windows
        return self.window(self.window_index(i))

    def samples(self, start: int, count: int) -> np.ndarray:
        """Global samples [start, start + count), wrapping into later epochs, as int64 [count, seq_len+1]."""
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        g, row = operator.index(start), 0
        while row < count:
            epoch, i = divmod(g, self.num_windows)
            take = min(count - row, self.num_windows - i)
            perm = self.permutation(epoch)
            idx = np.arange(i, i + take, dtype=np.uint64)
            windows = idx if perm is None else perm.map(idx)
            for j, w in enumerate(windows.tolist()):
                out[row + j] = self.window(w)
            g, row = g + take, row + take
        return out


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenBatchLoader:
    """Infinite iterator of this rank's ``(inputs, targets)`` LongTensors, each ``[G // dp_world, seq_len]``.

    The state is one integer, the number of global samples consumed (G per batch yielded), so a run can
    resume on any world size that divides G. Up to `prefetch` batches are read ahead by one background
    thread; that never changes what is yielded (each batch is a pure function of its first sample index).
    """

    def __init__(
        self, dataset: WindowDataset, global_batch_size: int, dp_rank: int = 0, dp_world: int = 1,
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
    val_dataset: WindowDataset, batch_size: int, num_batches: int | None = None, dp_rank: int = 0,
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
        raise ValueError(f"the validation set has {len(val_dataset)} windows of {val_dataset.seq_len + 1} "
                         f"tokens, fewer than one eval batch of {batch_size}; lower the batch or seq_len")
    count = available if num_batches is None else min(int(num_batches), available)
    local = batch_size // dp_world
    for b in range(count):
        rows = val_dataset.samples(b * batch_size + dp_rank * local, local)
        yield _to_batch(rows)


def find_shards(directory: str | os.PathLike[str]) -> list[str]:
    """The finished shards directly under `directory`, sorted by name (unfinished temp dirs are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        raise ShardError(d, "shard directory does not exist")
    found = sorted(str(p) for p in d.iterdir() if not p.name.startswith(".") and is_shard(p))
    if not found:
        raise ShardError(d, "contains no shards (subdirectories with a manifest.json written by write_shard)")
    return found


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def build_loaders(
    data_cfg: Any, seq_len: int, global_batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
) -> tuple[TokenBatchLoader, WindowDataset, Tokenizer]:
    """(train loader, validation dataset, tokenizer) for a `data:` config section.

    Keys: `source` — "builtin" (the Python standard library corpus) or a directory with `train/` and
    `val/` subdirectories of shards; `cache_dir` — where the built-in corpus lives (null: default);
    `prefetch` — batches read ahead (default 2). Every rank may call this at once.
    """
    source = _cfg_get(data_cfg, "source", "builtin")
    cache_dir = _cfg_get(data_cfg, "cache_dir", None)
    prefetch = int(_cfg_get(data_cfg, "prefetch", 2))
    if source == "builtin":
        from data.builtin import builtin_corpus

        train_path, val_path = builtin_corpus(cache_dir, progress=dp_rank == 0)
        train_paths, val_paths = [train_path], [val_path]
    else:
        root = Path(str(source)).expanduser()
        if not root.is_dir():
            raise ValueError(f"data.source {source!r} is neither 'builtin' nor an existing directory")
        train_paths, val_paths = find_shards(root / "train"), find_shards(root / "val")
    fingerprint = open_shard(train_paths[0]).tokenizer_fingerprint
    tokenizer = tokenizer_from_fingerprint(fingerprint)
    train = WindowDataset(train_paths, seq_len, seed, shuffle=True, expected_fingerprint=fingerprint)
    val = WindowDataset(val_paths, seq_len, seed, shuffle=False, expected_fingerprint=fingerprint)
    loader = TokenBatchLoader(train, global_batch_size, dp_rank=dp_rank, dp_world=dp_world, prefetch=prefetch)
    return loader, val, tokenizer
