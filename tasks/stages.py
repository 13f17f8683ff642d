"""Prefect tasks: thin wrappers over ``mpo`` stage functions. No business logic lives here.

Every task takes and returns small values (paths, configs, counts), never tables, so
cache keys stay small and results persist cheaply. Retries come from the pipeline
config per stage (``with_stage_policy``); a bad-input error (``ValueError``,
``FileNotFoundError``, ``IngestError``) is never retried: running it again cannot help.
Heavy stages resume by themselves (finished shards and checkpoints on disk), so a retry
or a new run with the same config picks up where the last one stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from mpo.config import StagePolicy
from mpo.pairs import PairingConfig
from mpo.sampling import SamplingConfig
from mpo.train import TrainConfig

BAD_INPUT = (ValueError, FileNotFoundError, KeyError, TypeError)
STAGE_CACHE = INPUTS + TASK_SOURCE  # no run id: a new run with the same inputs reuses the result


def _logger() -> Any:
    """The run logger inside a flow or task run; a plain logger when a task body is called with ``.fn``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mpo.tasks")


def retry_unless_bad_input(_task: Task[Any, Any], _task_run: Any, state: Any) -> bool:
    """Retry transient failures (OOM, a lost worker, a flaky disk), not errors in the input or config."""
    try:
        state.result()
    except BAD_INPUT:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


def with_stage_policy(stage_task: Task[Any, Any], policy: StagePolicy, **options: Any) -> Any:
    """The task with this stage's retries, backoff delays, jitter and tags from the pipeline config.

    Typed ``Any``: Prefect's overloads make a synchronous call look like a coroutine to mypy.
    """
    return stage_task.with_options(retries=policy.retries, retry_delay_seconds=policy.delays() or 0,
                                   retry_jitter_factor=policy.retry_jitter_factor, tags=set(policy.tags),
                                   retry_condition_fn=retry_unless_bad_input, **options)


@task(name="ingest")
def ingest_prompts(source: str, out: str, strict: bool = False) -> dict[str, Any]:
    """meta.json / JSONL / Parquet -> prompts table + quarantine; returns its path, version and counts."""
    from mpo.ingest import ingest
    from mpo.sampling import prompts_version, read_prompts

    report = ingest(Path(source), Path(out), strict=strict)
    prompts_dir = Path(out) / "prompts"
    table = read_prompts(prompts_dir)
    _logger().info("ingested %s prompts from %s, %s quarantined", table.height, source,
                          report.as_dict()["total_quarantined"])
    return {"prompts_dir": str(prompts_dir), "version": prompts_version(table), **report.as_dict()}


@task(name="sample", cache_policy=STAGE_CACHE, persist_result=True)
def sample_stage(stage: str, prompts_dir: str, prompts_version: str, model: str, engine: str,
                 engine_options: dict[str, Any], sampling: SamplingConfig, out: str) -> dict[str, Any]:
    """One sampling stage with one engine load: samples only the prompts its store lacks; a
    progress artifact per stage.

    ``prompts_version`` is only part of the cache key: new prompts, new key.
    """
    from mpo.engines import load_engine
    from mpo.sampling import run_stage

    logger = _logger()
    progress: Any = create_progress_artifact(progress=0.0, description=f"{stage} sampling: shards done")

    def advance(done: int, total: int, skipped: bool) -> None:
        update_progress_artifact(progress, progress=100.0 * done / max(1, total))
        logger.info("%s shard %s/%s %s", stage, done, total, "already done" if skipped else "written")

    sampler = load_engine(engine, model, **engine_options)
    try:
        report = run_stage(stage, prompts_dir, sampler, out, sampling, on_shard=advance)
    finally:
        sampler.close()
    return {"stage": stage, "samples_dir": str(report.out_dir), "shards": report.shards,
            "skipped_shards": report.skipped, "samples_written": report.samples_written}


@task(name="pairs", cache_policy=STAGE_CACHE, persist_result=True)
def make_pairs(samples_dirs: list[str], prompts_dir: str, out: str, pairing: PairingConfig) -> dict[str, Any]:
    """The samples of the prompts in ``prompts_dir`` -> preference pairs (polars); returns the
    pairs folder and the pairing report. ``out`` names the data version, so it keys the cache."""
    from mpo.pairs import run_pairing
    from mpo.sampling import read_prompts

    prompt_ids = read_prompts(prompts_dir)["prompt_id"]
    report = run_pairing([Path(d) for d in samples_dirs], Path(out), pairing, prompt_ids)
    _logger().info("%s pairs: %s", report["pairs"], report["pairs_by_source"])
    return {"pairs_dir": out, "report": report}


@task(name="reference-logps")
def reference_logps(pairs_dir: str, model: str, max_length: int) -> dict[str, Any]:
    """Frozen reference pass into the pairs; shards already done are skipped (no task cache needed)."""
    from mpo.ref_logps import compute_reference_logps

    report = compute_reference_logps(pairs_dir, model, max_length=max_length)
    _logger().info("reference log-probs: %s shards written, %s already done, %s pairs too long",
                          report.shards, report.skipped_shards, report.too_long)
    return {"pairs_dir": pairs_dir, "shards": report.shards, "skipped_shards": report.skipped_shards,
            "too_long": report.too_long}


@task(name="train")
def train_policy(pairs_dir: str, model: str, out: str, training: TrainConfig,
                 eval_pairs: str | None = None) -> dict[str, Any]:
    """MPO training; resumes from the newest checkpoint in ``out``."""
    from mpo.train import train

    logger = _logger()

    def log_step(record: dict[str, Any]) -> None:
        if record["step"] == 1 or record["step"] % 10 == 0:
            logger.info("step %s loss %.4f margin %+.4f reward acc %.2f", record["step"], record["loss"],
                        record["reward_margin"], record["reward_accuracy"])

    result = train(pairs_dir, model, out, training, eval_pairs=eval_pairs, on_step=log_step)
    return {"final_model": str(result.final_model), "metrics_file": str(result.metrics_file), "steps": result.steps,
            "first": result.first, "last": result.last, "resumed_from": result.resumed_from}


@task(name="evaluate")
def evaluate_model(model: str, prompts_dir: str, out: str, engine: str, engine_options: dict[str, Any],
                   sampling: SamplingConfig, pairing: PairingConfig, max_tokens: int) -> dict[str, dict[str, Any]]:
    """Greedy held-out accuracy per dataset (reuses finished evaluation shards)."""
    from mpo.engines import load_engine
    from mpo.evaluate import evaluate_accuracy

    sampler = load_engine(engine, model, **engine_options)
    try:
        return evaluate_accuracy(sampler, prompts_dir, out, sampling, pairing, max_tokens)
    finally:
        sampler.close()
