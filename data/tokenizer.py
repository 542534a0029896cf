"""Tokenizers.

Every tokenizer has the same small surface (`Tokenizer`): `encode`/`decode`, the special ids and a
`fingerprint` that shards record, so a loader can refuse to mix shards made by different tokenizers.
Only the byte-level tokenizer exists today; BPE tokenizers (Kimi K2 / DeepSeek-V3) plug in behind the
same interface and are found again from a shard's fingerprint with `tokenizer_from_fingerprint`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...


def _fingerprint(identity: str) -> str:
    """A short, stable hash of a tokenizer's identity (16 hex digits of sha256)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus three special tokens; needs no files and no training.

    Any text round-trips exactly (`decode(encode(t)) == t`), which makes it the tokenizer for tests, smoke
    runs and the built-in corpus.
    """

    IDENTITY = "byte-v1"
    EOS, BOS, PAD = "<|eos|>", "<|bos|>", "<|pad|>"

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {self.EOS: 256, self.BOS: 257, self.PAD: 258}

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def eos_id(self) -> int:
        return 256

    @property
    def bos_id(self) -> int:
        return 257

    @property
    def pad_id(self) -> int:
        return 258

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.IDENTITY)

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids; no special tokens are added."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Like `encode` but returns a uint16 array without a Python list (the fast path for shards)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text from ids; special tokens are dropped and invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the byte vocabulary [0, {self.vocab_size})")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def tokenizer_from_fingerprint(fingerprint: str) -> Tokenizer:
    """The tokenizer that wrote shards with this fingerprint (only the byte tokenizer is known today)."""
    byte = ByteTokenizer()
    if fingerprint == byte.fingerprint:
        return byte
    raise ValueError(
        f"unknown tokenizer fingerprint {fingerprint!r}: these shards were made by a tokenizer this "
        f"version of Chogori cannot load (known: byte={byte.fingerprint!r})"
    )
