"""Sampling stages: correctness-based CoT sampling and DropoutNTP, sharded and resumable.

Prompts are split into strided shards (shard i holds prompts i, i+k, i+2k, ... of the
prompt_id-sorted table, so every worker gets a fair mix). Each shard's samples are
written atomically to ``OUT/<stage>-<config hash>/shard-<i>-of-<k>.parquet``; the hash
covers the model, the sampling config and the prompts' version, so a re-run with the
same inputs skips finished shards and a changed config never mixes with old output.
A killed run loses at most its in-flight shard and never leaves a corrupt file.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from mpo.engines.base import Engine, GenerationRequest, SamplingParams
from mpo.io import atomic_write_text
from mpo.schemas import PROMPTS, SAMPLES, read_dir, shard_files, write_table
from mpo.templates import IMAGE_PLACEHOLDER, TEMPLATES, apply_template

STAGES = ("correctness", "dropout_ntp")
_VARIANT = re.compile(r"^sr(?P<ratio>[01](?:\.\d+)?)_(?P<image>wo|with)_image$")


class SamplingConfig(BaseModel):
    """Both sampling stages' settings (defaults: InternVL3's MPO data recipe)."""

    n: int = Field(32, ge=1, description="samples per closed prompt")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_k: int = Field(50, description="top-k (<= 0 disables)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(4096, ge=1, description="new tokens per response; longer ones are kept as 'length'")
    seed: int = Field(0, ge=0, lt=2**20, description="base seed; request seeds are derived from it")
    templates: dict[str, str] = Field(default_factory=dict, description="CoT template per dataset")
    default_template: str = Field("en", description="template for datasets not listed")
    prompts_per_shard: int = Field(64, ge=1, description="prompts per shard (the unit of resume)")
    dropout_variants: list[str] = Field(default_factory=lambda: ["sr0.5_wo_image"],
                                        description="DropoutNTP variants, as MMPR names them")
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


def parse_variant(variant: str) -> tuple[float, bool]:
    """``sr0.5_wo_image`` -> (0.5, False): the start ratio and whether the image is shown."""
    match = _VARIANT.match(variant)
    if not match or not 0 <= float(match["ratio"]) <= 1:
        raise ValueError(f"bad DropoutNTP variant {variant!r}; expected like sr0.5_wo_image or sr0.0_with_image")
    return float(match["ratio"]), match["image"] == "with"


def prefix_by_tokens(text: str, ratio: float, tokenizer: Any) -> str:
    """The first ``int(len(tokens) * ratio)`` tokens of ``text``, decoded. Cutting by
    tokens (not by spaces, as InternVL does) keeps a prefix for Chinese text too."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: int(len(ids) * ratio)])


def request_seed(config: SamplingConfig, key: str, n: int) -> int:
    """Seeds n apart per request (vLLM seeds child i with seed + i), stable across runs."""
    return config.seed * 2**42 + zlib.crc32(key.encode()) * max(n, 1)


def stage_fingerprint(stage: str, config: SamplingConfig, model_id: str, prompts_version: str) -> str:
    fields = config.model_dump()
    if stage == "correctness":
        fields = {k: v for k, v in fields.items() if not k.startswith("dropout_")}
    else:
        fields = {k: v for k, v in fields.items() if k.startswith("dropout_") or k in ("temperature", "top_k", "top_p", "seed", "prompts_per_shard")}
    blob = json.dumps({"stage": stage, "model": model_id, "prompts": prompts_version, "config": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prompts_version(prompts: pl.DataFrame) -> str:
    """A small version tag of the prompts: a hash of their ids (not of their contents)."""
    digest = hashlib.sha256("\n".join(sorted(prompts["prompt_id"] + "/" + prompts["repeat_index"].cast(pl.String))).encode())
    return digest.hexdigest()[:12]


def strided_shards(prompts: pl.DataFrame, prompts_per_shard: int) -> list[pl.DataFrame]:
    ordered = prompts.sort("prompt_id", "repeat_index")
    count = max(1, -(-ordered.height // prompts_per_shard))
    return [ordered.gather_every(count, offset=i) for i in range(count)]


@dataclass
class StageReport:
    stage: str
    out_dir: Path
    shards: int
    skipped: int
    samples_written: int


def _correctness_requests(shard: pl.DataFrame, config: SamplingConfig) -> list[tuple[dict, GenerationRequest, dict]]:
    params = SamplingParams(n=config.n, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                            max_tokens=config.max_tokens)
    out = []
    for row in shard.iter_rows(named=True):
        template = config.template_for(row["dataset"])
        seed = request_seed(config, f"correctness/{row['prompt_id']}/{row['repeat_index']}", config.n)
        request = GenerationRequest(request_id=f"{row['prompt_id']}/{row['repeat_index']}",
                                    question=apply_template(row["question"], template), images=tuple(row["images"]),
                                    params=params, seed=seed)
        extra = {"prompt_version": template, "sample_offset": row["repeat_index"] * config.n, "chosen": None,
                 "prefix": None}
        out.append((row, request, extra))
    return out


def _without_images(question: str) -> str:
    return re.sub(r"\n{2,}", "\n", question.replace(IMAGE_PLACEHOLDER, "")).strip()


def _dropout_requests(shard: pl.DataFrame, config: SamplingConfig, tokenizer: Any) -> list[tuple[dict, GenerationRequest, dict]]:
    params = SamplingParams(n=config.dropout_n, temperature=config.temperature, top_k=config.top_k,
                            top_p=config.top_p, max_tokens=config.dropout_max_tokens)
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
                assistant_prefix=prefix, params=params, seed=request_seed(config, key, config.dropout_n))
            offset = (row["repeat_index"] * len(config.dropout_variants) + v_index) * config.dropout_n
            out.append((row, request, {"prompt_version": variant, "sample_offset": offset, "chosen": row["chosen"],
                                       "prefix": prefix}))
    return out


def _sample_rows(stage: str, planned: list[tuple[dict, GenerationRequest, dict]], engine: Engine) -> list[dict[str, Any]]:
    completions = engine.generate([request for _, request, _ in planned])
    rows = []
    for (prompt, request, extra), outputs in zip(planned, completions, strict=True):
        if len(outputs) != request.params.n:
            raise RuntimeError(f"engine {engine.name} returned {len(outputs)} completions for {request.request_id}, "
                               f"expected {request.params.n}")
        params = json.dumps({**request.params.__dict__, "engine": engine.name}, sort_keys=True)
        for i, completion in enumerate(outputs):
            rows.append({
                "prompt_id": prompt["prompt_id"], "dataset": prompt["dataset"], "images": prompt["images"],
                "question": prompt["question"], "answer": prompt["answer"], "prompt_version": extra["prompt_version"],
                "response": completion.text, "finish_reason": completion.finish_reason,
                "num_tokens": completion.num_tokens, "sample_index": extra["sample_offset"] + i, "source": stage,
                "model": engine.model_id, "chosen": extra["chosen"], "prefix": extra["prefix"],
                "seed": request.seed + i, "sampling_config": params,
            })
    return rows


def run_stage(stage: str, prompts_dir: Path | str, engine: Engine, out: Path | str, config: SamplingConfig,
              on_shard: Callable[[int, int, bool], None] | None = None) -> StageReport:
    """Sample every shard of ``stage`` not yet on disk; ``on_shard(done, total, skipped)``
    is called after each shard (progress bars, Prefect progress artifacts)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    table = pl.from_arrow(read_dir(prompts_dir, PROMPTS))
    assert isinstance(table, pl.DataFrame)
    prompts = table.filter(pl.col("kind") == ("closed" if stage == "correctness" else "open"))
    fingerprint = stage_fingerprint(stage, config, engine.model_id, prompts_version(prompts))
    out_dir = Path(out) / f"{stage}-{fingerprint}"
    shards = strided_shards(prompts, config.prompts_per_shard) if prompts.height else []
    atomic_write_text(out_dir / "_stage.json", json.dumps(
        {"stage": stage, "model": engine.model_id, "prompts": prompts.height, "shards": len(shards),
         "config": config.model_dump()}, indent=2) + "\n")
    done = {p.name for p in shard_files(out_dir)}
    skipped = written = 0
    for index, shard in enumerate(shards):
        name = f"shard-{index:05d}-of-{len(shards):05d}.parquet"
        if name in done:
            skipped += 1
        else:
            planned = (_correctness_requests(shard, config) if stage == "correctness"
                       else _dropout_requests(shard, config, engine.tokenizer))
            rows = _sample_rows(stage, planned, engine)
            write_table(pa.Table.from_pylist(rows, schema=SAMPLES), out_dir / name)
            written += len(rows)
        if on_shard:
            on_shard(index + 1, len(shards), name in done)
    return StageReport(stage, out_dir, len(shards), skipped, written)
