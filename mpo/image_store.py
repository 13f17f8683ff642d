"""The images an ingest meets, each checked once: files verified and hashed, embedded bytes stored.

A prompt's identity includes the sha256 of its images' bytes, and a prompt names its images by
path. Datasets ask many questions of one image (ten per image is common), so checking per row
reads, decodes and hashes the same file again and again; here each distinct file is checked once
per ingest, in a process pool when there are many, and the result is kept in an index beside the
prompts (keyed by path, size and modification time) so that a re-ingest reads only what changed.

Embedded images (the ``{bytes, path}`` structs of Hugging Face Parquet) are written once into a
content-addressed store, ``images/<2 hex>/<sha256>.<ext>``: the samples, pairs and exports keep
plain paths, and identical images are stored once however many rows carry them.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from mpo.io import atomic_write, atomic_write_bytes, sync_filesystem

# Below this many unchecked images a batch is checked in this process: a pool costs its start.
POOL_MIN_IMAGES = 64
FILES_PER_TASK, BLOBS_PER_TASK = 256, 64  # one task's images: enough to pay for its round trip

if TYPE_CHECKING:
    import pyarrow as pa


def index_schema() -> pa.Schema:
    """The index's columns (pyarrow is imported here, not at the top: pool workers import this
    module and need only pillow)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),  # the file's absolute path, or sha256:<hex> of embedded bytes
            ("size", pa.int64()),  # of the file (the stored file for embedded bytes)
            ("mtime_ns", pa.int64()),
            ("path", pa.string()),  # the file a prompt names
            ("digest", pa.binary()),  # sha256 of the bytes; empty when rejected
            ("reason", pa.string()),  # missing_image | corrupt_image; empty when fine
            ("detail", pa.string()),
        ]
    )


@dataclass(frozen=True)
class CheckedImage:
    """One image's verdict: the file a prompt names and its bytes' sha256, or why it is unusable."""

    path: str
    digest: bytes
    reason: str = ""  # missing_image | corrupt_image; empty when the image is fine
    detail: str = ""
    size: int = -1
    mtime_ns: int = -1


Key = str | bytes  # an image file's absolute path, or the sha256 of embedded bytes


def check_files(paths: list[str]) -> list[CheckedImage]:
    """Stat, read, verify and hash image files (a pool worker's chunk)."""
    return [check_file(path) for path in paths]


def check_file(path: str) -> CheckedImage:
    try:
        stat = os.stat(path)
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return CheckedImage(path, b"", "missing_image", error.strerror or "cannot be read")
    problem, _ = _verify(data)
    digest = b"" if problem else hashlib.sha256(data).digest()
    return CheckedImage(
        path, digest, "corrupt_image" if problem else "", problem, stat.st_size, stat.st_mtime_ns
    )


def store_blobs(blobs: list[tuple[bytes, bytes]], store: str) -> list[CheckedImage]:
    """Verify embedded images (sha256, bytes) and write each into the store under its hash unless
    there (a pool worker's chunk)."""
    return [store_blob(data, digest, store) for digest, data in blobs]


def store_blob(data: bytes, digest: bytes, store: str) -> CheckedImage:
    problem, kind = _verify(data)
    if problem:
        return CheckedImage("", b"", "corrupt_image", problem)
    hex_digest = digest.hex()
    path = os.path.join(store, hex_digest[:2], f"{hex_digest}.{EXTENSIONS.get(kind, kind.lower())}")
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        stat = None
    if stat is None or stat.st_size != len(data):  # a short file: a crash before the store was synced
        atomic_write_bytes(path, data, sync=False)  # ImageChecks.sync flushes the store once
        stat = os.stat(path)
    return CheckedImage(path, digest, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif", "": "img"}


def _verify(data: bytes) -> tuple[str, str]:
    """(empty, pillow's format name) when pillow reads ``data`` as an image, else (why not, "")."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.verify()
    except Exception as error:  # pillow raises many types for broken files
        return str(error) or type(error).__name__, ""
    return "", kind


class ImageChecks:
    """The verdicts of one ingest's images, filled a batch at a time and saved as an index.

    ``submit(paths, blobs)`` starts checking what a batch names that is new (in ``workers``
    processes when there is much of it) and returns at once, so the next batch is read while the
    workers check this one; ``get(key)`` answers for any submitted image, waiting if it must.
    """

    def __init__(self, store: Path, index_file: Path, workers: int) -> None:
        self.store, self.index_file, self.workers = store, index_file, max(1, workers)
        self._known: dict[Key, CheckedImage] = {}
        self._pending: dict[Key, Future[list[CheckedImage]]] = {}
        self._chunks: dict[Future[list[CheckedImage]], list[Key]] = {}
        self._previous = _read_index(index_file)
        self._pool: Executor | None = None

    def __enter__(self) -> ImageChecks:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def get(self, key: Key) -> CheckedImage:
        if key not in self._known:
            self._collect(self._pending[key])
        return self._known[key]

    def submit(self, paths: Iterable[str], blobs: dict[bytes, bytes]) -> None:
        """Check the files in ``paths`` and the embedded images in ``blobs`` (sha256 -> bytes) not
        checked before: an unchanged file or stored blob from the previous ingest is reused."""
        files = [path for path in set(paths) if self._is_new(path)]
        fresh = [(digest, data) for digest, data in blobs.items() if self._is_new(digest)]
        if len(files) + len(fresh) < POOL_MIN_IMAGES or self.workers == 1:
            self._known.update(zip(files, check_files(files), strict=True))
            self._known.update(zip((d for d, _ in fresh), store_blobs(fresh, str(self.store)), strict=True))
            return
        pool = self._start_pool()
        for start in range(0, len(files), FILES_PER_TASK):
            chunk = files[start : start + FILES_PER_TASK]
            self._track(pool.submit(check_files, chunk), list(chunk))
        for start in range(0, len(fresh), BLOBS_PER_TASK):
            items = fresh[start : start + BLOBS_PER_TASK]
            self._track(pool.submit(store_blobs, items, str(self.store)), [digest for digest, _ in items])

    def sync(self) -> None:
        """Finish every check and flush the stored images to disk, before any prompt naming them is
        published."""
        for future in list(self._chunks):
            self._collect(future)
        if self.store.exists():
            sync_filesystem(self.store)

    def _is_new(self, key: Key) -> bool:
        return key not in self._known and key not in self._pending and not self._reuse(key)

    def _track(self, future: Future[list[CheckedImage]], keys: list[Key]) -> None:
        self._chunks[future] = keys
        for key in keys:
            self._pending[key] = future

    def _collect(self, future: Future[list[CheckedImage]]) -> None:
        keys = self._chunks.pop(future)
        self._known.update(zip(keys, future.result(), strict=True))
        for key in keys:
            del self._pending[key]

    def _reuse(self, key: Key) -> bool:
        """Take the previous ingest's verdict when its file is unchanged (same size and mtime)."""
        before = self._previous.get(key)
        if before is None:
            return False
        try:
            stat = os.stat(before.path)
        except OSError:
            return False
        if (stat.st_size, stat.st_mtime_ns) != (before.size, before.mtime_ns):
            return False
        self._known[key] = before
        return True

    def _start_pool(self) -> Executor:
        if self._pool is None:
            # spawn, not fork: the parent holds polars' and pyarrow's threads, which fork may deadlock
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool

    def save(self) -> None:
        """Write the index of every image checked (files that could be stat'ed, stored blobs)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {
                "key": key if isinstance(key, str) else f"sha256:{key.hex()}",
                "size": checked.size,
                "mtime_ns": checked.mtime_ns,
                "path": checked.path,
                "digest": checked.digest,
                "reason": checked.reason,
                "detail": checked.detail,
            }
            for key, checked in self._known.items()
            if checked.size >= 0
        ]
        table = pa.Table.from_pylist(rows, schema=index_schema())
        atomic_write(self.index_file, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _read_index(index_file: Path) -> dict[Key, CheckedImage]:
    """The previous ingest's verdicts; an unreadable index is no index (it only saves time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(index_file, schema=index_schema()).to_pylist()
    except (OSError, pa.ArrowException):
        return {}
    return {
        (bytes.fromhex(row["key"][7:]) if row["key"].startswith("sha256:") else row["key"]): CheckedImage(
            row["path"], row["digest"], row["reason"], row["detail"], row["size"], row["mtime_ns"]
        )
        for row in rows
    }
