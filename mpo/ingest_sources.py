"""Where prompts come from: which datasets a path names, and their rows, a batch at a time.

A path is one of:

- InternVL's ``meta.json``: ``{"name": {"annotation", "root", "repeat_time", "columns", "reply_as"}}``,
  several datasets;
- one prompt file: ``.jsonl``, ``.json`` (an array of rows) or ``.parquet``;
- a folder of prompt files, as Hugging Face datasets ship them (``data/train-00000-of-00004.parquet``).

Rows are read in batches (a Parquet file by record batches, only the columns in use), so memory
stays flat however long the file is; a JSON array is the exception, loaded whole, so large data
belongs in JSONL or Parquet. Each row keeps its file and line (row number for Parquet and JSON
arrays) for the quarantine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mpo.errors import InputError, unreadable
from mpo.prompt_rows import (
    DEFAULT_COLUMNS,
    Reject,
    ReplyAs,
    check_mapping,
    missing_mapped,
    resolve_columns,
)

PROMPT_FILES = (".jsonl", ".json", ".parquet")


class IngestError(InputError):
    """Bad input ingest cannot quarantine, or a bad row in strict mode: names file, line and field."""


@dataclass(frozen=True)
class DatasetSource:
    """One dataset: its prompt file (or folder of them), where its image paths start, and how its
    columns are named."""

    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0
    columns: Mapping[str, str] = field(default_factory=dict)
    reply_as: ReplyAs = "chosen"

    def files(self) -> list[Path]:
        if not self.annotation.exists():
            raise IngestError(f"{self.annotation}: annotation of dataset {self.name!r} does not exist")
        if self.annotation.is_file():
            return [self.annotation]
        files = sorted(p for p in self.annotation.rglob("*") if p.suffix in PROMPT_FILES and p.is_file())
        if not files:
            raise IngestError(
                f"{self.annotation}: dataset {self.name!r}: no {', '.join(PROMPT_FILES)} files in the folder"
            )
        return files


@dataclass
class RowBatch:
    """Rows of one file: their line numbers, parsed values (or a ``Reject``), and for Parquet the
    field -> column mapping its schema resolved (JSON rows resolve theirs row by row)."""

    file: Path
    lines: list[int]
    values: list[Any]
    columns: dict[str, str] | None = None


def sources_from_path(
    path: Path,
    image_root: Path | None = None,
    columns: Mapping[str, str] | None = None,
    reply_as: ReplyAs | None = None,
) -> list[DatasetSource]:
    """The datasets ``path`` names; ``image_root``, ``columns`` and ``reply_as`` (the command line's)
    apply to every one of them, over what a ``meta.json`` entry says."""
    path = Path(path)
    overrides: dict[str, Any] = {}
    if reply_as is not None:
        overrides["reply_as"] = reply_as
    if image_root is not None:
        overrides["root"] = Path(image_root)
    if path.is_dir() or path.suffix in (".jsonl", ".parquet") or (path.suffix == ".json" and _is_array(path)):
        entry = {"annotation": str(path), "root": str(path if path.is_dir() else path.parent)}
        sources = [_source(path.name if path.is_dir() else path.stem, entry, path.parent, path)]
    else:
        sources = [_source(name, entry, path.parent, path) for name, entry in _meta(path).items()]
    sources = [
        replace(source, columns={**source.columns, **(columns or {})}, **overrides) for source in sources
    ]
    for source in sources:
        check_mapping(source.columns, source.name)
    return sources


def _is_array(path: Path) -> bool:
    """A ``.json`` file holding rows (an array) rather than a ``meta.json`` (an object)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
    except OSError as error:
        raise IngestError(f"{path}: cannot read: {error.strerror}") from None
    return head.startswith(b"[")


def _meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"{path}: cannot read meta file: {error}") from None
    if not isinstance(meta, dict) or not all(isinstance(entry, dict) for entry in meta.values()):
        raise IngestError(f"{path}: a meta file maps dataset names to entries with an 'annotation'")
    return meta


def _source(name: str, entry: dict[str, Any], base: Path, meta: Path) -> DatasetSource:
    if "annotation" not in entry:
        raise IngestError(f"{meta}: dataset {name!r}: missing field 'annotation'")
    annotation = Path(entry["annotation"])
    annotation = annotation if annotation.is_absolute() else base / annotation
    columns = entry.get("columns", {})
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise IngestError(f"{meta}: dataset {name!r}: 'columns' maps fields to column names")
    reply_as = entry.get("reply_as", "chosen")
    if reply_as not in ("chosen", "answer"):
        raise IngestError(f"{meta}: dataset {name!r}: reply_as is 'chosen' or 'answer', not {reply_as!r}")
    root = Path(entry.get("root", annotation if annotation.is_dir() else annotation.parent))
    return DatasetSource(name, annotation, root, float(entry.get("repeat_time", 1)), columns, reply_as)


def check_columns(source: DatasetSource) -> None:
    """Fail before anything is written when a file lacks a mapped column (Parquet: its schema; JSON:
    its first row) or a Parquet file has no question column at all."""
    for file in source.files():
        if file.suffix == ".parquet":
            names = _parquet(file).schema_arrow.names
            missing_mapped(names, source.columns, source.name, str(file))
            columns = resolve_columns(names, source.columns)
            if "question" not in columns and "conversations" not in columns:
                looked = ", ".join(DEFAULT_COLUMNS["question"] + DEFAULT_COLUMNS["conversations"])
                raise IngestError(
                    f"{file}: dataset {source.name!r} has no question column (looked for {looked}); its "
                    f"columns: {', '.join(names)}; name one with a column mapping"
                )
            continue
        rows = _json_array_rows(file) if file.suffix == ".json" else _jsonl_rows(file)
        first = next((value for _, value in rows if isinstance(value, dict)), None)
        if first is not None:
            missing_mapped(first.keys(), source.columns, source.name, f"the first row of {file}")


def read_batches(source: DatasetSource, batch_rows: int) -> Iterator[RowBatch]:
    """Every row of every file of ``source``, ``batch_rows`` at a time."""
    for file in source.files():
        if file.suffix == ".parquet":
            yield from _parquet_batches(file, source, batch_rows)
            continue
        rows = _json_array_rows(file) if file.suffix == ".json" else _jsonl_rows(file)
        while chunk := list(islice(rows, batch_rows)):
            yield RowBatch(file, [line for line, _ in chunk], [value for _, value in chunk])


def _jsonl_rows(file: Path) -> Iterator[tuple[int, Any]]:
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, Reject("non_utf8", "line", f"not UTF-8 at byte {error.start}")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                yield number, Reject("malformed_json", "line", f"{error.msg} at column {error.colno}")


def _json_array_rows(file: Path) -> Iterator[tuple[int, Any]]:
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"{file}: not a JSON array of rows: {error}") from None
    if not isinstance(rows, list):
        raise IngestError(f"{file}: not a JSON array of rows")
    yield from enumerate(rows, 1)


def _parquet(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as error:
        raise unreadable(file, "Parquet file", error, IngestError) from None


def _parquet_batches(file: Path, source: DatasetSource, batch_rows: int) -> Iterator[RowBatch]:
    """Record batches of the columns in use only (an image column may be most of the file)."""
    parquet = _parquet(file)
    columns = resolve_columns(parquet.schema_arrow.names, source.columns)
    start = 1
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=sorted(set(columns.values()))):
        values = batch.to_pylist()
        yield RowBatch(file, list(range(start, start + len(values))), values, columns)
        start += len(values)
