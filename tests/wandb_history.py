"""Read the history rows back out of an offline wandb run file (`run-<id>.wandb`), without network.

The file is wandb's append-only transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then
LevelDB-style log blocks of 32 KiB holding protobuf `Record`s, each fragment prefixed by (crc32, length,
type). Tests use it to check that what wandb would upload equals the JSONL.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a wandb transaction log")
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # the tail of a block too small for a header is padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            break
        payload = data[pos + _HEADER:pos + _HEADER + length]
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            out.append(pending + payload)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    """Every logged row, as {key: value} with the `_step` wandb assigned."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path: Path) -> dict:
    """The run record: project, name, tags and the uploaded config (top-level keys -> values)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in rec.run.config.update}
            return {"project": rec.run.project, "name": rec.run.display_name, "tags": list(rec.run.tags),
                    "config": config}
    raise ValueError(f"{path}: no run record")
