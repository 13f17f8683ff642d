"""Sampling stages: correctness-based CoT sampling and DropoutNTP, sharded, resumable, incremental.

A stage's samples live in ``OUT/<stage>-<hash>/`` where the hash covers the model and the
sampling config (not the prompts): the folder is the store of everything that model has
sampled with that config. A run samples only the prompts not yet in the store (their
``prompt_id``/``repeat_index`` keys are kept in each shard's Parquet metadata), so a
killed run resumes where it stopped and a refresh with new prompts samples just those.
Pending prompts are split into strided shards (shard i holds prompts i, i+k, ... of the
prompt_id-sorted table, so every worker gets a fair mix), each written atomically to
``shard-<batch>-<i>-of-<k>.parquet``: a reader never sees a half-written file and a
killed run loses at most its in-flight shard. Readers take the samples of the prompts
they were given (``read_stage_samples``), so prompts dropped from the input drop out.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mpo.engines.base import Engine, GenerationRequest, SamplingParams
from mpo.errors import unreadable
from mpo.io import atomic_write_text
from mpo.model_identity import model_fingerprint
from mpo.results import StageResult
from mpo.schemas import PROMPTS, SAMPLES, read_dir, shard_files, write_table
from mpo.templates import IMAGE_PLACEHOLDER, TEMPLATES, apply_template

STAGES = ("correctness", "dropout_ntp")
KEYS_METADATA = b"mpo.prompt_keys"  # JSON list of the prompt keys a sample shard holds
_VARIANT = re.compile(r"^sr(?P<ratio>[01](?:\.\d+)?)_(?P<image>wo|with)_image$")


class SamplingConfig(BaseModel):
    """Both sampling stages' settings (defaults: InternVL3's MPO data recipe)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(32, ge=1, description="samples per closed prompt")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_k: int = Field(50, description="top-k (<= 0 disables)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(
        4096, ge=1, description="new tokens per response; longer ones are kept as 'length'"
    )
    seed: int = Field(0, ge=0, lt=2**20, description="base seed; request seeds are derived from it")
    templates: dict[str, str] = Field(default_factory=dict, description="CoT template per dataset")
    default_template: str = Field("en", description="template for datasets not listed")
    prompts_per_shard: int = Field(64, ge=1, description="prompts per shard (the unit of resume)")
    partitions: int = Field(
        1,
        ge=1,
        description="at most this many parts per stage, one engine load each, run at once where the runner "
        "can (GPU workers of a deployment, a task runner): 3-4 per worker (deployments/README.md)",
    )
    samples_per_partition: int = Field(
        20_000,
        ge=1,
        description="at least this many samples per part (a stage's prompts x samples per prompt), so that "
        "each part's work outweighs its flow-run start and engine load",
    )
    dropout_variants: list[str] = Field(
        default_factory=lambda: ["sr0.5_wo_image"], description="DropoutNTP variants, as MMPR names them"
    )
    dropout_n: int = Field(1, ge=1, description="continuations per open prompt and variant")
    dropout_max_tokens: int = Field(1024, ge=1, description="new tokens per continuation")

    @field_validator("dropout_variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        for variant in variants:
            parse_variant(variant)
        return variants

    @field_validator("default_template")
    @classmethod
    def _known_template(cls, template: str) -> str:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
        return template

    def template_for(self, dataset: str) -> str:
        return self.templates.get(dataset, self.default_template)

    def samples_per_prompt(self, stage: str) -> int:
        return self.n if stage == "correctness" else len(self.dropout_variants) * self.dropout_n

    def partitions_for(self, stage: str, prompts: int) -> int:
        """How many parts a stage of ``prompts`` prompts is cut into: ``partitions``, fewer where the
        parts would hold under ``samples_per_partition`` samples (a small stage, a small prompt set).
        It depends on the prompt set, not on what is pending, like the parts themselves."""
        wanted = -(-prompts * self.samples_per_prompt(stage) // self.samples_per_partition)
        return max(1, min(self.partitions, wanted))


def parse_variant(variant: str) -> tuple[float, bool]:
    """``sr0.5_wo_image`` -> (0.5, False): the start ratio and whether the image is shown."""
    match = _VARIANT.match(variant)
    if not match or not 0 <= float(match["ratio"]) <= 1:
        raise ValueError(
            f"bad DropoutNTP variant {variant!r}; expected like sr0.5_wo_image or sr0.0_with_image"
        )
    return float(match["ratio"]), match["image"] == "with"


def prefix_by_tokens(text: str, ratio: float, tokenizer: Any) -> str:
    """The first ``int(len(tokens) * ratio)`` tokens of ``text``, decoded. Cutting by
    tokens (not by spaces, as InternVL does) keeps a prefix for Chinese text too."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: int(len(ids) * ratio)])


def request_seed(config: SamplingConfig, key: str, n: int) -> int:
    """Seeds n apart per request (vLLM seeds child i with seed + i), stable across runs."""
    return config.seed * 2**42 + zlib.crc32(key.encode()) * max(n, 1)


def stage_fingerprint(stage: str, config: SamplingConfig, model_id: str) -> str:
    """The store of one stage, model (path and weights) and sampling config; how the work is cut
    (shard size, partitions) is not part of it."""
    fields = config.model_dump()
    if stage == "correctness":
        fields = {
            k: v
            for k, v in fields.items()
            if not k.startswith("dropout_")
            and k not in ("prompts_per_shard", "partitions", "samples_per_partition")
        }
    else:
        fields = {
            k: v
            for k, v in fields.items()
            if k.startswith("dropout_") or k in ("temperature", "top_k", "top_p", "seed")
        }
    blob = json.dumps(
        {"stage": stage, "model": model_id, "weights": model_fingerprint(model_id), "config": fields},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_store(out: Path | str, stage: str, config: SamplingConfig, model_id: str) -> Path:
    """The folder under ``out`` that holds one stage's samples of one model and sampling config."""
    return Path(out) / f"{stage}-{stage_fingerprint(stage, config, model_id)}"


def read_prompts(prompts_dir: Path | str) -> pl.DataFrame:
    """The prompts table ``mpo ingest`` wrote (the ``PROMPTS`` contract) as a polars frame."""
    prompts = pl.from_arrow(read_dir(prompts_dir, PROMPTS))
    assert isinstance(prompts, pl.DataFrame)
    return prompts


def prompt_keys(prompts: pl.DataFrame) -> pl.Series:
    """``prompt_id/repeat_index``: what one sampling request covers."""
    return (prompts["prompt_id"] + "/" + prompts["repeat_index"].cast(pl.String)).alias("key")


def in_partition(prompts: pl.DataFrame, partition: tuple[int, int]) -> pl.DataFrame:
    """The prompts of part ``index`` of ``count``: those whose key hashes to it. A prompt's part
    depends on nothing but its key and the count, not on what is pending or finished, so every
    run, re-run or concurrent run of the same stage cuts the same parts."""
    index, count = partition
    if not 0 <= index < count:
        raise ValueError(f"partition {index} of {count}: expected 0 <= index < count")
    if count == 1:
        return prompts
    part = prompt_keys(prompts).map_elements(lambda key: zlib.crc32(key.encode()) % count, pl.Int64)
    return prompts.filter(part == index)


SAMPLE_KEY = ("source", "model", "prompt_id", "prompt_version", "sample_index")


def distinct_samples(samples: pl.DataFrame) -> pl.DataFrame:
    """One row per sample key: a store that two overlapping runs both wrote to (two runs started
    at once, a refresh on top of a run that outlasted a day) holds some samples twice; every
    reader counts each once, keeping the first written."""
    return samples.unique(subset=list(SAMPLE_KEY), keep="first", maintain_order=True)


def prompts_version(prompts: pl.DataFrame) -> str:
    """A small version tag of the prompts: a hash of their ids (not of their contents)."""
    return keys_version(prompt_keys(prompts).sort())


def keys_version(sorted_keys: Iterable[str]) -> str:
    """The version of a prompt set from its sorted ``prompt_id/repeat_index`` keys: their sha256,
    joined by newlines, fed a key at a time (so a caller may stream them)."""
    digest = hashlib.sha256()
    for index, key in enumerate(sorted_keys):
        digest.update(("\n" + key if index else key).encode())
    return digest.hexdigest()[:12]


def shard_keys(path: Path) -> list[str]:
    """The prompt keys a finished shard holds (from its Parquet footer, the rows are not read)."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise unreadable(path, "sample shard", error) from None
    raw = (schema.metadata or {}).get(KEYS_METADATA)
    if raw is None:
        raise ValueError(
            f"{path}: sample shard without {KEYS_METADATA.decode()!r} metadata (written by another tool?)"
        )
    keys: list[str] = json.loads(raw)
    return keys


def strided_shards(prompts: pl.DataFrame, prompts_per_shard: int) -> list[pl.DataFrame]:
    ordered = prompts.sort("prompt_id", "repeat_index")
    count = max(1, -(-ordered.height // prompts_per_shard))
    return [ordered.gather_every(count, offset=i) for i in range(count)]


def _correctness_requests(
    shard: pl.DataFrame, config: SamplingConfig
) -> list[tuple[dict, GenerationRequest, dict]]:
    params = SamplingParams(
        n=config.n,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
    )
    out = []
    for row in shard.iter_rows(named=True):
        template = config.template_for(row["dataset"])
        seed = request_seed(config, f"correctness/{row['prompt_id']}/{row['repeat_index']}", config.n)
        request = GenerationRequest(
            request_id=f"{row['prompt_id']}/{row['repeat_index']}",
            question=apply_template(row["question"], template),
            images=tuple(row["images"]),
            params=params,
            seed=seed,
        )
        extra = {
            "prompt_version": template,
            "sample_offset": row["repeat_index"] * config.n,
            "chosen": None,
            "prefix": None,
        }
        out.append((row, request, extra))
    return out


def _without_images(question: str) -> str:
    return re.sub(r"\n{2,}", "\n", question.replace(IMAGE_PLACEHOLDER, "")).strip()


def _dropout_requests(
    shard: pl.DataFrame, config: SamplingConfig, tokenizer: Any
) -> list[tuple[dict, GenerationRequest, dict]]:
    params = SamplingParams(
        n=config.dropout_n,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_tokens=config.dropout_max_tokens,
    )
    out = []
    for row in shard.iter_rows(named=True):
        for v_index, variant in enumerate(config.dropout_variants):
            ratio, with_image = parse_variant(variant)
            prefix = prefix_by_tokens(row["chosen"], ratio, tokenizer)
            key = f"dropout/{variant}/{row['prompt_id']}/{row['repeat_index']}"
            request = GenerationRequest(
                request_id=key,
                question=row["question"] if with_image else _without_images(row["question"]),
                images=tuple(row["images"]) if with_image else (),
                assistant_prefix=prefix,
                params=params,
                seed=request_seed(config, key, config.dropout_n),
            )
            offset = (row["repeat_index"] * len(config.dropout_variants) + v_index) * config.dropout_n
            out.append(
                (
                    row,
                    request,
                    {
                        "prompt_version": variant,
                        "sample_offset": offset,
                        "chosen": row["chosen"],
                        "prefix": prefix,
                    },
                )
            )
    return out


def _sample_rows(
    stage: str, planned: list[tuple[dict, GenerationRequest, dict]], engine: Engine
) -> list[dict[str, Any]]:
    completions = engine.generate([request for _, request, _ in planned])
    rows = []
    for (prompt, request, extra), outputs in zip(planned, completions, strict=True):
        if len(outputs) != request.params.n:
            raise RuntimeError(
                f"engine {engine.name} returned {len(outputs)} completions for {request.request_id}, "
                f"expected {request.params.n}"
            )
        params = json.dumps({**request.params.__dict__, "engine": engine.name}, sort_keys=True)
        for i, completion in enumerate(outputs):
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "dataset": prompt["dataset"],
                    "images": prompt["images"],
                    "question": prompt["question"],
                    "answer": prompt["answer"],
                    "prompt_version": extra["prompt_version"],
                    "response": completion.text,
                    "finish_reason": completion.finish_reason,
                    "num_tokens": completion.num_tokens,
                    "sample_index": extra["sample_offset"] + i,
                    "source": stage,
                    "model": engine.model_id,
                    "chosen": extra["chosen"],
                    "prefix": extra["prefix"],
                    "seed": request.seed + i,
                    "sampling_config": params,
                }
            )
    return rows


@dataclass
class StagePlan:
    """What a stage (or one partition of it) has left to do in its store, found without an engine."""

    stage: str
    out_dir: Path
    finished: list[Path]  # shards already holding some of these prompts
    shards: list[pl.DataFrame]  # the pending prompts, cut into shards
    batch: str  # the shard files' name tag: the pending set (and partition) they sample

    partition: tuple[int, int] = (0, 1)

    @property
    def pending(self) -> int:
        return sum(shard.height for shard in self.shards)

    @property
    def label(self) -> str:
        """The stage, and its part where it has several: ``correctness:2/4``."""
        index, count = self.partition
        return self.stage if count == 1 else f"{self.stage}:{index + 1}/{count}"

    def result(self, samples_written: int, seconds: float) -> StageResult:
        """The stage's (or partition's) result: ``shards`` hold its prompts' samples (finished before,
        ``skipped_shards``, and written now)."""
        counts = {
            "shards": len(self.finished) + len(self.shards),
            "skipped_shards": len(self.finished),
            "samples_written": samples_written,
        }
        return StageResult(stage=self.label, out_dir=str(self.out_dir), counts=counts, seconds=seconds)


def plan_stage(
    stage: str,
    prompts_dir: Path | str,
    model_id: str,
    out: Path | str,
    config: SamplingConfig,
    partition: tuple[int, int] = (0, 1),
) -> StagePlan:
    """The store of ``stage`` and which of its prompts (of ``partition``: index, count) it lacks. A
    partition with nothing pending needs no engine at all (a re-run, a refresh's untouched parts)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    prompts = read_prompts(prompts_dir).filter(
        pl.col("kind") == ("closed" if stage == "correctness" else "open")
    )
    prompts = in_partition(prompts, partition)
    out_dir = stage_store(out, stage, config, model_id)
    wanted = set(prompt_keys(prompts))
    stored = {path: shard_keys(path) for path in shard_files(out_dir)}
    finished = [path for path, keys in stored.items() if wanted.intersection(keys)]
    done = {key for keys in stored.values() for key in keys}
    pending = prompts.filter(~prompt_keys(prompts).is_in(list(done)))
    batch = prompts_version(pending)[:8]
    if partition[1] > 1:
        batch = f"p{partition[0]:03d}of{partition[1]:03d}-{batch}"
    shards = strided_shards(pending, config.prompts_per_shard) if pending.height else []
    return StagePlan(stage, out_dir, finished, shards, batch, partition)


def run_stage(
    stage: str,
    prompts_dir: Path | str,
    engine: Engine,
    out: Path | str,
    config: SamplingConfig,
    on_shard: Callable[[int, int, bool], None] | None = None,
    partition: tuple[int, int] = (0, 1),
) -> StageResult:
    """Sample every prompt of ``stage`` (of its ``partition``: index, count) not yet in its store;
    ``on_shard(done, total, skipped)`` is called after each shard (progress bars, Prefect progress
    artifacts)."""
    started = time.perf_counter()
    plan = plan_stage(stage, prompts_dir, engine.model_id, out, config, partition)
    out_dir = plan.out_dir
    atomic_write_text(
        out_dir / "_stage.json",
        json.dumps({"stage": stage, "model": engine.model_id, "config": config.model_dump()}, indent=2)
        + "\n",
    )
    total = len(plan.finished) + len(plan.shards)
    for index in range(len(plan.finished)):
        if on_shard:
            on_shard(index + 1, total, True)
    written = 0
    for index, shard in enumerate(plan.shards):
        planned = (
            _correctness_requests(shard, config)
            if stage == "correctness"
            else _dropout_requests(shard, config, engine.tokenizer)
        )
        rows = pa.Table.from_pylist(_sample_rows(stage, planned, engine), schema=SAMPLES)
        keys = json.dumps(sorted(prompt_keys(shard))).encode()
        write_table(
            rows.replace_schema_metadata({KEYS_METADATA: keys}),
            out_dir / f"shard-{plan.batch}-{index:05d}-of-{len(plan.shards):05d}.parquet",
        )
        written += rows.num_rows
        if on_shard:
            on_shard(len(plan.finished) + index + 1, total, False)
    return plan.result(written, time.perf_counter() - started)


def read_stage_samples(samples_dir: Path | str, prompts: pl.DataFrame) -> pl.DataFrame:
    """The samples in a stage's store that belong to ``prompts`` (a store outlives prompt sets),
    each sample once."""
    samples = pl.from_arrow(read_dir(samples_dir, SAMPLES))
    assert isinstance(samples, pl.DataFrame)
    return distinct_samples(
        samples.filter(pl.col("prompt_id").is_in(prompts["prompt_id"].unique().implode()))
    )
