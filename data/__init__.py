"""Data: tokenizers, the token-shard format, the built-in corpus and the streaming loader.

The loader names (which import torch) are loaded on first use, so tokenizing / shard-writing processes
(e.g. the workers of `python -m data.prepare`) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

from data.shards import Shard, ShardError, open_shard, token_dtype, write_shard
from data.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_fingerprint

_LAZY = {
    "builtin_corpus": "data.builtin",
    "FeistelPermutation": "data.loader",
    "WindowDataset": "data.loader",
    "TokenBatchLoader": "data.loader",
    "build_loaders": "data.loader",
    "eval_batches": "data.loader",
}

__all__ = [
    "ByteTokenizer", "Tokenizer", "tokenizer_from_fingerprint",
    "Shard", "ShardError", "open_shard", "write_shard", "token_dtype",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
