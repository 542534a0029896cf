"""Tests of data/tokenizer.py: Hugging Face tokenizer files, BPE training (API and CLI), loading and fingerprints.

Training data is real text made here: a few modules of Python's own standard library.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    save_for_transformers,
    tokenizer_from_fingerprint,
    train_bpe,
)

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("textwrap.py", "shlex.py", "string.py", "fnmatch.py")
UNSEEN = (STDLIB / "difflib.py").read_text(encoding="utf-8")[:4000] + "\nnaïve — 東京 🙂 Ωμέγα\r\n\t end"
VOCAB = 500


def _corpus(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copy(STDLIB / name, dest / name)) for name in TRAIN_FILES]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "data.tokenizer", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _info(stdout: str) -> dict[str, str]:
    """The `key: value` lines that `train` and `info` print."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bpe(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    return train_bpe(corpus, VOCAB, tmp_path_factory.mktemp("tok"), show_progress=False)


# ---------------------------------------------------------------- training and the HF tokenizer


def test_cli_train_and_info_match_the_api(corpus: list[str], bpe: HFTokenizer, tmp_path: Path) -> None:
    glob = str(Path(corpus[0]).parent / "*.py")
    r = _cli("train", "--vocab-size", str(VOCAB), "--out", str(tmp_path / "cli"), "--no-progress", glob)
    assert r.returncode == 0, r.stderr
    out = _info(r.stdout)
    # Another process (other hash seed, thread pool) trained the same tokenizer byte for byte.
    assert out["fingerprint"] == bpe.fingerprint
    assert (tmp_path / "cli" / "tokenizer.json").read_bytes() == bpe.path.read_bytes()
    assert (out["vocab_size"], out["eos_id"], out["bos_id"], out["pad_id"]) == (
        str(VOCAB), "0 <|eos|>", "1 <|bos|>", "2 <|pad|>")

    r = _cli("info", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    assert _info(r.stdout)["fingerprint"] == bpe.fingerprint and _info(r.stdout)["vocab_size"] == str(VOCAB)
    r = _cli("info", "byte")
    assert r.returncode == 0 and _info(r.stdout)["fingerprint"] == ByteTokenizer().fingerprint


def test_trained_bpe_round_trips_and_adds_no_special_tokens(bpe: HFTokenizer) -> None:
    assert isinstance(bpe, Tokenizer)
    assert (bpe.vocab_size, bpe.eos_id, bpe.bos_id, bpe.pad_id) == (VOCAB, 0, 1, 2)
    ids = bpe.encode(UNSEEN)
    assert bpe.decode(ids) == UNSEEN and bpe.decode(np.asarray(ids)) == UNSEEN
    assert min(ids) > 2 and len(ids) < 0.8 * len(UNSEEN.encode())  # no specials; merges compress the text
    assert bpe.encode("") == [] and bpe.decode([]) == ""
    # A special token's spelling inside a document is text, not a forged document boundary.
    text = "end of doc <|eos|> still the same doc"
    assert 0 not in bpe.encode(text) and bpe.decode(bpe.encode(text)) == text
    assert bpe.decode([bpe.eos_id, *bpe.encode("ok"), bpe.pad_id]) == "ok"  # decode skips special ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([VOCAB])
    # Data-preparation workers get the tokenizer pickled; it must encode exactly the same there.
    copy = pickle.loads(pickle.dumps(bpe))
    assert copy.encode(text) == bpe.encode(text) and copy.fingerprint == bpe.fingerprint


def test_encode_matches_transformers(bpe: HFTokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(bpe.path))
    for text in (UNSEEN, "x", " leading space", "def f(x):\n    return x  # done\n\n"):
        assert bpe.encode(text) == ref.encode(text, add_special_tokens=False)
    assert bpe.decode(bpe.encode(UNSEEN)) == ref.decode(ref.encode(UNSEEN, add_special_tokens=False))


# ---------------------------------------------------------------- the transformers form (tools/export.py writes it)


def test_byte_tokenizer_json_encodes_and_decodes_as_the_byte_tokenizer() -> None:
    import tokenizers

    byte = ByteTokenizer()
    hf = tokenizers.Tokenizer.from_str(byte.to_hf_json())
    assert hf.get_vocab_size(with_added_tokens=True) == byte.vocab_size
    assert {n: hf.token_to_id(n) for n in byte.special_tokens} == byte.special_tokens
    for text in (UNSEEN, "", " ", "  two  spaces ", "<0x41> \x00\x7f\u0080 ÿ"):
        assert hf.encode(text, add_special_tokens=False).ids == byte.encode(text)
        assert hf.decode(byte.encode(text)) == text
    # any id sequence, invalid UTF-8 and special ids included, decodes to the same text
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, byte.vocab_size, size=int(rng.integers(0, 12))).tolist()
        assert hf.decode(ids, skip_special_tokens=True) == byte.decode(ids), ids


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_for_transformers_loads_with_auto_tokenizer(kind: str, bpe: HFTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = ByteTokenizer() if kind == "byte" else bpe
    assert save_for_transformers(tok, tmp_path, model_max_length=128) == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert auto.model_max_length == 128 and len(auto) == tok.vocab_size
    ids = tok.encode(UNSEEN)
    assert auto(UNSEEN)["input_ids"] == ids  # no BOS/EOS added, as in training
    assert auto.decode(ids) == UNSEEN == tok.decode(ids)
    if kind == "bpe":  # the file itself is copied: loaded back, it is the same tokenizer
        assert HFTokenizer(tmp_path / "tokenizer.json").fingerprint == bpe.fingerprint


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_batch_arrays_equals_encode(kind: str, bpe: HFTokenizer) -> None:
    tok = ByteTokenizer() if kind == "byte" else bpe
    texts = [UNSEEN, "", "a", "東京 🙂", UNSEEN[::-1]]
    arrays = tok.encode_batch_arrays(texts)
    assert len(arrays) == len(texts)
    for text, arr in zip(texts, arrays, strict=True):
        assert isinstance(arr, np.ndarray) and arr.tolist() == tok.encode(text)
        assert np.array_equal(arr, tok.encode_array(text)) and arr.dtype == tok.encode_array(text).dtype
    assert bpe.encode_array("abc").dtype == np.uint32


def test_fingerprint_is_deterministic_and_tracks_changes(corpus: list[str], bpe: HFTokenizer, tmp_path: Path) -> None:
    again = train_bpe(corpus, VOCAB, tmp_path / "again.json", show_progress=False)
    assert again.fingerprint == bpe.fingerprint and again.path == tmp_path / "again.json"
    assert HFTokenizer(bpe.path).fingerprint == bpe.fingerprint
    # Formatting is not identity: the same JSON re-indented, or written by save(), keeps the fingerprint.
    config = json.loads(bpe.path.read_text(encoding="utf-8"))
    (tmp_path / "compact.json").write_text(json.dumps(config, separators=(",", ":")), encoding="utf-8")
    assert HFTokenizer(tmp_path / "compact.json").fingerprint == bpe.fingerprint
    bpe.save(tmp_path / "copy" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "copy").fingerprint == bpe.fingerprint

    fingerprints = {bpe.fingerprint, ByteTokenizer().fingerprint}
    smaller = train_bpe(corpus, VOCAB - 50, tmp_path / "smaller.json", show_progress=False)
    assert smaller.vocab_size == VOCAB - 50
    fingerprints.add(smaller.fingerprint)
    config["normalizer"] = {"type": "NFC"}
    (tmp_path / "nfc.json").write_text(json.dumps(config), encoding="utf-8")
    fingerprints.add(HFTokenizer(tmp_path / "nfc.json").fingerprint)
    fingerprints.add(HFTokenizer(bpe.path, pad_token="<|eos|>").fingerprint)  # other special ids
    assert len(fingerprints) == 5


def test_train_on_jsonl(tmp_path: Path) -> None:
    lines = (STDLIB / "textwrap.py").read_text(encoding="utf-8").splitlines()
    records = [{"body": "\n".join(lines[i:i + 20]), "id": i} for i in range(0, len(lines), 20)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    tok = train_bpe([str(data)], 300, tmp_path / "tok", show_progress=False, text_field="body")
    assert tok.vocab_size == 300 and tok.decode(tok.encode(UNSEEN)) == UNSEEN
    # Only the text field was trained on: the JSON syntax of the records never became a merge.
    assert tok.tokenizer.token_to_id('":') is None and tok.tokenizer.token_to_id('"body') is None
    with pytest.raises(ValueError, match=r"docs.jsonl:1: .*'text'"):
        train_bpe([str(data)], 300, tmp_path / "tok2", show_progress=False)


def test_special_token_detection_and_choice(corpus: list[str], tmp_path: Path) -> None:
    # Chat-style files: the document separator is EOS, not the end of a chat turn; BOS and PAD fall back to it.
    tok = train_bpe(corpus[:1], 300, tmp_path / "qwen.json", special_tokens=("<|im_end|>", "<|endoftext|>"),
                    show_progress=False)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (1, 1, 1)
    named = HFTokenizer(tmp_path / "qwen.json", eos_token="<|im_end|>", bos_token="<|endoftext|>")
    assert (named.eos_id, named.bos_id, named.pad_id) == (0, 1, 0) and named.fingerprint != tok.fingerprint
    with pytest.raises(ValueError, match=r"bos_token '<\|nope\|>' is not in the vocabulary of .*qwen.json"):
        HFTokenizer(tmp_path / "qwen.json", bos_token="<|nope|>")

    # Rename both specials to names no list knows: then only an explicit eos_token will do.
    text = (tmp_path / "qwen.json").read_text(encoding="utf-8")
    text = text.replace("<|im_end|>", "<|turn_end|>").replace("<|endoftext|>", "<|doc_end|>")
    (tmp_path / "no_eos.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_eos.json.*no end-of-sequence token.*eos_token="):
        HFTokenizer(tmp_path / "no_eos.json")
    tok = HFTokenizer(tmp_path / "no_eos.json", eos_token="<|doc_end|>")
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (300, 1, 1, 1)


# ---------------------------------------------------------------- loading and errors


def test_load_tokenizer(bpe: HFTokenizer, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    for spec in (bpe.path, str(bpe.path), bpe.path.parent, str(bpe.path.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and tok.fingerprint == bpe.fingerprint
    assert "HFTokenizer(" in repr(tok) and bpe.fingerprint in repr(tok)
    for spec in (tmp_path / "absent.json", tmp_path, "bytes"):
        with pytest.raises(FileNotFoundError, match=f"tokenizer {str(spec)!r} is neither 'byte'"):
            load_tokenizer(spec)


def test_tokenizer_from_fingerprint_searches(bpe: HFTokenizer, tmp_path: Path) -> None:
    assert isinstance(tokenizer_from_fingerprint(ByteTokenizer().fingerprint), ByteTokenizer)
    for search in ([tmp_path, bpe.path.parent], [bpe.path], str(bpe.path.parent)):
        tok = tokenizer_from_fingerprint(bpe.fingerprint, search)
        assert isinstance(tok, HFTokenizer) and tok.fingerprint == bpe.fingerprint
    with pytest.raises(ValueError, match="unknown tokenizer fingerprint") as e:
        tokenizer_from_fingerprint("0" * 16, [tmp_path, bpe.path.parent])
    assert str(tmp_path / "tokenizer.json") in str(e.value) and f"{bpe.path}={bpe.fingerprint}" in str(e.value)
    with pytest.raises(ValueError, match="unknown tokenizer fingerprint.*pass the directory"):
        tokenizer_from_fingerprint(bpe.fingerprint)


def test_bad_files_are_named(corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json"):
        HFTokenizer(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json.*not a valid tokenizer.json"):
        HFTokenizer(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([*corpus, str(tmp_path / "missing.txt")], 300, tmp_path / "t.json", show_progress=False)
    with pytest.raises(ValueError, match="no training files"):
        train_bpe([], 300, tmp_path / "t.json", show_progress=False)
    with pytest.raises(ValueError, match="vocab_size 258 is too small.*259"):
        train_bpe(corpus, 258, tmp_path / "t.json", show_progress=False)
    assert not (tmp_path / "t.json").exists()


def test_cli_errors_are_one_line(corpus: list[str], tmp_path: Path) -> None:
    glob = str(tmp_path / "nothing" / "*.txt")
    cases = [
        (["train", "--vocab-size", "300", "--out", str(tmp_path / "t"), glob], f"{glob!r} matches no files"),
        (["train", "--vocab-size", "100", "--out", str(tmp_path / "t"), *corpus], "vocab_size 100 is too small"),
        (["info", str(tmp_path / "absent")], str(tmp_path / "absent")),
    ]
    for args, message in cases:
        r = _cli(*args)
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
        assert message in errors[0]
    assert not (tmp_path / "t").exists()
