"""One Prefect task for every step of the pipeline (``mpo.step.Step``). No business logic lives here.

``run_step`` runs whatever step it is handed: the job's log lines go to the run logger, its
progress to a progress artifact, both to its terminal line. ``with_stage_policy`` gives it the
step's stage policy from the config: retries with backoff (a bad-input error, ``ValueError``,
``FileNotFoundError``, ..., is never retried: running it again cannot help), tags, and caching
for steps whose result names its data (sampling, pairs): keyed on the job, its arguments, the
step's identity and the results' shape, so a new run with the same inputs reuses the result.
Heavy stages resume by themselves (finished shards and checkpoints on disk), so a retry or a
new run picks up where the last one stopped.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows.config import StagePolicy
from mpo.step import Step

BAD_INPUT = (ValueError, FileNotFoundError, KeyError, TypeError)


def _step_cache_key(_context: Any, parameters: dict[str, Any]) -> str | None:
    from mpo.results import shape_version

    step: Step = parameters["step"]
    return step.cache_key(shape_version())


# No run id: a new run with the same inputs reuses the result. Results are pickled ``mpo.results``
# objects: their shape is part of the key.
STEP_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_step_cache_key)


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


@task(name="step")
def run_step(step: Step, deployment: str | None = None) -> Any:
    """Run one step here (its events to the run logger, a progress artifact and its terminal line),
    or hand it to ``deployment`` (a flow of ``flows.stages`` on another work pool) and wait for it."""
    from prefect.runtime import task_run

    from mpo.results import StageResult

    if deployment is None:
        result = _run_here(step)
    else:
        from flows.handoff import run_on_deployment

        result = run_on_deployment(deployment, step)
    if isinstance(result, StageResult) and (task_run.run_count or 1) > 1:  # retried: say so in the summary
        result = result.model_copy(update={"attempts": task_run.run_count})
    return result


def _run_here(step: Step) -> Any:
    logger = _logger()
    artifact: list[Any] = []

    def on_event(event: dict[str, Any]) -> None:
        if "log" in event:
            logger.info(event["log"])
        if "progress" in event:
            if not artifact:  # only steps that report progress get an artifact
                artifact.append(create_progress_artifact(progress=0.0, description=f"{step.label}: done"))
            update_progress_artifact(artifact[0], progress=event["progress"])

    return step.run(on_event)


def with_stage_policy(stage_task: Task[Any, Any], policy: StagePolicy, **options: Any) -> Any:
    """The task with a stage's retries, backoff delays, jitter and tags from the pipeline config.

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


def step_task(step: Step, policy: StagePolicy, result_storage: dict[str, Any], **options: Any) -> Any:
    """``run_step`` (or another task taking ``step``) for this step: named by its label, with its
    stage's policy, and cached where the step has an identity. A cached result whose output is
    gone (a deleted work folder) is recomputed, not returned: it would name data that no longer exists."""
    task_fn = options.pop("task", run_step)
    cache: dict[str, Any] = {"cache_policy": NO_CACHE}
    if step.identity is not None:
        cache = {
            "cache_policy": STEP_CACHE,
            "persist_result": True,
            "refresh_cache": step.output_missing(),
            **result_storage,
        }
    return with_stage_policy(task_fn, policy, task_run_name=step.label, **cache, **options)
