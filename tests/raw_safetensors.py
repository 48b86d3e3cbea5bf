"""A safetensors file's raw parts, read and written byte by byte (not through capdec or the safetensors
library), to craft damaged weights for tests/test_hostile.py and benchmarks/hostile_table.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_raw(path: Path) -> tuple[dict, bytes]:
    """The JSON header and the tensor bytes that follow it."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def nan_first_weight(path: Path) -> None:
    """Set the first element of the first float32 tensor to NaN, in place."""
    header, body = read_raw(path)
    entry = next(v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    begin = entry["data_offsets"][0]
    write_raw(path, header, body[:begin] + struct.pack("<f", float("nan")) + body[begin + 4:])
