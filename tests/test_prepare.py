"""`python -m data.prepare`: real files in, real shards out; resumable, deterministic, loud on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data.dataset import open_source
from data.prepare import PrepareError, expand_inputs, plan_units, prepare, read_documents
from data.shards import ShardError, open_shard
from data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "東京", "🙂", "x", "", "line\nbreak", 'quote "q"']
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" #{i}" for i in range(n)]


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}, ensure_ascii=i % 2 == 0) + "\n")


def _all_docs(out: Path) -> Counter[str]:
    """Every document in the prepared dataset, decoded (a multiset)."""
    tok = ByteTokenizer()
    train, val = open_source(str(out))
    found: Counter[str] = Counter()
    for path in train + val:
        shard = open_shard(path, verify_checksum=True)
        for i in range(shard.num_docs):
            found[tok.decode(shard.document(i))] += 1
    return found


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Counter[str]]:
    src = tmp_path / "src"
    src.mkdir()
    texts = _docs(300)
    _write_jsonl(src / "a.jsonl", texts[:200])
    _write_jsonl(src / "b.jsonl", texts[200:250])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[250:290], "n": list(range(40))}), src / "c.parquet", row_group_size=7)
    for i, t in enumerate(texts[290:]):
        (src / f"d{i}.txt").write_text(t, encoding="utf-8")
    (src / "empty.txt").write_text("")
    return src, Counter(texts)


def test_byte_ranges_and_row_groups_cover_every_document_once(inputs: tuple[Path, Counter[str]]) -> None:
    src, expected = inputs
    files = expand_inputs([str(src / "*")])
    for unit_bytes in (1, 13, 256, 4096, 1 << 30):
        units = plan_units(files, unit_bytes)
        got = Counter(d for u in units for p in u["pieces"] for d in read_documents(p, "text") if d)
        assert got == expected, unit_bytes
        if unit_bytes == 13:
            assert len(units) > 100  # the jsonl files really were cut into many byte ranges


def test_prepare_writes_every_document_once_with_a_hash_split(
    inputs: tuple[Path, Counter[str]], tmp_path: Path
) -> None:
    src, expected = inputs
    out = tmp_path / "out"
    manifest = prepare(out, inputs=[str(src / "*")], val_fraction=0.2, workers=0, unit_mb=0.002, progress=False)
    assert _all_docs(out) == expected
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) == len(val["shards"]) > 3
    assert 0.1 < val["num_docs"] / (train["num_docs"] + val["num_docs"]) < 0.3
    assert manifest["dtype"] == "uint16" and manifest["run"]["empty_docs"] == 1
    shard = open_shard(open_source(str(out))[0][0])
    assert int(shard.tokens[-1]) == ByteTokenizer().eos_id
    # The split is a property of the text: the same document always lands on the same side.
    from data.prepare import is_validation

    val_docs = Counter()
    for path in open_source(str(out))[1]:
        s = open_shard(path)
        val_docs.update(ByteTokenizer().decode(s.document(i)) for i in range(s.num_docs))
    assert all(is_validation(t, 0.2) for t in val_docs)


def test_workers_give_the_same_bytes_as_inline(inputs: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    src, _ = inputs
    a = prepare(tmp_path / "a", inputs=[str(src / "*")], workers=0, unit_mb=0.004, progress=False)
    b = prepare(tmp_path / "b", inputs=[str(src / "*")], workers=2, unit_mb=0.004, progress=False)
    for split in ("train", "val"):
        assert a["splits"][split]["shards"] == b["splits"][split]["shards"]


def test_cli_progress_and_summary(inputs: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    src, _ = inputs
    res = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(src / "*.jsonl"), "--out",
                          str(tmp_path / "o"), "--workers", "1", "--unit-mb", "0.01"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tok/s" in res.stderr and "train tokens" in res.stderr and "MiB/s" in res.stderr


@pytest.mark.slow
def test_resume_after_sigkill_finishes_without_rewriting(tmp_path: Path) -> None:
    """Kill a real run mid-way; the rerun keeps every finished shard (same inode) and writes only the rest."""
    src = tmp_path / "src"
    src.mkdir()
    texts = _docs(12_000, seed=1)
    for k in range(6):
        _write_jsonl(src / f"part{k}.jsonl", texts[k * 2000 : (k + 1) * 2000])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data.prepare", "--input", str(src / "*.jsonl"), "--out", str(out),
           "--workers", "0", "--unit-mb", "0.02", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "train").glob("part-*"))) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_ino for p in (out / "train").glob("part-*")}
    assert finished and not (out / "dataset.json").exists(), "the run ended before it could be interrupted"
    with pytest.raises(ShardError, match="incomplete"):
        open_source(str(out))
    (out / "train" / ".part-99999999.tmp-x").mkdir()  # a crashed writer's leftover
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_ino for p in finished} == finished  # not rewritten
    assert not list((out / "train").glob(".part-*"))
    assert _all_docs(out) == Counter(texts)  # nothing lost, nothing duplicated
    clean = prepare(tmp_path / "clean", inputs=[str(src / "*.jsonl")], workers=0, unit_mb=0.02, progress=False)
    resumed = json.loads((out / "dataset.json").read_text())
    assert resumed["splits"] == {k: {kk: vv for kk, vv in v.items()} for k, v in clean["splits"].items()}


def test_rerun_with_other_settings_or_changed_input_is_refused(inputs: tuple[Path, Counter[str]],
                                                                tmp_path: Path) -> None:
    src, _ = inputs
    out = tmp_path / "out"
    prepare(out, inputs=[str(src / "*.jsonl")], workers=0, progress=False)
    with pytest.raises(PrepareError, match="'val_fraction' is 0.5 but the earlier run"):
        prepare(out, inputs=[str(src / "*.jsonl")], val_fraction=0.5, workers=0, progress=False)
    again = prepare(out, inputs=[str(src / "*.jsonl")], workers=0, progress=False)  # complete: nothing to do
    assert "run" not in again
    os.utime(src / "a.jsonl", ns=(1, 1))
    with pytest.raises(PrepareError, match="a.jsonl: input changed"):
        prepare(out, inputs=[str(src / "*.jsonl")], workers=0, progress=False)


def test_hf_datasets_streaming_source(inputs: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    """The `datasets` path, streamed, through its local json builder (no network)."""
    src, expected = inputs
    out = tmp_path / "hf"
    spec = {"path": "json", "data_files": [str(src / "a.jsonl"), str(src / "b.jsonl")], "split": "train"}
    manifest = prepare(out, hf_dataset=spec, workers=0, docs_per_unit=60, progress=False)
    local = Counter({t: c for t, c in expected.items() if any(t == x for x in _docs(300)[:250])})
    assert _all_docs(out) == local
    assert len(manifest["splits"]["train"]["shards"]) == 5  # 250 docs / 60 per unit
    again = prepare(out, hf_dataset=spec, workers=0, docs_per_unit=60, progress=False)
    assert again["splits"] == {k: v for k, v in manifest["splits"].items()}


@pytest.mark.parametrize("case", ["no_match", "bad_json", "no_field", "not_string", "parquet_column", "not_utf8",
                                  "empty", "val_fraction"])
def test_bad_input_names_the_culprit(case: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "ok.jsonl", ["fine"] * 3)
    pattern, kwargs, match = str(src / "*.jsonl"), {}, ""
    if case == "no_match":
        pattern, match = str(src / "*.nothing"), r"\*\.nothing' matches no files"
    elif case == "bad_json":
        (src / "z.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
        match = r"z\.jsonl:2: invalid JSON"
    elif case == "no_field":
        (src / "z.jsonl").write_text('{"text": "a"}\n\n{"body": "b", "id": 1}\n')
        match = r"z\.jsonl:3: no field 'text' \(fields: body, id\)"
    elif case == "not_string":
        (src / "z.jsonl").write_text('{"text": 5}\n')
        match = r"z\.jsonl:1: field 'text' is int"
    elif case == "parquet_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["a"]}), src / "z.parquet")
        pattern, match = str(src / "*.parquet"), r"z\.parquet: no column 'text' \(columns: content\)"
    elif case == "not_utf8":
        (src / "z.txt").write_bytes(b"caf\xe9")
        pattern, match = str(src / "*.txt"), r"z\.txt: not valid UTF-8"
    elif case == "empty":
        (src / "e1.txt").write_text("")
        pattern, match = str(src / "e*.txt"), "no non-empty documents"
    elif case == "val_fraction":
        kwargs, match = {"val_fraction": 1.0}, "--val-fraction must be in"
    with pytest.raises(PrepareError, match=match):
        prepare(tmp_path / "out", inputs=[pattern], workers=0, progress=False, **kwargs)
    res = subprocess.run([sys.executable, "-m", "data.prepare", "--input", pattern, "--out", str(tmp_path / "o2"),
                          "--workers", "0", "--quiet", *(["--val-fraction", "1.0"] if kwargs else [])],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_verify_finds_a_flipped_byte(inputs: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    from data.prepare import verify

    src, _ = inputs
    out = tmp_path / "out"
    prepare(out, inputs=[str(src / "*")], workers=0, progress=False)
    verify(out, progress=False)
    victim = open_source(str(out))[0][-1]
    tokens = Path(victim) / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tokens.write_bytes(bytes(raw))
    res = subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(out), "--verify", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and f"{tokens}: checksum mismatch" in res.stderr


@pytest.mark.slow
def test_bpe_dataset_trains_end_to_end(tmp_path: Path) -> None:
    """Train a BPE, prepare with it, and run the trainer on the result: the tokenizer is found by fingerprint."""
    import sysconfig

    from data.loader import build_loaders
    from data.tokenizer import HFTokenizer, train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in (stdlib / "json").glob("*.py")) + [str(stdlib / "textwrap.py")]
    tok = train_bpe(files, 300, str(tmp_path / "bpe.json"), show_progress=False)
    out = tmp_path / "ds"
    prepare(out, inputs=files, tokenizer=str(tmp_path / "bpe.json"), val_fraction=0.3, workers=0, progress=False)
    assert (out / "tokenizer.json").exists()
    loader, _, found = build_loaders({"source": str(out), "prefetch": 0}, 32, 4, seed=0)
    assert isinstance(found, HFTokenizer) and found.fingerprint == tok.fingerprint
    shard = open_shard(open_source(str(out))[0][0])
    assert found.decode(shard.document(0)) in {Path(f).read_text() for f in files}
    loader.close()
    res = subprocess.run([sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          f"data.source={out}", f"train.out_dir={tmp_path / 'run'}", "train.steps=3",
                          "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4",
                          "train.eval_interval=0", "logging.progress=false", "optim.warmup_steps=1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_valid_jsonl_never_pays_for_line_numbers(inputs: tuple[Path, Counter[str]], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Line numbers are for error messages only: counting them per line made prepare quadratic in file size."""
    import data.inputs as inputs_module

    def forbidden(path: str, offset: int) -> int:
        raise AssertionError("_line_number called on valid input")

    monkeypatch.setattr(inputs_module, "_line_number", forbidden)
    src, _ = inputs
    prepare(tmp_path / "out", inputs=[str(src / "*.jsonl")], workers=0, unit_mb=0.002, progress=False)
    # The patched function is the one an error message would use: invalid input does reach it.
    (tmp_path / "bad").mkdir()
    _write_jsonl(tmp_path / "bad" / "z.jsonl", ["fine"])
    with (tmp_path / "bad" / "z.jsonl").open("a") as f:
        f.write('{"text": "cut\n')
    with pytest.raises(AssertionError, match="_line_number called"):
        prepare(tmp_path / "out-bad", inputs=[str(tmp_path / "bad" / "*.jsonl")], workers=0, progress=False)


# ----------------------------------------------------------------------------------------------- HF on-disk forms


def _save_to_disk(tmp_path: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A `Dataset.save_to_disk` directory (2 Arrow files, several record batches each) and a DatasetDict one."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    single, dd = tmp_path / "saved", tmp_path / "saved_dict"
    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 16)  # rows per record batch written
    ds.save_to_disk(str(single), num_shards=2)
    datasets.DatasetDict({"train": ds.select(range(10)), "validation": ds}).save_to_disk(str(dd))
    return single, dd


def test_save_to_disk_directories_are_read_in_record_batch_units(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from data.hf_disk import arrow_batch_sizes, directory_files

    texts = _docs(200, seed=3)
    single, dd = _save_to_disk(tmp_path, texts, monkeypatch)
    files = directory_files(single)
    assert len(files) == 2 and all(len(arrow_batch_sizes(f)) > 1 for f in files)
    units = plan_units(expand_inputs([str(single)]), 2000)
    assert len(units) > 4 and {p["kind"] for u in units for p in u["pieces"]} == {"arrow"}
    out = tmp_path / "out"
    manifest = prepare(out, inputs=[str(single)], workers=0, unit_mb=2000 / 2**20, progress=False)
    assert _all_docs(out) == Counter(texts)
    assert len(manifest["splits"]["train"]["shards"]) == len(units)
    assert prepare(out, inputs=[str(single)], workers=0, unit_mb=2000 / 2**20, progress=False)["splits"] == \
        manifest["splits"]  # a rerun finds the plan unchanged and the dataset complete
    # A DatasetDict: the split is chosen (the CLI's --hf-split); --hf-dataset DIR reads the same files.
    from data.prepare import main

    assert main(["--input", str(dd), "--hf-split", "validation", "--out", str(tmp_path / "dd"), "--workers", "0",
                 "--quiet"]) == 0
    assert _all_docs(tmp_path / "dd") == Counter(texts)
    prepare(tmp_path / "hf", hf_dataset={"path": str(dd), "split": "train"}, workers=0, progress=False)
    assert _all_docs(tmp_path / "hf") == Counter(texts[:10])
    with pytest.raises(PrepareError, match=r"splits train, validation; no split 'test'"):
        prepare(tmp_path / "x", inputs=[str(dd)], split="test", workers=0, progress=False)
    # The rerun check covers the Arrow files: one rewritten underneath the plan is named.
    os.utime(files[1], ns=(1, 1))
    with pytest.raises(PrepareError, match=rf"{Path(files[1]).name}: input changed"):
        prepare(out, inputs=[str(single)], workers=0, unit_mb=2000 / 2**20, progress=False)


def test_arrow_and_parquet_directories(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _docs(120, seed=4)
    src = tmp_path / "mixed"
    (src / "sub").mkdir(parents=True)
    table = pa.table({"text": texts[:60], "n": list(range(60))})
    with pa.OSFile(str(src / "a.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:  # IPC file format
        for batch in table.to_batches(max_chunksize=9):
            w.write_batch(batch)
    with pa.OSFile(str(src / "sub" / "b.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(pa.table({"text": texts[60:90], "n": list(range(30))}), max_chunksize=4)
    pq.write_table(pa.table({"text": texts[90:]}), src / "sub" / "c.parquet", row_group_size=5)
    (src / "notes.txt").write_text("not data: only .arrow / .parquet files of a directory are read")
    prepare(tmp_path / "out", inputs=[str(src)], workers=0, unit_mb=600 / 2**20, progress=False)
    assert _all_docs(tmp_path / "out") == Counter(texts)
    # Hub-style split names: the chosen split's files only.
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:50]}), hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": texts[50:]}), hub / "test-00000-of-00001.parquet")
    assert expand_inputs([str(hub.parent)], "test") == [str(hub / "test-00000-of-00001.parquet")]


@pytest.mark.parametrize("case", ["corrupt", "truncated", "column", "empty_dir"])
def test_bad_arrow_input_names_the_file(case: str, tmp_path: Path) -> None:
    import pyarrow as pa

    src = tmp_path / "src"
    src.mkdir()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["a" * 100] * 50}), max_chunksize=5)
    data = sink.getvalue().to_pybytes()
    match = r"bad\.arrow: "
    if case == "corrupt":
        (src / "bad.arrow").write_bytes(b"\x00garbage" * 20)
    elif case == "truncated":
        (src / "bad.arrow").write_bytes(data[: len(data) // 2])
    elif case == "column":
        (src / "bad.arrow").write_bytes(data)
        match = r"bad\.arrow: no column 'body' \(columns: text\)"
    else:
        (src / "x.txt").write_text("hello")
        match = r"src: a directory with no \.arrow or \.parquet files"
    kwargs = {"text_field": "body"} if case == "column" else {}
    with pytest.raises(PrepareError, match=match):
        prepare(tmp_path / "out", inputs=[str(src)], workers=0, progress=False, **kwargs)
