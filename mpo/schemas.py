"""The pipeline's table contracts (pyarrow schemas) and their Parquet I/O, in one place.

Every stage reads and writes these tables through ``write_table`` / ``read_dir``:
sharded Parquet (zstd), each shard written atomically, so a reader never sees a
half-written file and a killed writer leaves no corrupt shard behind.

- ``PROMPTS``: normalised input prompts (``mpo ingest``).
- ``QUARANTINE``: inputs that could not be used, with file, line and a reason code.
- ``SAMPLES``: one row per generated response (sampling stages).
- ``PAIRS``: preference pairs; ``prompt``/``chosen``/``rejected``/``images`` are the
  column names TRL and HF ``datasets`` use, the rest is lineage.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mpo.errors import unreadable
from mpo.io import atomic_write

IMAGES = pa.list_(pa.string())  # absolute image paths, in placeholder order

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),  # content hash: image bytes + question + answer/chosen
        ("dataset", pa.string()),
        ("kind", pa.string()),  # closed (has answer) | open (has chosen)
        ("images", IMAGES),
        ("question", pa.string()),
        ("answer", pa.string()),  # gold answer of a closed prompt
        ("chosen", pa.string()),  # good answer of an open prompt
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("repeat_index", pa.int64()),  # 0.. int(repeat_time)-1 when meta.json repeats a dataset
    ]
)

QUARANTINE = pa.schema(
    [
        ("dataset", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),  # stable snake_case code
        ("detail", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("dataset", pa.string()),
        ("images", IMAGES),
        ("question", pa.string()),  # original question (before templating)
        ("answer", pa.string()),  # gold; null for open prompts
        ("prompt_version", pa.string()),  # template id, or the DropoutNTP variant
        ("response", pa.string()),
        ("finish_reason", pa.string()),  # stop | length; anything else (abort, error) is a failed request
        ("num_tokens", pa.int64()),
        ("sample_index", pa.int64()),
        ("source", pa.string()),  # correctness | dropout_ntp
        ("model", pa.string()),
        ("chosen", pa.string()),  # dropout_ntp: the original good answer
        ("prefix", pa.string()),  # dropout_ntp: the cut given to the model
        ("seed", pa.int64()),
        ("sampling_config", pa.string()),  # JSON of the sampling parameters
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),  # stable hash of prompt_id + chosen + rejected
        ("prompt_id", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),  # correctness | dropout_ntp | format
        ("prompt", pa.string()),  # the question as the model saw it (templated)
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("images", IMAGES),
        ("answer", pa.string()),
        ("chosen_answer", pa.string()),
        ("rejected_answer", pa.string()),
        ("model", pa.string()),
    ]
)

HARD_PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("dataset", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("images", IMAGES),
        ("samples", pa.int64()),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select, order and cast ``table`` to ``schema``; missing nullable columns become nulls.

    Raises ``ValueError`` naming the missing column otherwise. Extra columns (such as
    ``ref_chosen_logp`` added by later stages) are kept after the contract's columns.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"table is missing required column {field.name!r}")
    extra = [name for name in table.column_names if name not in schema.names]
    return pa.table(columns + [table.column(n) for n in extra], names=schema.names + extra)


def write_table(table: pa.Table, path: Path | str, schema: pa.Schema | None = None) -> Path:
    """Write one Parquet shard (zstd) atomically; conform to ``schema`` when given."""
    if schema is not None:
        table = conform(table, schema)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def shard_files(directory: Path | str) -> list[Path]:
    """Finished shards of a table directory, in name order (temp files are hidden)."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def _read_shard(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise unreadable(path, "Parquet shard", error) from None


def read_dir(directory: Path | str, schema: pa.Schema | None = None) -> pa.Table:
    """Read every finished shard under ``directory`` as one table."""
    files = shard_files(directory)
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no Parquet shards in {directory}")
        return schema.empty_table()
    table = pa.concat_tables([_read_shard(f) for f in files], promote_options="default")
    return conform(table, schema) if schema is not None else table
