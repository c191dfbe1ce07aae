"""An offline W&B run read back without a network. W&B 0.31 ships no reader of its own, so this reads the record
format: ``run-<id>.wandb`` is a LevelDB-style log (32 KiB blocks of checksummed, possibly split chunks) of
``wandb_internal_pb2.Record`` protobufs, after a 7-byte header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER, CHUNK_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """Every Record of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = Path(path).read_bytes(), HEADER, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk, pos = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length], pos + CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (FIRST, MIDDLE):
            pending += chunk


def run_file(run_dir: str | Path) -> Path:
    """The one ``.wandb`` file of a run folder (``wandb/offline-run-*/run-*.wandb``)."""
    (found,) = Path(run_dir).glob("wandb/*run-*/run-*.wandb")
    return found


def history(path: str | Path) -> list[dict]:
    """The logged rows: ``{"_step": n, key: value, ...}``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path: str | Path):
    """The RunRecord (group, job type, tags, ...) of a run file."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
