"""Read back what an offline W&B run stored, straight from its run-*.wandb file.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of LevelDB-log records (checksum, length, type) whose
payloads are wandb's own protobuf Records. wandb 0.31 ships the protobuf
classes but no reader, so the tests carry these few lines.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
FULL, LAST = 1, 4


def protobuf_records(path: Path):
    """Every protobuf Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _, _ = HEADER.unpack_from(data)
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = HEADER.size, b""
    while position + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        position += RECORD_HEADER.size
        if length == 0 and kind == 0:
            position += left_in_block - RECORD_HEADER.size
            continue
        pending += data[position:position + length]
        position += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    """The name of a history, summary or config item."""
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """The parts of an offline W&B run the tests look at."""

    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Parse the single run-*.wandb file in an offline-run-* directory."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for record in protobuf_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.group, run.name = record.run.run_group, record.run.display_name
            run.config.update({item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({item_key(i): json.loads(i.value_json) for i in record.summary.update})
    return run
