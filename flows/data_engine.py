"""The Prefect runner of the pipeline: every step of ``mpo.pipeline.run_pipeline`` as one task.

ingest -> {correctness, DropoutNTP} -> pairs -> reference log-probs -> MPO (and the SFT
baseline) -> evaluation -> summary. The chain, what runs together, its arguments and the
summary are the library's; here each step becomes the one task of ``tasks.stages`` with its
stage's retries, caching and tags, sampling and training steps can be handed to deployments
on other work pools, and the finished run is published as artifacts and an event. Run it
embedded (``mpo run CONFIG.yaml``), from a deployment (``prefect.yaml``), or against a server
to watch it in the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from prefect import flow
from prefect.events import emit_event

from flows.artifacts import publish_run
from flows.config import FlowConfig, handoff_threads
from mpo.config import PipelineConfig
from mpo.pipeline import RunnerEntry, run_pipeline
from mpo.progress import current as current_step_lines
from mpo.results import PairsResult, RunSummary
from mpo.step import Step
from tasks.stages import step_task


@dataclass
class PrefectRunner:
    """Every step the one task, with its stage's policy; handed to a deployment where configured."""

    config: FlowConfig

    @cached_property
    def result_storage(self) -> dict[str, Any]:
        """Task options for where cached results persist; resolved (a block saved) once per run."""
        return self.config.result_storage_options()

    def deployment(self, step: Step) -> str | None:
        """The deployment that runs this step elsewhere (GPU workers), if any."""
        if step.stage == "sampling":
            return self.config.sampling_deployment
        if step.stage in ("ref_logps", "train"):
            return self.config.training_deployment
        return None

    def _task(self, step: Step) -> Any:
        return step_task(step, getattr(self.config.stages, step.stage), self.result_storage)

    def run(self, step: Step) -> Any:
        result = self._task(step)(step, self.deployment(step))
        _announce(result)
        return result

    def run_together(self, steps: list[Step]) -> list[Any]:
        """Every step submitted at once (steps handed to a deployment each get a worker of its pool),
        except that steps holding a device wait for each other in this flow run; a progress artifact
        counts the group's finished steps."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.futures import as_completed

        futures = []
        for step in steps:
            deployment = self.deployment(step)
            futures.append(self._task(step).submit(step, deployment))
            if step.holds_device and deployment is None:
                futures[-1].wait()  # its engine is closed before the next one loads
        if len(steps) > 2 or any(self.deployment(step) for step in steps):
            label = f"{steps[0].stage}: steps done ({len(steps)})"
            artifact: Any = create_progress_artifact(progress=0.0, description=label)
            for done, _future in enumerate(as_completed(futures), start=1):
                update_progress_artifact(artifact, progress=100.0 * done / len(futures))
        results = [future.result() for future in futures]
        for result in results:
            _announce(result)
        return results

    def publish(self, summary: RunSummary) -> None:
        publish_run(summary)


def _announce(result: Any) -> None:
    """A new pairs version is an event other automations can trigger on (training elsewhere)."""
    if isinstance(result, PairsResult):
        emit_event(
            event="mpo.pairs.ready",
            resource={"prefect.resource.id": f"mpo.pairs.{result.version}"},
            payload={"pairs_dir": result.out_dir, "pairs": result.counts["pairs"]},
        )


@flow(name="mpo-data-engine", log_prints=True, task_runner=handoff_threads())
def data_engine(config: FlowConfig) -> RunSummary:
    """The whole DAG on one config; returns the run summary (also published as artifacts)."""
    return run_pipeline(config, PrefectRunner(config))


def run_flow(config: PipelineConfig, **options: Any) -> Any:
    """``data_engine`` with the configured task runner (what ``mpo run`` and ``mpo demo`` call);
    a plain ``PipelineConfig`` runs with the Prefect settings' defaults."""
    flow_config = config if isinstance(config, FlowConfig) else FlowConfig.model_validate(config.model_dump())
    if current_step_lines() is not None:
        _task_info_off_the_console()
    return data_engine.with_options(task_runner=flow_config.task_runner_instance())(flow_config, **options)


# How ``mpo run`` reaches this runner: the ``mpo.runners`` entry point ``prefect`` (pyproject.toml).
RUNNER = RunnerEntry(config_type=FlowConfig, run=run_flow)


def _task_info_off_the_console() -> None:
    """While the terminal shows a line per step (``mpo.progress``), task runs' info lines would
    bury it: they still reach the API (the UI's logs), not the console."""
    import logging

    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    if not PROCESS_LOGGING_CONFIG:  # set up now, as the flow would: later set-ups only adjust it
        setup_logging()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and _not_task_info not in handler.filters:
            handler.addFilter(_not_task_info)


def _not_task_info(record: Any) -> bool:
    import logging

    return not (record.name.startswith("prefect.task_runs") and record.levelno <= logging.INFO)
