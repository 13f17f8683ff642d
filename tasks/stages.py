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
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows.config import StagePolicy
from mpo.pairs import PairingConfig
from mpo.results import EvalResult, IngestResult, PairsResult, StageResult, TrainingResult
from mpo.sampling import SamplingConfig
from mpo.train import TrainConfig

T = TypeVar("T")
BAD_INPUT = (ValueError, FileNotFoundError, KeyError, TypeError)


def _results_shape(_context: Any, _parameters: dict[str, Any]) -> str:
    from mpo.results import shape_version

    return shape_version()


# No run id: a new run with the same inputs reuses the result; neither a time limit nor the
# interpreter that runs the engine changes a result. Results are pickled ``mpo.results`` objects:
# their shape is part of the key.
STAGE_CACHE = (INPUTS - "time_limit" - "python") + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_results_shape)


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
    return stage_task.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.delays() or 0,
        retry_jitter_factor=policy.retry_jitter_factor,
        tags=set(policy.tags),
        retry_condition_fn=retry_unless_bad_input,
        **options,
    )


def _run_job(
    job: Callable[..., T],
    kwargs: dict[str, Any],
    time_limit: float | None,
    progress: str | None = None,
    own_process: bool = False,
    python: str | None = None,
) -> T:
    """Run an ``mpo.jobs`` job (in a killable child process when ``time_limit`` is set or
    ``own_process`` asked for; under the interpreter ``python`` when given), its log lines into
    the run logger, its progress into a progress artifact and both onto its terminal line
    (``mpo.progress``, when the CLI shows one)."""
    from prefect.runtime import task_run

    from mpo.progress import step
    from mpo.time_limit import call_with_time_limit

    logger = _logger()
    artifact: Any = create_progress_artifact(progress=0.0, description=progress) if progress else None

    with step(task_run.name or job.__name__) as line:

        def on_event(event: dict[str, Any]) -> None:
            line(event)
            if "log" in event:
                logger.info(event["log"])
            if "progress" in event and artifact is not None:
                update_progress_artifact(artifact, progress=event["progress"])

        return call_with_time_limit(job, kwargs, time_limit, on_event, own_process=own_process, python=python)


def _ingest_run_name() -> str:
    """``ingest-meta.json`` / ``ingest-meta_heldout.json``: which input a task run read, in the UI."""
    from pathlib import Path

    from prefect.runtime import task_run

    return f"ingest-{Path(task_run.parameters['source']).name}"


@task(name="ingest", task_run_name=_ingest_run_name)
def ingest_prompts(source: str, out: str, strict: bool = False) -> IngestResult:
    """meta.json / JSONL / Parquet -> prompts table + quarantine; returns its path, version and counts."""
    from mpo.jobs import ingest_job

    return _run_job(ingest_job, dict(source=source, out=out, strict=strict), None)


@task(name="sample", task_run_name="sample-{stage}", cache_policy=STAGE_CACHE, persist_result=True)
def sample_stage(
    stage: str,
    prompts_dir: str,
    prompts_version: str,
    model: str,
    model_fingerprint: str,
    engine: str,
    engine_options: dict[str, Any],
    sampling: SamplingConfig,
    out: str,
    time_limit: float | None = None,
    python: str | None = None,
) -> StageResult:
    """One sampling stage with one engine load: samples only the prompts its store lacks; a
    progress artifact per stage.

    ``prompts_version`` and ``model_fingerprint`` are only part of the cache key: new
    prompts or new weights at the same path, new key.
    """
    from mpo.jobs import sample_job

    return _run_job(
        sample_job,
        dict(
            stage=stage,
            prompts_dir=prompts_dir,
            model=model,
            engine=engine,
            engine_options=engine_options,
            sampling=sampling,
            out=out,
        ),
        time_limit,
        progress=f"{stage} sampling: shards done",
        python=python,
    )


@task(name="pairs", task_run_name="pairs", cache_policy=STAGE_CACHE, persist_result=True)
def make_pairs(samples_dirs: list[str], prompts_dir: str, out: str, pairing: PairingConfig) -> PairsResult:
    """The samples of the prompts in ``prompts_dir`` -> preference pairs (polars); returns the
    pairs folder and the pairing report. ``out`` names the data version, so it keys the cache."""
    from mpo.jobs import pairs_job

    return _run_job(
        pairs_job, dict(samples_dirs=samples_dirs, prompts_dir=prompts_dir, out=out, pairing=pairing), None
    )


@task(name="reference-logps", task_run_name="reference-logps")
def reference_logps(
    pairs_dir: str, model: str, max_length: int, bf16: bool | None = None, time_limit: float | None = None
) -> StageResult:
    """Frozen reference pass into the pairs; shards already done are skipped (no task cache needed)."""
    from mpo.jobs import reference_job

    return _run_job(
        reference_job, dict(pairs_dir=pairs_dir, model=model, max_length=max_length, bf16=bf16), time_limit
    )


@task(name="train", task_run_name="train-{name}")
def train_policy(
    pairs_dir: str,
    model: str,
    out: str,
    training: TrainConfig,
    eval_pairs: str | None = None,
    torch_threads: int | None = None,
    name: str = "mpo",
    time_limit: float | None = None,
    own_process: bool = False,
) -> TrainingResult:
    """MPO training; resumes from the newest checkpoint in ``out`` (also after a hard-limit kill).
    ``own_process`` and ``torch_threads`` let two trainings run side by side on one CPU machine."""
    from mpo.jobs import train_job

    return _run_job(
        train_job,
        dict(
            pairs_dir=pairs_dir,
            model=model,
            out=out,
            training=training,
            eval_pairs=eval_pairs,
            torch_threads=torch_threads,
            name=name,
        ),
        time_limit,
        progress="training: steps done",
        own_process=own_process,
    )


@task(name="evaluate", task_run_name="evaluate-{name}")
def evaluate_model(
    model: str,
    prompts_dir: str,
    out: str,
    engine: str,
    engine_options: dict[str, Any],
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int,
    name: str = "model",
    time_limit: float | None = None,
    python: str | None = None,
) -> EvalResult:
    """Greedy held-out accuracy per dataset (reuses finished evaluation shards)."""
    from mpo.jobs import evaluate_job

    return _run_job(
        evaluate_job,
        dict(
            model=model,
            prompts_dir=prompts_dir,
            out=out,
            engine=engine,
            engine_options=engine_options,
            sampling=sampling,
            pairing=pairing,
            max_tokens=max_tokens,
            name=name,
        ),
        time_limit,
        python=python,
    )
