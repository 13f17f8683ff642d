"""Export a pairs directory in the format InternVL's MPO trainer reads.

One JSONL per dataset with ``image`` (a path relative to ``root``, or a list for several
images), ``question``, ``chosen`` and ``rejected``, plus a ``meta.json`` naming them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from mpo.io import atomic_write_text
from mpo.schemas import PAIRS, read_dir

FORMATS = ("internvl",)


def export_internvl(pairs_dir: Path | str, out: Path | str, max_dynamic_patch: int = 6) -> dict[str, int]:
    """Write ``out/<dataset>.jsonl`` and ``out/meta.json``; return rows per dataset."""
    pairs = pl.from_arrow(read_dir(Path(pairs_dir) / "data", PAIRS))
    assert isinstance(pairs, pl.DataFrame)
    out = Path(out)
    meta: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for (dataset,), frame in pairs.sort("pair_id").group_by("dataset", maintain_order=True):
        images = [p for row in frame["images"].to_list() for p in (row or [])]
        root = os.path.commonpath([os.path.dirname(p) for p in images]) if images else str(out)
        lines = []
        for row in frame.iter_rows(named=True):
            paths = [os.path.relpath(p, root) for p in row["images"] or []]
            record: dict[str, Any] = {
                "question": row["prompt"],
                "chosen": row["chosen"],
                "rejected": row["rejected"],
            }
            if paths:
                record = {"image": paths[0] if len(paths) == 1 else paths, **record}
            lines.append(json.dumps(record, ensure_ascii=False))
        annotation = out / f"{dataset}.jsonl"
        atomic_write_text(annotation, "".join(line + "\n" for line in lines))
        meta[str(dataset)] = {
            "root": root,
            "annotation": str(annotation.resolve()),
            "data_augment": False,
            "max_dynamic_patch": max_dynamic_patch,
            "repeat_time": 1,
            "length": len(lines),
        }
        counts[str(dataset)] = len(lines)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return counts
