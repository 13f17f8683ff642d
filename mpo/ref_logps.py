"""Reference log-probs as their own step: one pass of the frozen reference writes them into the pairs.

``mpo ref-logps --pairs DIR --model DIR`` adds ``ref_chosen_logp`` and
``ref_rejected_logp`` (float64, sums over response tokens) to every shard of the pairs
table, so training holds only the policy in memory. Each shard is rewritten atomically
with the spec it was computed under (reference model and its weight fingerprint,
max_length, precision) in its Parquet metadata; a re-run skips shards whose spec
matches, so a killed run resumes. The trainer refuses a spec that does not match its
own model and precision. The forward is the training forward: float32 weights, under
bf16 autocast where training uses it (``mpo.logps.precision``). A pair
whose prompt does not fit ``max_length`` gets nulls there (the trainer skips and counts
such pairs the same way).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mpo.logps import PairLogps, autocast, load_vlm, precision, split_pairs
from mpo.model_identity import model_fingerprint
from mpo.pair_data import REF_COLUMNS, PairTable, encode_batch, pairs_data_dir
from mpo.schemas import shard_files, write_table

SPEC_KEY = b"mpo.ref_logps"


def reference_spec(model_dir: Path | str, max_length: int, numerics: dict[str, str | None]) -> dict[str, Any]:
    return {
        "model": str(Path(model_dir).resolve()),
        "fingerprint": model_fingerprint(model_dir),
        "max_length": max_length,
        "precision": numerics,
    }


def shard_spec(path: Path) -> dict[str, Any] | None:
    """The reference spec a shard's log-probs were computed under, or None."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(SPEC_KEY)
    return json.loads(raw) if raw else None


@dataclass
class RefLogpsReport:
    shards: int = 0
    skipped_shards: int = 0
    pairs: int = 0
    too_long: int = 0
    spec: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def pair_logps(
    forward: PairLogps,
    processor: Any,
    pairs: PairTable,
    max_length: int,
    batch_size: int,
    device: torch.device,
    numerics: dict[str, str | None],
) -> tuple[torch.Tensor, int]:
    """(len(pairs), 2) chosen/rejected log-prob sums (NaN for pairs too long), and how many were too long."""
    out = torch.full((len(pairs), 2), float("nan"), dtype=torch.float64)
    dtype = next(forward.parameters()).dtype
    too_long = 0
    for start in range(0, len(pairs), batch_size):
        batch, skipped = encode_batch(
            pairs, processor, list(range(start, min(start + batch_size, len(pairs)))), max_length
        )
        too_long += skipped
        if batch is None:
            continue
        with autocast(numerics):
            chosen, rejected = split_pairs(forward.batch_logps(batch.to(device, dtype)))
        out[batch.rows, 0] = chosen.double().cpu()
        out[batch.rows, 1] = rejected.double().cpu()
    return out, too_long


def compute_reference_logps(
    pairs_dir: Path | str,
    model_dir: Path | str,
    max_length: int = 2048,
    batch_size: int = 8,
    device: str | None = None,
    vision_pass: str = "shared",
    on_shard: Callable[[Path, int], None] | None = None,
    bf16: bool | None = None,
) -> RefLogpsReport:
    """Write reference log-probs into every shard of ``pairs_dir``; skip shards already done.
    ``bf16`` must be the trainer's (``TrainConfig.bf16``; default: on with CUDA)."""
    data = pairs_data_dir(pairs_dir)
    files = shard_files(data)
    if not files:
        raise FileNotFoundError(f"{data}: no pairs shards")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    numerics = precision(torch_device, bf16)
    spec = reference_spec(model_dir, max_length, numerics)
    report = RefLogpsReport(spec=spec)
    pending = [f for f in files if shard_spec(f) != spec]
    report.skipped_shards = len(files) - len(pending)
    if not pending:
        return report
    model, processor = load_vlm(model_dir, torch_device, dtype=torch.float32)
    forward = PairLogps(model.eval(), vision_pass)
    for path in pending:
        table = pq.read_table(path)
        pairs = PairTable(table.drop_columns([c for c in REF_COLUMNS if c in table.column_names]), str(path))
        logps, too_long = pair_logps(
            forward, processor, pairs, max_length, batch_size, torch_device, numerics
        )
        values = logps.numpy()
        out = pairs.table
        for index, name in enumerate(REF_COLUMNS):
            column = pa.array(values[:, index], type=pa.float64(), mask=torch.isnan(logps[:, index]).numpy())
            out = out.append_column(name, column)
        metadata = dict(out.schema.metadata or {})
        metadata[SPEC_KEY] = json.dumps(spec, sort_keys=True).encode()
        write_table(out.replace_schema_metadata(metadata), path)
        report.shards += 1
        report.pairs += len(pairs)
        report.too_long += too_long
        if on_shard:
            on_shard(path, len(pairs))
    return report


def reference_specs(pairs_dir: Path | str) -> list[dict[str, Any] | None]:
    """The spec of every shard (None where no reference log-probs were written)."""
    return [shard_spec(f) for f in shard_files(pairs_data_dir(pairs_dir))]
