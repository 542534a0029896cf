"""Tokenizers.

Every tokenizer has the same small surface (`Tokenizer`): `encode`/`decode`, the special ids and a
`fingerprint` that shards record, so a loader can refuse to mix shards made by different tokenizers and can
find the tokenizer again from a shard (`tokenizer_from_fingerprint`). Three kinds:

- `ByteTokenizer` (spec ``"byte"``): UTF-8 bytes plus three special tokens; needs no files and no training.
- `HFTokenizer`: any Hugging Face `tokenizers` JSON file (the ``tokenizer.json`` of DeepSeek-V3, Llama, Qwen,
  GPT-2, ...). Its fingerprint hashes the file's JSON content (key order and whitespace don't matter) and the
  chosen special ids: the same file always gives the same fingerprint, whichever `tokenizers` version reads
  it, and any change to the vocabulary, merges, normalizer, ... gives another.
- A byte-level BPE trained on local text or ``.jsonl`` files by `train_bpe` or
  ``python -m data.tokenizer train --vocab-size N --out DIR FILES...``; it is written as a ``tokenizer.json``
  and loaded back as an `HFTokenizer`. ``python -m data.tokenizer info SPEC`` describes any tokenizer.

`save_for_transformers(tok, dir, model_max_length)` writes any of them as `transformers.AutoTokenizer` loads it
(the byte tokenizer as an equivalent byte-level `tokenizers` JSON, `ByteTokenizer.to_hf_json`).

`load_tokenizer(spec)` turns ``"byte"`` or a path into a tokenizer. The `tokenizers` package is imported only
when an `HFTokenizer` is made or trained, so the byte tokenizer works without it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

TOKENIZER_FILE = "tokenizer.json"

# Special-token names of common tokenizer files, most preferred first: the first one that is an added token
# of the file wins. Document separators come before chat-turn ends (Qwen has both <|endoftext|> and
# <|im_end|>; pretraining wants the former). BOS and PAD fall back to EOS (GPT-2 has only <|endoftext|>).
EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "[EOS]", "<eos>",
             "<|im_end|>")
BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "[BOS]", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<｜▁pad▁｜>")


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

    def encode_batch_arrays(self, texts: Iterable[str]) -> list[np.ndarray]:
        """`encode_array` of each text (the same batch surface as `HFTokenizer`)."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text from ids; special tokens are dropped and invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the byte vocabulary [0, {self.vocab_size})")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face `tokenizers` JSON (what `save_for_transformers` writes as
        tokenizer.json): encode and decode give exactly this tokenizer's ids and text, invalid UTF-8 included.

        A BPE with no merges over a 256-token vocabulary, token i being byte i in GPT-2's byte-level alphabet,
        behind the ByteLevel pre-tokenizer without its regex split (so text is only mapped to bytes, never cut)
        and the ByteLevel decoder; the special tokens keep their ids 256..258. The ByteLevel decoder is chosen
        over byte-fallback `<0xNN>` tokens because it decodes invalid UTF-8 as Python's errors="replace" does,
        where the byte-fallback decoder also swallows the valid bytes that follow an invalid one."""
        hf = _hf()
        tok = hf.Tokenizer(hf.models.BPE(vocab={c: b for b, c in enumerate(_byte_level_chars())}, merges=[]))
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = hf.decoders.ByteLevel()
        for name, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            tok.add_special_tokens([hf.AddedToken(name, special=True, normalized=False)])
            if tok.token_to_id(name) != i:  # added tokens take the next free id; the ids are the format
                raise AssertionError(f"special token {name} got id {tok.token_to_id(name)}, not {i}")
        return tok.to_str(pretty=True)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def _byte_level_chars() -> list[str]:
    """The character GPT-2's byte-level alphabet (the `ByteLevel` pre-tokenizer's) gives each byte 0..255:
    printable Latin-1 bytes stand for themselves, the other 68 take the code points 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 256
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(extra), extra + 1
    return [chars[b] for b in range(256)]


def _hf() -> Any:
    """The `tokenizers` package, imported on first use so the byte tokenizer needs nothing installed."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("Hugging Face tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and `os.replace`, so readers never see a half-written tokenizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (``tokenizer.json``) behind the `Tokenizer` interface.

    Special ids: a token named by `eos_token` / `bos_token` / `pad_token` must be in the vocabulary; otherwise
    the first of `EOS_NAMES` / `BOS_NAMES` / `PAD_NAMES` that is an added token of the file is used, BOS and
    PAD falling back to EOS. A file with no recognisable EOS needs `eos_token`.

    Text is always text: no special tokens are added, and the spelling of a special token inside a document
    (say "<|endoftext|>" in a page about GPT-2) is encoded as ordinary text rather than as the special id, so
    a document cannot forge a document boundary (for byte-level files `decode(encode(t)) == t` for every t).
    Padding and truncation settings in the file are switched off: a shard must hold whole documents.
    """

    def __init__(
        self, path: str | os.PathLike[str], eos_token: str | None = None, bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        hf = _hf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(self.path)!r} does not exist (or is not a file)")
        try:
            self._text = self.path.read_text(encoding="utf-8")
            config = json.loads(self._text)
            self.tokenizer = self._build(hf, self._text)
        except Exception as e:  # bad UTF-8, bad JSON, or the library's own (untyped) errors
            raise ValueError(f"{str(self.path)!r} is not a valid tokenizer.json file: {e}") from e

        added = {t.content: i for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())}
        eos = self._special_id("eos_token", eos_token, EOS_NAMES, added)
        if eos is None:
            raise ValueError(f"{str(self.path)!r} has no end-of-sequence token among its added tokens (looked "
                             f"for {', '.join(EOS_NAMES)}); pass eos_token= naming the one to use")
        self._eos = eos
        self._bos = self._special_id("bos_token", bos_token, BOS_NAMES, added)
        self._bos = eos if self._bos is None else self._bos
        self._pad = self._special_id("pad_token", pad_token, PAD_NAMES, added)
        self._pad = eos if self._pad is None else self._pad
        # Files can leave holes in the id space; the model needs an embedding row for the largest id.
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        # Hash the file's content, not the library's re-serialization: a `tokenizers` upgrade that adds a
        # default field must not orphan existing shards.
        canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self._fingerprint = _fingerprint(f"hf-json-v1|{canonical}|eos={eos}|bos={self._bos}|pad={self._pad}")

    @staticmethod
    def _build(hf: Any, text: str) -> Any:
        tok = hf.Tokenizer.from_str(text)
        tok.no_padding()  # shards hold whole documents
        tok.no_truncation()
        tok.encode_special_tokens = True  # a special token's spelling in a document is text
        return tok

    def __getstate__(self) -> dict[str, Any]:
        # The library's own pickling drops `encode_special_tokens`: rebuild from the file's text instead.
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokenizer = self._build(_hf(), self._text)

    def _special_id(self, what: str, name: str | None, candidates: Sequence[str], added: dict[str, int]) -> int | None:
        if name is None:
            return next((added[c] for c in candidates if c in added), None)
        i = self.tokenizer.token_to_id(name)
        if i is None:
            raise ValueError(f"{what} {name!r} is not in the vocabulary of {str(self.path)!r}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch_arrays(self, texts: Iterable[str]) -> list[np.ndarray]:
        """`encode_array` of each text, encoded in parallel by the library (the fast path for shards)."""
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text from ids, special tokens skipped; an id outside the vocabulary is an error."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size}) of {self.path}")
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=True)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a copy of the tokenizer.json this was loaded from (so the copy has the same fingerprint)."""
        _atomic_write_text(Path(path), self._text)

    def __repr__(self) -> str:
        return (f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"fingerprint={self.fingerprint!r})")


def _tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """`path` itself, or the tokenizer.json inside it when it is a directory."""
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


def load_tokenizer(
    spec: str | os.PathLike[str], *, eos_token: str | None = None, bos_token: str | None = None,
    pad_token: str | None = None,
) -> Tokenizer:
    """``"byte"`` -> `ByteTokenizer`; a tokenizer.json file, or a directory holding one -> `HFTokenizer`."""
    if str(spec) == "byte":
        if eos_token or bos_token or pad_token:
            raise ValueError("the byte tokenizer's special tokens are fixed; eos_token/bos_token/pad_token "
                             "apply only to tokenizer.json files")
        return ByteTokenizer()
    path = _tokenizer_file(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} is neither 'byte' nor a {TOKENIZER_FILE} file nor a "
                                f"directory holding one")
    return HFTokenizer(path, eos_token=eos_token, bos_token=bos_token, pad_token=pad_token)


def tokenizer_from_fingerprint(
    fingerprint: str, search: Iterable[str | os.PathLike[str]] | str | os.PathLike[str] = ()
) -> Tokenizer:
    """The tokenizer that wrote shards with this fingerprint: the byte tokenizer, or a tokenizer.json among
    `search` (directories holding a tokenizer.json, or files), loaded with its auto-detected special tokens."""
    byte = ByteTokenizer()
    if fingerprint == byte.fingerprint:
        return byte
    if isinstance(search, (str, os.PathLike)):  # one path, not an iterable of characters
        search = [search]
    seen = [f"byte={byte.fingerprint}"]
    for entry in search:
        path = _tokenizer_file(entry)
        if not path.is_file():
            seen.append(f"{path} (missing)")
            continue
        try:
            tok = HFTokenizer(path)
        except (ValueError, ImportError) as e:
            seen.append(f"{path} ({e})")
            continue
        if tok.fingerprint == fingerprint:
            return tok
        seen.append(f"{path}={tok.fingerprint}")
    hint = "" if len(seen) > 1 else "; pass the directory holding its tokenizer.json to search"
    raise ValueError(f"unknown tokenizer fingerprint {fingerprint!r}: searched {'; '.join(seen)}{hint}")


def special_token_names(tok: Tokenizer) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., "pad_token": ...}: the spelling of each special id of `tok`."""
    if isinstance(tok, HFTokenizer):
        def name(i: int) -> str:
            return str(tok.tokenizer.id_to_token(i))
    elif isinstance(tok, ByteTokenizer):
        names = {i: n for n, i in tok.special_tokens.items()}

        def name(i: int) -> str:
            return names[i]
    else:
        raise TypeError(f"no Hugging Face form for {tok!r}")
    return {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)}


def save_for_transformers(tok: Tokenizer, directory: str | os.PathLike[str], model_max_length: int) -> list[str]:
    """Write `tok` into `directory` as `transformers.AutoTokenizer.from_pretrained` reads it: tokenizer.json
    (a copy of an `HFTokenizer`'s file; `ByteTokenizer.to_hf_json` for the byte tokenizer),
    tokenizer_config.json and special_tokens_map.json. Each file is written atomically. Returns the names.

    As in training, no BOS or EOS is added to encoded text (unless an `HFTokenizer`'s own file adds them).
    One difference: `transformers` encodes the spelling of a special token inside text as the special id,
    where Chogori's tokenizers encode it as ordinary text."""
    directory = Path(directory)
    if isinstance(tok, HFTokenizer):
        text = tok._text  # the file itself, not a re-serialization: the same fingerprint if it is loaded back
    elif isinstance(tok, ByteTokenizer):
        text = tok.to_hf_json()
    else:
        raise TypeError(f"no Hugging Face form for {tok!r}")
    specials = special_token_names(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": int(model_max_length),
        # Decoding must give back the text exactly: no " ," -> "," clean-up.
        "clean_up_tokenization_spaces": False,
    }
    files = {TOKENIZER_FILE: text, "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
             "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n"}
    for name, content in files.items():
        _atomic_write_text(directory / name, content)
    return list(files)


def _training_texts(files: Sequence[str], text_field: str) -> Iterator[str]:
    """Text of each file: the `text_field` of every line of a .jsonl file; any other file is read as text
    (undecodable bytes become U+FFFD), in pieces of whole lines so large files stream."""
    for name in files:
        if name.endswith(".jsonl"):
            with open(name, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError, IndexError):
                        text = None
                    if not isinstance(text, str):
                        raise ValueError(f"{name}:{n}: expected a JSON object with a string field {text_field!r}")
                    yield text
        else:
            with open(name, encoding="utf-8", errors="replace") as f:
                while chunk := "".join(islice(f, 10_000)):
                    yield chunk


def train_bpe(
    files: Sequence[str | os.PathLike[str]], vocab_size: int, out: str | os.PathLike[str], min_frequency: int = 2,
    special_tokens: Sequence[str] = ("<|eos|>", "<|bos|>", "<|pad|>"), show_progress: bool = True,
    text_field: str = "text",
) -> HFTokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens on `files` and write it to `out` (a ``.json`` path,
    or else a directory to hold a tokenizer.json). See `_training_texts` for how files are read.

    The special tokens get ids 0, 1, 2, ...; then come the 256 byte tokens (so any text encodes, none is
    unknown) and the merges. A corpus with too few distinct pairs yields fewer than `vocab_size` tokens.
    Training is deterministic: the same files and settings give the same file and fingerprint, whatever the
    thread count (the library counts pairs exactly and breaks ties between equal counts by token ids).
    """
    files = [os.fspath(f) for f in files]
    special_tokens = list(special_tokens)
    if not files:
        raise ValueError("no training files given")
    for name in files:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"training file {name!r} does not exist (or is not a file)")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 256 byte tokens "
                         f"+ {len(special_tokens)} special tokens = {256 + len(special_tokens)}")
    if not any(t in EOS_NAMES for t in special_tokens):
        raise ValueError(f"special_tokens {special_tokens} name no end-of-sequence token; include one of "
                         f"{', '.join(EOS_NAMES)}")
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    # No normalizer: byte-level BPE must round-trip text exactly.
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(_training_texts(files, text_field), trainer=trainer)
    path = Path(out)
    path = path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE
    _atomic_write_text(path, tok.to_str(pretty=True))
    return HFTokenizer(path)


# ---------------------------------------------------------------- command line


def _expand(patterns: Sequence[str]) -> list[str]:
    """Files named by paths and globs (each glob's matches sorted; duplicates dropped, first place kept)."""
    files: list[str] = []
    for pattern in patterns:
        if not any(c in pattern for c in "*?["):
            files.append(pattern)  # train_bpe reports a missing path
            continue
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"{pattern!r} matches no files")
        files += matches
    return list(dict.fromkeys(files))


def _describe(tok: Tokenizer) -> str:
    def name(i: int) -> str:
        if isinstance(tok, HFTokenizer):
            return str(tok.tokenizer.id_to_token(i))
        return {v: k for k, v in getattr(tok, "special_tokens", {}).items()}.get(i, "?")

    return "\n".join([
        f"tokenizer: {tok!r}",
        f"vocab_size: {tok.vocab_size}",
        f"eos_id: {tok.eos_id} {name(tok.eos_id)}",
        f"bos_id: {tok.bos_id} {name(tok.bos_id)}",
        f"pad_id: {tok.pad_id} {name(tok.pad_id)}",
        f"fingerprint: {tok.fingerprint}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.tokenizer", description="Train or inspect tokenizers.",
        epilog="example: python -m data.tokenizer train --vocab-size 32000 --out tok/ 'corpus/*.jsonl'",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a byte-level BPE on local files",
        description="Train a byte-level BPE (special tokens <|eos|>, <|bos|>, <|pad|> = ids 0, 1, 2) on local "
                    "files and write it as a tokenizer.json. .jsonl files contribute the --text-field of each "
                    "line; any other file is read as UTF-8 text. Training is deterministic.",
    )
    train.add_argument("files", nargs="+", metavar="FILE_OR_GLOB",
                       help="training files or quoted globs ('**' recurses); each glob must match a file")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in all, special and byte tokens included")
    train.add_argument("--out", required=True,
                       help="a .json file, or else a directory (made if needed) to write tokenizer.json in")
    train.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    train.add_argument("--text-field", default="text", help="the field of .jsonl records holding the text")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a tokenizer's vocabulary size, special ids and fingerprint")
    info.add_argument("spec", help="'byte', a tokenizer.json file, or a directory holding one")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            t0 = time.perf_counter()
            tok = train_bpe(_expand(args.files), args.vocab_size, args.out, min_frequency=args.min_frequency,
                            show_progress=not args.no_progress, text_field=args.text_field)
            print(f"trained in {time.perf_counter() - t0:.1f} s (vocab_size requested: {args.vocab_size})")
        else:
            tok = load_tokenizer(args.spec)
        print(_describe(tok))
    except (ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library put in it
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
