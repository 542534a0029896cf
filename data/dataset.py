"""Samples as a pure function of (seed, global sample index): windows over packed shards, and mixtures.

This module needs only numpy (no torch), so a process that just reads samples stays small.

**Windows.** The shards' tokens, taken in the order given, form one stream (documents are already separated
by EOS). Window ``w`` is the ``seq_len + 1`` tokens starting at token ``w * seq_len``: consecutive windows
share one boundary token so every token is predicted exactly once, and windows may cross shard boundaries
(nothing is wasted at the end of a shard). There are ``(num_tokens - 1) // seq_len`` windows. A document
longer than a window simply continues in the next window(s); short ones are packed together.

**Order.** Sample ``i`` of epoch ``e`` is window ``P_e(i)`` where ``P_e`` is a keyed Feistel permutation of
``[0, num_windows)`` (cycle-walking over the next even power of two). It costs O(1) memory and time per
sample, so start-up and memory do not grow with the corpus (15T tokens = ~3.7B windows of 4096). Global
sample ``g`` is sample ``g % num_windows`` of epoch ``g // num_windows``; each epoch has its own key.

**Mixtures.** `MixtureDataset` interleaves several sources by weight, again as a pure function of ``g``: the
global sequence is cut into blocks of ``B`` samples in which source ``s`` owns exactly ``n_s`` slots
(``n_s / B`` = its normalised weight); a keyed permutation of each block decides which position gets which
slot. Each source then reads its own samples in its own shuffled order, wrapping into new epochs on its own
(a small source with a large weight repeats sooner: that is what upsampling means).

Everything is a Python int or uint64: indices and offsets are 64-bit safe.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
import os
from collections.abc import Sequence
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from data.shards import TOKENS_FILE, DataError, Shard, ShardError, TokenIdError, is_shard, open_shard

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
    Picklable: memory maps are reopened in the receiving process instead of being copied. With `vocab_size`,
    every row `gather` returns is checked to hold ids below it (one vectorised max; shards have no header
    and are not hashed on open, so this is where a corrupt or mismatched file is caught), raising
    `TokenIdError` naming the file and offset.
    """

    def __init__(
        self, shard_paths: Sequence[str], seq_len: int, seed: int, shuffle: bool = True,
        expected_fingerprint: str | None = None, vocab_size: int | None = None,
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
        self.check_vocab_size = vocab_size
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
        self._order_cache: dict[tuple[int, int], np.ndarray] = {}

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
        self._starts_u64 = np.asarray(self._starts, dtype=np.uint64)
        self._sizes_u64 = np.asarray([s.num_tokens for s in self._shards], dtype=np.uint64)
        self._views: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_shards", "_starts", "_starts_u64", "_sizes_u64", "_views", "_order_cache"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._order_cache = {}
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
        start = operator.index(start)
        return self.gather(np.arange(start, start + count, dtype=np.uint64))

    def gather(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The global samples at `indices` (any order, epochs wrap), as int64 [len(indices), seq_len + 1]."""
        g = np.asarray(indices, dtype=np.uint64).reshape(-1)
        out = np.empty((g.size, self.seq_len + 1), dtype=np.int64)
        if g.size == 0:
            return out
        n = self.seq_len + 1
        starts = self.windows_of(g) * np.uint64(self.seq_len)  # stream offsets (uint64: 64-bit safe)
        shard = np.searchsorted(self._starts_u64, starts, side="right") - 1
        local = starts - self._starts_u64[shard]
        inside = local + np.uint64(n) <= self._sizes_u64[shard]
        for k in np.unique(shard[inside]).tolist():
            rows = np.nonzero(inside & (shard == k))[0]
            # Rows of a sliding-window view of the memory map: one C-level copy per window, no Python loop.
            out[rows] = self._window_view(k)[local[rows].astype(np.int64)]
        for row in np.nonzero(~inside)[0].tolist():  # the rare window that crosses into the next shard
            out[row] = self.window(int(starts[row]) // self.seq_len)
        if self.check_vocab_size is not None and int(out.max()) >= self.check_vocab_size:
            self._bad_token(out, starts)
        return out

    def _bad_token(self, rows: np.ndarray, starts: np.ndarray) -> None:
        """Raise TokenIdError for the first id >= check_vocab_size in `rows` (windows at stream offsets `starts`)."""
        row, col = np.argwhere(rows >= self.check_vocab_size)[0].tolist()
        offset = int(starts[row]) + col  # in the packed stream of all shards
        k = bisect.bisect_right(self._starts, offset) - 1
        raise TokenIdError(Path(self._shards[k].path) / TOKENS_FILE, offset - self._starts[k], int(rows[row, col]),
                           self.check_vocab_size)

    def _window_view(self, k: int) -> np.ndarray:
        """Shard `k`'s tokens as a [num_tokens - seq_len, seq_len + 1] view of overlapping windows (no copy)."""
        view = self._views.get(k)
        if view is None:
            view = self._views[k] = sliding_window_view(self._shards[k].tokens, self.seq_len + 1)
        return view

    def windows_of(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Which stream window each global sample is (global: epoch ``g // len`` wraps around), as uint64."""
        g = np.asarray(indices, dtype=np.uint64).reshape(-1)
        n = np.uint64(self.num_windows)
        epochs, within = g // n, g % n
        if not self.shuffle:
            return within
        windows = np.empty_like(within)
        blocks = within // np.uint64(self.ORDER_BLOCK)
        for epoch, block in {(int(e), int(b)) for e, b in zip(epochs.tolist(), blocks.tolist(), strict=True)}:
            sel = (epochs == epoch) & (blocks == block)
            windows[sel] = self._order_block(epoch, block)[within[sel] - np.uint64(block * self.ORDER_BLOCK)]
        return windows

    ORDER_BLOCK = 4096  # samples whose windows are computed in one vectorised call and cached

    def _order_block(self, epoch: int, block: int) -> np.ndarray:
        """Windows of samples [block*B, (block+1)*B) of `epoch`. One numpy call for B samples costs about what
        a call for one batch did, and ranks read the global order in runs, so the blocks are reused."""
        key = (epoch, block)
        cached = self._order_cache.get(key)
        if cached is None:
            lo = block * self.ORDER_BLOCK
            hi = min(lo + self.ORDER_BLOCK, self.num_windows)
            cached = self.permutation(epoch).map(np.arange(lo, hi, dtype=np.uint64))
            if len(self._order_cache) >= 8:  # a few blocks: the current one and its neighbours
                self._order_cache.pop(next(iter(self._order_cache)))
            self._order_cache[key] = cached
        return cached


class MixtureDataset:
    """Sources mixed by weight; sample ``g`` is a pure function of (seed, g) (see the module doc).

    `sources` are datasets with ``gather``/``seq_len`` (normally `WindowDataset`s); `weights` are positive
    and normalised here, then resolved to whole slots in the smallest block that holds them (``[1, 1]`` gives
    blocks of 2, ``[1, 1, 1]`` of 3, ``[0.7, 0.3]`` of 10; at most ``resolution``). ``len()``
    is the number of samples before any source would wrap into its second epoch.
    """

    def __init__(
        self, sources: Sequence[Any], weights: Sequence[float], seed: int, names: Sequence[str] | None = None,
        resolution: int = 10_000, shuffle: bool = True,
    ) -> None:
        names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
        if not sources or len(sources) != len(weights) or len(names) != len(sources):
            raise ValueError(f"need one weight and name per source, got {len(sources)} sources, "
                             f"{len(weights)} weights, {len(names)} names")
        for name, w in zip(names, weights, strict=True):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"{name}: mixture weight must be a positive number, got {w!r} "
                                 f"(remove the source to leave it out)")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"all sources must have the same seq_len, got {sorted(seq_lens)}")
        self.sources, self.names, self.seq_len = list(sources), names, seq_lens.pop()
        self.slots = _resolve_slots([float(w) for w in weights], resolution)
        for name, w, n in zip(names, weights, self.slots, strict=True):
            if n == 0:
                raise ValueError(f"{name}: weight {w} is below the mixture resolution 1/{resolution} of the "
                                 f"total {sum(weights)}; raise it or remove the source")
        self.block = sum(self.slots)
        self.slot_starts = np.cumsum([0, *self.slots])  # slots [start_s, start_s + n_s) belong to source s
        self.weights = [n / self.block for n in self.slots]
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._perms: dict[int, FeistelPermutation] = {}

    def __len__(self) -> int:
        return min(len(src) // n for src, n in zip(self.sources, self.slots, strict=True)) * self.block

    def locate(self, indices: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) of each global sample in `indices`."""
        g = np.asarray(indices, dtype=np.uint64).reshape(-1)
        block, pos = g // np.uint64(self.block), g % np.uint64(self.block)
        slot = pos.copy()
        if self.shuffle and self.block > 1:
            for b in np.unique(block).tolist():
                sel = block == b
                slot[sel] = self._block_permutation(int(b)).map(pos[sel])
        source = np.searchsorted(self.slot_starts, slot, side="right") - 1
        slots = np.asarray(self.slots, dtype=np.uint64)[source]
        within = block * slots + (slot - self.slot_starts[source].astype(np.uint64))
        return source, within

    def _block_permutation(self, block: int) -> FeistelPermutation:
        perm = self._perms.get(block)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[block] = FeistelPermutation(self.block, derive_seed(self.seed, 0xB10C, block))
        return perm

    def gather(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The global samples at `indices`, as int64 [len(indices), seq_len + 1]."""
        source, within = self.locate(indices)
        out = np.empty((source.size, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(source).tolist():
            sel = source == s
            out[sel] = self.sources[s].gather(within[sel])
        return out

    def samples(self, start: int, count: int) -> np.ndarray:
        """Global samples [start, start + count) as int64 [count, seq_len + 1]."""
        start = operator.index(start)
        return self.gather(np.arange(start, start + count, dtype=np.uint64))


def _resolve_slots(weights: list[float], resolution: int) -> list[int]:
    """Whole slots per source in the smallest block that holds the weights' proportions.

    Simple ratios are kept exactly (1:1:1 gives blocks of 3, 0.7:0.3 blocks of 10); anything needing a
    block larger than `resolution` is rounded to `resolution` slots by largest remainder (Hamilton).
    """
    total = sum(Fraction(w).limit_denominator(10**9) for w in weights)
    shares = [(Fraction(w).limit_denominator(10**9) / total).limit_denominator(resolution) for w in weights]
    block = reduce(math.lcm, (f.denominator for f in shares), 1)
    if sum(shares) == 1 and block <= resolution:
        slots = [int(f * block) for f in shares]
    else:
        exact = [w * resolution / sum(weights) for w in weights]
        slots = [int(math.floor(x)) for x in exact]
        order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - slots[i]), i))
        for i in order[: resolution - sum(slots)]:
            slots[i] += 1
    common = reduce(math.gcd, slots)
    return [n // common for n in slots] if common else slots


def find_shards(directory: str | os.PathLike[str]) -> list[str]:
    """The finished shards directly under `directory`, sorted by name (unfinished temp dirs are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        raise ShardError(d, "shard directory does not exist")
    found = sorted(str(p) for p in d.iterdir() if not p.name.startswith(".") and is_shard(p))
    if not found:
        raise ShardError(d, "contains no shards (subdirectories with a manifest.json written by write_shard)")
    return found


def open_source(path: str, cache_dir: str | None = None, progress: bool = True) -> tuple[list[str], list[str]]:
    """(train shard paths, val shard paths) of one data source: "builtin" or a prepared directory.

    A directory written by `python -m data.prepare` lists its shards in `dataset.json`, which exists only
    once every shard is finished, so an interrupted preparation is refused rather than trained on. A
    directory without `prepare.json` is taken as hand-made: every shard under `train/` and `val/`.
    """
    if path == "builtin":
        from data.builtin import builtin_corpus

        train, val = builtin_corpus(cache_dir, progress=progress)
        return [train], [val]
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise DataError(f"'{path}' is neither 'builtin' nor an existing directory")
    manifest_path = root / "dataset.json"
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            splits = {s: [str(root / sh["name"]) for sh in manifest["splits"][s]["shards"]] for s in ("train", "val")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(manifest_path, f"unreadable dataset manifest ({e})") from e
        return splits["train"], splits["val"]
    if (root / "prepare.json").exists():
        raise ShardError(root, "dataset is incomplete (no dataset.json): `python -m data.prepare` was "
                               "interrupted; rerun the same command to finish it")
    return find_shards(root / "train"), find_shards(root / "val")
