"""Ingestion: InternVL ``meta.json`` + JSONL annotations (or plain JSONL/Parquet prompt
files) into the normalised ``PROMPTS`` table.

Nothing is dropped silently: a row that cannot be used goes to the ``QUARANTINE`` table
with its file, line and a stable reason code, and is counted in the report. With
``strict=True`` the first such row raises ``IngestError`` naming file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mpo.io import atomic_write_text
from mpo.schemas import PROMPTS, QUARANTINE, write_table
from mpo.templates import IMAGE_PLACEHOLDER


class IngestError(ValueError):
    """A bad input row, in strict mode: the message names file, line and field."""


@dataclass(frozen=True)
class DatasetSource:
    """One annotation file and where its images live (an entry of ``meta.json``)."""

    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0


@dataclass
class IngestReport:
    prompts: Counter[str] = field(default_factory=Counter)  # per dataset
    quarantined: Counter[str] = field(default_factory=Counter)  # per reason
    kinds: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": dict(self.prompts),
            "quarantined": dict(self.quarantined),
            "kinds": dict(self.kinds),
            "total_prompts": sum(self.prompts.values()),
            "total_quarantined": sum(self.quarantined.values()),
        }


class _Reject(Exception):
    def __init__(self, reason: str, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


def sources_from_path(path: Path) -> list[DatasetSource]:
    """``meta.json`` gives several datasets; a ``.jsonl``/``.parquet`` file is one dataset."""
    path = Path(path)
    if path.suffix in (".jsonl", ".parquet"):
        return [DatasetSource(path.stem, path, path.parent)]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"{path}: cannot read meta file: {error}") from error
    sources = []
    for name, entry in meta.items():
        for key in ("root", "annotation"):
            if key not in entry:
                raise IngestError(f"{path}: dataset {name!r}: missing field {key!r}")
        annotation = Path(entry["annotation"])
        if not annotation.is_absolute():
            annotation = path.parent / annotation
        sources.append(
            DatasetSource(name, annotation, Path(entry["root"]), float(entry.get("repeat_time", 1)))
        )
    return sources


def _raw_rows(source: DatasetSource) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row or a _Reject) for every row of the annotation file."""
    if source.annotation.suffix == ".parquet":
        yield from enumerate(pq.read_table(source.annotation).to_pylist(), 1)
        return
    with open(source.annotation, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, _Reject("non_utf8", "line", f"not UTF-8 at byte {error.start}")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                yield number, _Reject("malformed_json", "line", f"{error.msg} at column {error.colno}")


def _image_paths(row: dict[str, Any], root: Path) -> list[Path]:
    value = row.get("image")
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _Reject("bad_field_type", "image", "image must be a path or a list of paths")
    root = root.resolve()
    paths = []
    for name in names:
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise _Reject("image_outside_root", "image", f"{name!r} leaves the dataset root {root}")
        if not path.is_file():
            raise _Reject("missing_image", "image", f"{name!r} does not exist")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # pillow raises many types for broken files
            raise _Reject("corrupt_image", "image", f"{name!r}: {error}") from error
        paths.append(path)
    return paths


def _normalise(row: Any, source: DatasetSource, number: int) -> dict[str, Any]:
    if isinstance(row, _Reject):
        raise row
    if not isinstance(row, dict):
        raise _Reject("bad_field_type", "line", "a row must be a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _Reject("missing_field", "question", "no question")
    answer, chosen = row.get("answer"), row.get("chosen")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise _Reject("bad_field_type", "answer", "answer must be a string or number")
    if answer is None and not (isinstance(chosen, str) and chosen.strip()):
        raise _Reject("missing_field", "answer", "neither a gold answer nor a chosen response")
    images = _image_paths(row, source.root)
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise _Reject(
            "placeholder_mismatch", "question", f"{placeholders} <image> placeholders, {len(images)} images"
        )
    kind = "closed" if answer is not None else "open"
    answer_text = str(answer) if answer is not None else None
    digest = hashlib.sha256()
    for path in images:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for part in (question, answer_text or "", chosen if kind == "open" and chosen else ""):
        digest.update(b"\x00" + part.encode("utf-8"))
    return {
        "prompt_id": digest.hexdigest()[:24],
        "dataset": source.name,
        "kind": kind,
        "images": [str(p) for p in images],
        "question": question,
        "answer": answer_text,
        "chosen": chosen if kind == "open" else None,
        "source_file": str(source.annotation),
        "source_line": number,
    }


def _apply_repeat(rows: list[dict[str, Any]], repeat_time: float, seed: int) -> list[dict[str, Any]]:
    """InternVL's rule: < 1 subsamples (deterministically), > 1 repeats int(repeat_time) times."""
    if repeat_time < 1:
        keep = sorted(random.Random(seed).sample(range(len(rows)), int(len(rows) * repeat_time)))
        return [dict(rows[i], repeat_index=0) for i in keep]
    return [dict(row, repeat_index=r) for r in range(int(repeat_time)) for row in rows]


def ingest(path: Path, out: Path, strict: bool = False, seed: int = 0) -> IngestReport:
    """Read ``path`` (meta.json, .jsonl or .parquet) and write ``out/prompts``,
    ``out/quarantine.parquet`` and ``out/report.json``; return the report."""
    report = IngestReport()
    prompts: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    for source in sources_from_path(Path(path)):
        if not source.annotation.is_file():
            raise IngestError(
                f"{source.annotation}: annotation file of dataset {source.name!r} does not exist"
            )
        rows, seen = [], set()
        for number, raw in _raw_rows(source):
            try:
                row = _normalise(raw, source, number)
                if row["prompt_id"] in seen:
                    raise _Reject(
                        "duplicate_prompt", "line", f"same content as an earlier row ({row['prompt_id']})"
                    )
                seen.add(row["prompt_id"])
                rows.append(row)
            except _Reject as reject:
                if strict:
                    raise IngestError(
                        f"{source.annotation}:{number}: field {reject.field_name!r}: "
                        f"{reject.reason}: {reject.detail}"
                    ) from None
                quarantine.append(
                    {
                        "dataset": source.name,
                        "file": str(source.annotation),
                        "line": number,
                        "reason": reject.reason,
                        "detail": reject.detail,
                    }
                )
                report.quarantined[reject.reason] += 1
        for row in _apply_repeat(rows, source.repeat_time, seed):
            prompts.append(row)
            report.prompts[source.name] += 1
            report.kinds[row["kind"]] += 1
    out = Path(out)
    write_table(pa.Table.from_pylist(prompts, schema=PROMPTS), out / "prompts" / "part-00000.parquet")
    write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE), out / "quarantine.parquet")
    atomic_write_text(out / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
    return report
