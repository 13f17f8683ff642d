"""Which weights a stored result came from, told cheaply.

Sample stores, reference log-probs, training folders and Prefect cache keys all say
which model made them. A path alone is not enough: the demo (or a user) can rewrite a
model in place, and results of the old weights would then be reused for the new ones.
Hashing whole weight files is too slow for real models (16 GB for 8B parameters), so
the fingerprint reads the config and, for every tensor of a safetensors file, its
header entry and three small windows of its values (start, middle, end): training that
touches a tensor changes them, a copy of the folder does not. Other weight formats fall
back to 16 evenly spread windows of the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

WINDOW_BYTES = 64
FILE_WINDOWS = 16
FILE_WINDOW_BYTES = 1 << 16
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def model_fingerprint(model: str | Path) -> str:
    """16 hex digits naming the weights of a local model folder; a hub id is taken as it is
    (pin a revision in it for fixed weights)."""
    root = Path(model)
    if not root.is_dir():
        return hashlib.sha256(f"hub:{model}".encode()).hexdigest()[:16]
    digest = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for path in sorted(p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as handle:
            if path.suffix == ".safetensors":
                _tensor_windows(handle, digest)
            else:
                _file_windows(handle, path.stat().st_size, digest)
    return digest.hexdigest()[:16]


def _tensor_windows(handle: BinaryIO, digest: Any) -> None:
    (header_size,) = struct.unpack("<Q", handle.read(8))
    header = handle.read(header_size)
    digest.update(header)  # names, dtypes, shapes, offsets
    for name, entry in sorted(json.loads(header).items()):
        if name == "__metadata__":
            continue
        start, end = (8 + header_size + offset for offset in entry["data_offsets"])
        for at in (start, (start + end) // 2, end - WINDOW_BYTES):
            handle.seek(max(start, at))
            digest.update(handle.read(min(WINDOW_BYTES, end - start)))


def _file_windows(handle: BinaryIO, size: int, digest: Any) -> None:
    for index in range(FILE_WINDOWS):
        handle.seek(max(0, size - FILE_WINDOW_BYTES) * index // (FILE_WINDOWS - 1))
        digest.update(handle.read(FILE_WINDOW_BYTES))
