"""Ingestion: the datasets a path names (``mpo.ingest_sources``) into the normalised ``PROMPTS`` table.

Nothing is dropped silently: a row that cannot be used goes to the ``QUARANTINE`` table with its
file, line and a stable reason code, and is counted in the report. With ``strict=True`` the first
such row raises ``IngestError`` naming file, line and field.

Rows stream through in batches: each batch is read into questions and image references
(``mpo.prompt_rows``), its images not seen before are checked (``mpo.image_store``: each distinct
file once, in a process pool), and its prompts are written as one shard. So memory stays flat in
the row count; what grows is one 12-byte id per prompt, to find duplicates. The prompts folder is
published whole at the end: a killed ingest leaves the previous one in place, and a re-run writes
the same prompts again (their ids are content hashes) without storing any image twice.

``prompt_id`` is a content hash: the sha256 of each image's bytes, then the question, the gold
answer and the chosen response. Where an image comes from (a path, embedded bytes) does not enter
it, so the same data in another format gives the same ids, and sample stores keep resuming.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mpo.image_store import CheckedImage, ImageChecks, Key
from mpo.ingest_sources import (
    DatasetSource,
    IngestError,
    RowBatch,
    check_columns,
    read_batches,
    sources_from_path,
)
from mpo.io import atomic_path, atomic_write_text, publish_dir
from mpo.prompt_rows import ImageRef, Reject, ReplyAs, RowContent, read_row, resolve_columns
from mpo.results import IngestResult
from mpo.schemas import PROMPTS, QUARANTINE, shard_files, write_table
from mpo.templates import IMAGE_PLACEHOLDER

__all__ = ["IngestError", "ingest"]

BATCH_ROWS = 20_000


@dataclass
class _Tally:
    """What an ingest counted as it went: prompts per dataset, quarantined rows per reason, kinds."""

    prompts: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)


def ingest(
    path: Path,
    out: Path,
    strict: bool = False,
    seed: int = 0,
    *,
    columns: Mapping[str, str] | None = None,
    image_root: Path | None = None,
    reply_as: ReplyAs | None = None,
    workers: int | None = None,
    batch_rows: int = BATCH_ROWS,
    on_rows: Callable[[int], None] | None = None,
) -> IngestResult:
    """Read ``path`` (meta.json, a prompt file or a folder of them) and write ``out/prompts/``,
    ``out/quarantine.parquet``, ``out/report.json`` (the result returned), embedded images into
    ``out/images/`` and the image index ``out/image_index.parquet``. ``on_rows`` hears the running
    count of rows read."""
    started = time.perf_counter()
    sources = sources_from_path(Path(path), image_root, columns, reply_as)
    for source in sources:
        check_columns(source)  # a missing file or a wrong mapping fails before anything is written
    out = Path(out)
    tally = _Tally()
    with (
        _fewer_collections(),
        ImageChecks(out / "images", out / "image_index.parquet", workers or os.cpu_count() or 1) as checks,
        atomic_path(out / "quarantine.parquet") as quarantine_file,
        pq.ParquetWriter(quarantine_file, QUARANTINE, compression="zstd") as quarantine,
    ):
        run = _Run(checks, quarantine, tally, strict, seed, batch_rows, on_rows)
        publish_dir(out / "prompts", lambda folder: run.all(sources, folder))
        checks.save()
    count, version = _count_and_version(out / "prompts")
    result = IngestResult(
        stage=f"ingest:{Path(path).name}",
        out_dir=str(out / "prompts"),
        counts={"prompts": count},
        drops=dict(sorted(tally.quarantined.items())),
        seconds=time.perf_counter() - started,
        version=version,
        prompts_by_dataset=dict(tally.prompts),
        kinds=dict(tally.kinds),
    )
    atomic_write_text(out / "report.json", result.model_dump_json(indent=2) + "\n")
    return result


def _count_and_version(prompts_dir: Path) -> tuple[int, str]:
    """How many prompts the folder holds and their version (``mpo.sampling.keys_version``). Each key
    is held as its 12 id bytes and repeat index (as strings in a polars table, a million keys took
    200 MB more): bytes sort as the hex ids do, the id being of fixed length."""
    from mpo.sampling import keys_version

    keys: list[bytes] = []
    for shard in shard_files(prompts_dir):
        table = _read_shard(shard, ["prompt_id", "repeat_index"])
        ids, repeats = table.column("prompt_id").to_pylist(), table.column("repeat_index").to_pylist()
        keys.extend(bytes.fromhex(i) + f"/{r}".encode() for i, r in zip(ids, repeats, strict=True))
    keys.sort()
    return len(keys), keys_version(key[:12].hex() + key[12:].decode() for key in keys)


def _read_shard(shard: Path, columns: list[str] | None = None) -> pa.Table:
    """One of the shards this ingest wrote. ``ParquetFile.read``, not ``pq.read_table``: the dataset
    reader behind the latter kept ~70 MB more resident over a million rows' shards."""
    with pq.ParquetFile(shard) as parquet:
        return parquet.read(columns=columns, use_threads=False)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector 70x less often meanwhile: at its default (a pass per 700
    new objects) it took a third of ingest's time, re-walking the batch's rows, which are freed by
    reference counting anyway (they hold no cycles)."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@dataclass(slots=True)
class _Pending:
    """A row read into content whose images wait for their check: each a key into the checks, or
    the reason it has none (a path leaving the dataset root)."""

    line: int
    content: RowContent
    images: list[Key | Reject]


@dataclass
class _Batch:
    """A batch between its reading and its prompts: the rows waiting for image checks, the rows
    already quarantined."""

    rows: RowBatch
    pending: list[_Pending] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


class _Run:
    """One ingest's state across its datasets: checks, quarantine, tally, rows read."""

    def __init__(
        self,
        checks: ImageChecks,
        quarantine: pq.ParquetWriter,
        tally: _Tally,
        strict: bool,
        seed: int,
        batch_rows: int,
        on_rows: Callable[[int], None] | None,
    ) -> None:
        self.checks, self.quarantine, self.tally = checks, quarantine, tally
        self.strict, self.seed, self.batch_rows, self.on_rows = strict, seed, batch_rows, on_rows
        self.rows_read = 0

    def all(self, sources: list[DatasetSource], folder: Path) -> None:
        for number, source in enumerate(sources):
            self.dataset(source, folder, f"part-{number:03d}")
        self.checks.sync()

    def dataset(self, source: DatasetSource, folder: Path, prefix: str) -> None:
        """Write one dataset's prompts as shards ``prefix-NNNNN``, then apply its ``repeat_time``.

        A batch's prompts are made while the next batch is read: its images are checked in the
        pool meanwhile, so reading and checking share the cores."""
        reader = _Reader(source, self)
        seen: set[bytes] = set()
        shards: list[tuple[Path, int]] = []
        waiting: _Batch | None = None
        for rows in read_batches(source, self.batch_rows):
            batch = reader.read(rows)
            if waiting is not None:
                self.finish(source, waiting, seen, folder / f"{prefix}-{len(shards):05d}.parquet", shards)
            waiting = batch
        if waiting is not None:
            self.finish(source, waiting, seen, folder / f"{prefix}-{len(shards):05d}.parquet", shards)
        for shard, count in _apply_repeat(shards, source.repeat_time, self.seed):
            self.tally.prompts[source.name] += count
            self.tally.kinds.update(_read_shard(shard, ["kind"]).column("kind").to_pylist())

    def finish(
        self,
        source: DatasetSource,
        batch: _Batch,
        seen: set[bytes],
        shard: Path,
        shards: list[tuple[Path, int]],
    ) -> None:
        """Write a batch's prompts as one shard (appended to ``shards``) and its quarantined rows."""
        columns: dict[str, list[Any]] = {name: [] for name in PROMPTS.names}
        ids, kinds, paths, questions = (
            columns["prompt_id"],
            columns["kind"],
            columns["images"],
            columns["question"],
        )
        answers, chosen, lines = columns["answer"], columns["chosen"], columns["source_line"]
        for row in batch.pending:
            try:
                images = [
                    _checked(key, ref, self.checks)
                    for key, ref in zip(row.images, row.content.images, strict=True)
                ]
                prompt_id = _prompt_id(row.content, images)
                if prompt_id in seen:
                    raise Reject(
                        "duplicate_prompt", "line", f"same content as an earlier row ({prompt_id.hex()})"
                    )
            except Reject as reject:
                self.reject(source, batch, row.line, reject)
                continue
            seen.add(prompt_id)
            content = row.content
            ids.append(prompt_id.hex())
            kinds.append("closed" if content.answer is not None else "open")
            paths.append([image.path for image in images])
            questions.append(content.question)
            answers.append(content.answer)
            chosen.append(content.chosen)
            lines.append(row.line)
        count = len(ids)
        if count:
            columns.update(
                dataset=[source.name] * count,
                source_file=[str(batch.rows.file)] * count,
                repeat_index=[0] * count,
            )
            write_table(pa.table(columns, schema=PROMPTS), shard)
            shards.append((shard, count))
        batch.rejected.sort(key=lambda row: row["line"])
        self.quarantine.write_table(pa.Table.from_pylist(batch.rejected, schema=QUARANTINE))
        self.rows_read += len(batch.rows.values)
        if self.on_rows is not None:
            self.on_rows(self.rows_read)

    def reject(self, source: DatasetSource, batch: _Batch, line: int, reject: Reject) -> None:
        if self.strict:
            raise IngestError(
                f"{batch.rows.file}:{line}: field {reject.field_name!r}: {reject.reason}: {reject.detail}"
            )
        batch.rejected.append(
            {
                "dataset": source.name,
                "file": str(batch.rows.file),
                "line": line,
                "reason": reject.reason,
                "detail": reject.detail,
            }
        )
        self.tally.quarantined[reject.reason] += 1


class _Reader:
    """Reads one dataset's batches into content and image keys, and submits their images."""

    def __init__(self, source: DatasetSource, run: _Run) -> None:
        self.source, self.run = source, run
        self.root = os.path.realpath(source.root)
        self.paths: dict[str, str | Reject] = {}  # image name -> absolute path, or why not
        self.folders: dict[str, str] = {}  # folder -> its real path
        self.columns: dict[tuple[str, ...], dict[str, str]] = {}  # a JSON row's keys -> its mapping

    def read(self, rows: RowBatch) -> _Batch:
        batch = _Batch(rows)
        blobs: dict[bytes, bytes] = {}
        for line, value in zip(rows.lines, rows.values, strict=True):
            try:
                if isinstance(value, Reject):
                    raise value
                content = read_row(value, rows.columns or self.columns_of(value), self.source.reply_as)
                keys = [
                    self.blob(ref.data, blobs) if ref.data is not None else self.path(ref.name)
                    for ref in content.images
                ]
            except Reject as reject:
                self.run.reject(self.source, batch, line, reject)
                continue
            batch.pending.append(_Pending(line, content, keys))
        self.run.checks.submit(
            (key for row in batch.pending for key in row.images if isinstance(key, str)), blobs
        )
        return batch

    def columns_of(self, value: Any) -> dict[str, str]:
        """A JSON row's field -> column mapping, resolved once per distinct set of keys."""
        if not isinstance(value, dict):
            return dict(self.source.columns)
        keys = tuple(value)
        if keys not in self.columns:
            self.columns[keys] = resolve_columns(keys, self.source.columns)
        return self.columns[keys]

    @staticmethod
    def blob(data: bytes, blobs: dict[bytes, bytes]) -> bytes:
        digest = hashlib.sha256(data).digest()
        blobs.setdefault(digest, data)
        return digest

    def path(self, name: str) -> str | Reject:
        """The file an image name means: inside the dataset root, symlinks followed (as the file
        will be read), each folder resolved once however many images it holds."""
        if name not in self.paths:
            folder, base = os.path.split(os.path.normpath(os.path.join(self.root, name)))
            if folder not in self.folders:
                self.folders[folder] = os.path.realpath(folder)
            path = os.path.join(self.folders[folder], base)
            if os.path.islink(path):
                path = os.path.realpath(path)
            self.paths[name] = (
                path
                if path.startswith(self.root + os.sep)
                else Reject("image_outside_root", "image", f"{name!r} leaves the dataset root {self.root}")
            )
        return self.paths[name]


def _checked(key: Key | Reject, ref: ImageRef, checks: ImageChecks) -> CheckedImage:
    if isinstance(key, Reject):
        raise key
    checked = checks.get(key)
    name = ref.name or "embedded image"
    if checked.reason == "missing_image":
        raise Reject("missing_image", "image", f"{name!r} does not exist")
    if checked.reason:
        raise Reject(checked.reason, "image", f"{name!r}: {checked.detail}")
    return checked


def _prompt_id(content: RowContent, images: list[CheckedImage]) -> bytes:
    """The first 12 bytes of the content hash (``prompt_id`` is their hex)."""
    placeholders = content.question.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise Reject(
            "placeholder_mismatch", "question", f"{placeholders} <image> placeholders, {len(images)} images"
        )
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.digest)
    for part in (content.question, content.answer or "", content.chosen or ""):
        digest.update(b"\x00" + part.encode("utf-8"))
    return digest.digest()[:12]


def _apply_repeat(shards: list[tuple[Path, int]], repeat_time: float, seed: int) -> list[tuple[Path, int]]:
    """InternVL's rule, on a dataset's written shards: < 1 keeps a seeded draw of its rows (the same
    draw as over one list of them), > 1 repeats it int(repeat_time) times with ``repeat_index`` 0, 1, ..."""
    if repeat_time >= 1:
        copies = list(shards)
        for repeat in range(1, int(repeat_time)):
            for shard, rows in shards:
                table = _read_shard(shard)
                table = table.set_column(
                    table.schema.get_field_index("repeat_index"),
                    "repeat_index",
                    pa.array([repeat] * rows, pa.int64()),
                )
                copy = shard.with_name(f"{shard.stem}-r{repeat:03d}.parquet")
                write_table(table, copy)
                copies.append((copy, rows))
        return copies
    total = sum(rows for _, rows in shards)
    keep = sorted(random.Random(seed).sample(range(total), int(total * repeat_time)))
    kept, start = [], 0
    for shard, rows in shards:
        first, last = bisect.bisect_left(keep, start), bisect.bisect_left(keep, start + rows)
        positions = [i - start for i in keep[first:last]]
        start += rows
        if positions:
            write_table(_read_shard(shard).take(pa.array(positions)), shard)
            kept.append((shard, len(positions)))
        else:
            shard.unlink()
    return kept
