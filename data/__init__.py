"""Data: tokenizers, the token-shard format, `python -m data.prepare`, datasets and the streaming loader.

Every name is loaded on first use, so processes that only tokenize or write shards (the workers of
`python -m data.prepare`) stay light, and `python -m data.<module>` runs without importing itself twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ByteTokenizer": "data.tokenizer",
    "HFTokenizer": "data.tokenizer",
    "Tokenizer": "data.tokenizer",
    "load_tokenizer": "data.tokenizer",
    "save_for_transformers": "data.tokenizer",
    "tokenizer_from_fingerprint": "data.tokenizer",
    "train_bpe": "data.tokenizer",
    "Shard": "data.shards",
    "ShardError": "data.shards",
    "ShardWriter": "data.shards",
    "open_shard": "data.shards",
    "token_dtype": "data.shards",
    "write_shard": "data.shards",
    "prepare": "data.prepare",
    "PrepareError": "data.prepare",
    "builtin_corpus": "data.builtin",
    "FeistelPermutation": "data.dataset",
    "WindowDataset": "data.dataset",
    "MixtureDataset": "data.dataset",
    "open_source": "data.dataset",
    "TokenBatchLoader": "data.loader",
    "build_loaders": "data.loader",
    "eval_batches": "data.loader",
    "StreamingTokenLoader": "data.streaming",
    "build_stream_loaders": "data.streaming",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
