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

With a ``store`` (the data engine keeps one per run folder), the values are also kept by pair
and reference: a key per pair (its id, prompt and images) in a folder per reference spec
(weights, max_length, precision), so a pairs version written again (a re-run, a refresh that
adds prompts) has only its new pairs computed. ``partition`` (index, count) takes every
count-th shard, so the shards of one pairs version spread over several GPU workers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mpo.logps import PairLogps, autocast, load_vlm, precision, split_pairs
from mpo.model_identity import model_fingerprint
from mpo.pair_data import REF_COLUMNS, PairTable, encode_batch, pairs_data_dir
from mpo.results import ReferenceResult
from mpo.schemas import shard_files, write_table
from mpo.text_stats import content_hash, hex64

SPEC_KEY = b"mpo.ref_logps"
STORE_SCHEMA = pa.schema(
    [("ref_key", pa.string()), ("ref_chosen_logp", pa.float64()), ("ref_rejected_logp", pa.float64())]
)


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


def store_folder(store: Path | str, spec: dict[str, Any]) -> Path:
    """The store's folder for one reference: its weights, max_length and precision (not its path:
    a copied model reuses the values)."""
    identity = {key: value for key, value in spec.items() if key != "model"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(store) / f"ref-{digest}"


def reference_keys(table: pa.Table) -> pl.Series:
    """What a reference log-prob depends on besides the reference: the pair (its id hashes the
    prompt id, chosen and rejected) and the prompt as the model sees it, with its images."""
    frame = pl.from_arrow(table.select(["pair_id", "prompt", "images"]))
    assert isinstance(frame, pl.DataFrame)
    text = frame["pair_id"] + "\x00" + frame["prompt"] + "\x00" + frame["images"].list.join("\x01")
    return hex64(content_hash(text)).alias("ref_key")


def _stored(folder: Path, keys: pl.Series) -> pl.DataFrame:
    """The stored values of ``keys`` (each once, whatever overlapping writers left)."""
    if not folder.is_dir():
        return pl.from_arrow(STORE_SCHEMA.empty_table())  # type: ignore[return-value]
    files = shard_files(folder)
    if not files:
        return pl.from_arrow(STORE_SCHEMA.empty_table())  # type: ignore[return-value]
    wanted = keys.unique().implode()
    return (
        pl.scan_parquet(files)
        .filter(pl.col("ref_key").is_in(wanted))
        .unique(subset=["ref_key"], keep="first")
        .collect()
    )


@dataclass
class _Tally:
    shards: int = 0
    skipped_shards: int = 0
    pairs: int = 0
    computed: int = 0  # pairs whose log-probs this run computed (the rest came from the store)
    too_long: int = 0


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
    store: Path | str | None = None,
    partition: tuple[int, int] = (0, 1),
) -> ReferenceResult:
    """Write reference log-probs into every shard of ``pairs_dir`` (of ``partition``: every count-th
    shard from index); skip shards already done, and with a ``store`` pairs already computed.
    ``bf16`` must be the trainer's (``TrainConfig.bf16``; default: on with CUDA)."""
    started = time.perf_counter()
    data = pairs_data_dir(pairs_dir)
    files = shard_files(data)
    if not files:
        raise FileNotFoundError(f"{data}: no pairs shards")
    index, count = partition
    files = files[index::count]
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    numerics = precision(torch_device, bf16)
    spec = reference_spec(model_dir, max_length, numerics)
    report = _Tally()
    pending = [f for f in files if shard_spec(f) != spec]
    report.skipped_shards = len(files) - len(pending)
    kept = store_folder(store, spec) if store is not None else None
    loaded: tuple[PairLogps, Any] | None = None
    for path in pending:
        table = pq.read_table(path)
        table = table.drop_columns([c for c in REF_COLUMNS if c in table.column_names])
        keys = reference_keys(table)
        values, rows = _from_store(kept, keys)
        if rows:
            if loaded is None:
                model, processor = load_vlm(model_dir, torch_device, dtype=torch.float32)
                loaded = (PairLogps(model.eval(), vision_pass), processor)
            forward, processor = loaded
            todo = PairTable(table.take(rows), str(path))
            logps, _too_long = pair_logps(
                forward, processor, todo, max_length, batch_size, torch_device, numerics
            )
            values[rows] = logps
            report.computed += len(rows)
            if kept is not None:
                _keep(kept, keys.gather(rows), logps, path)
        report.too_long += int(torch.isnan(values[:, 0]).sum())
        _write_with_logps(table, values, spec, path)
        report.shards += 1
        report.pairs += table.num_rows
        if on_shard:
            on_shard(path, table.num_rows)
    return ReferenceResult(
        stage="reference" if count == 1 else f"reference:{index + 1}/{count}",
        out_dir=str(pairs_dir),
        counts={
            "shards": report.shards,
            "skipped_shards": report.skipped_shards,
            "pairs_computed": report.computed,
            "pairs_from_store": report.pairs - report.computed,
        },
        drops={"too_long": report.too_long} if report.too_long else {},
        seconds=time.perf_counter() - started,
        spec=spec,
    )


def _from_store(kept: Path | None, keys: pl.Series) -> tuple[torch.Tensor, list[int]]:
    """The log-probs the store holds for ``keys`` (NaN where it holds none) and the rows it lacks."""
    values = torch.full((len(keys), 2), float("nan"), dtype=torch.float64)
    known = _stored(kept, keys) if kept is not None else pl.DataFrame()
    if not known.height:
        return values, list(range(len(keys)))
    found = pl.DataFrame({"ref_key": keys}).join(known, on="ref_key", how="left", maintain_order="left")
    for column, name in enumerate(REF_COLUMNS):
        values[:, column] = torch.from_numpy(found[name].fill_null(float("nan")).to_numpy().copy())
    return values, (~keys.is_in(known["ref_key"].implode())).arg_true().to_list()


def _keep(kept: Path, keys: pl.Series, logps: torch.Tensor, path: Path) -> None:
    """Add a shard's freshly computed log-probs to the store, named after the shard and its first key
    (another version of the same shard adds its own file)."""
    fresh = pa.table(
        {
            "ref_key": keys.to_arrow(),
            **{name: _nullable(logps[:, column]) for column, name in enumerate(REF_COLUMNS)},
        },
        schema=STORE_SCHEMA,
    )
    write_table(fresh, kept / f"{path.stem}-{keys.sort()[0]}.parquet")


def _write_with_logps(table: pa.Table, values: torch.Tensor, spec: dict[str, Any], path: Path) -> None:
    """Rewrite a pairs shard with its reference columns and the spec they were computed under."""
    out = table
    for column, name in enumerate(REF_COLUMNS):
        out = out.append_column(name, _nullable(values[:, column]))
    metadata = dict(out.schema.metadata or {})
    metadata[SPEC_KEY] = json.dumps(spec, sort_keys=True).encode()
    write_table(out.replace_schema_metadata(metadata), path)


def _nullable(values: torch.Tensor) -> pa.Array:
    """float64 values with NaN (a pair too long for max_length) as null."""
    return pa.array(values.numpy(), type=pa.float64(), mask=torch.isnan(values).numpy())


def reference_specs(pairs_dir: Path | str) -> list[dict[str, Any] | None]:
    """The spec of every shard (None where no reference log-probs were written)."""
    return [shard_spec(f) for f in shard_files(pairs_data_dir(pairs_dir))]
