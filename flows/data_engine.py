"""The Prefect runner of the pipeline: each step of ``mpo.pipeline.run_pipeline`` as a task.

ingest -> {correctness, DropoutNTP} in parallel -> pairs -> reference log-probs -> MPO (and the
SFT baseline) -> evaluation -> summary. The chain, its arguments and the summary are the
library's; here each step gets its stage's retries, caching and tags (``tasks.stages``),
sampling and training can run as deployments on other work pools, and the finished run is
published as artifacts and an event. Run it embedded (``mpo run CONFIG.yaml``), from a
deployment (``prefect.yaml``), or against a server to watch it in the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.events import emit_event

from flows.artifacts import publish_run
from flows.config import FlowConfig
from mpo.config import PipelineConfig
from mpo.pipeline import Step, Steps, run_pipeline, side_by_side_threads
from mpo.progress import current as current_step_lines
from mpo.results import EvalResult, IngestResult, PairsResult, RunSummary, StageResult, TrainingResult
from tasks import stages as tasks


def _call(step: Step, **options: Any) -> dict[str, Any]:
    """A task's arguments: the job's, plus how it must run where the step says so."""
    extra = {"time_limit": step.time_limit, "python": step.python}
    return {**step.kwargs, **{k: v for k, v in extra.items() if v is not None}, **options}


@dataclass
class PrefectRunner:
    """Every step a task with its stage's policy; sampling or training as a deployment when configured."""

    config: FlowConfig

    @property
    def steps(self) -> Steps:
        return Steps(self.config)

    @cached_property
    def result_storage(self) -> dict[str, Any]:
        """Task options for where cached results persist; resolved (a block saved) once per run."""
        return self.config.result_storage_options()

    def ingest(self, source: Path | str, out: Path) -> IngestResult:
        task = tasks.with_stage_policy(tasks.ingest_prompts, self.config.stages.ingest)
        result: IngestResult = task(**_call(self.steps.ingest(source, out)))
        return result

    def sample(self, prompts: IngestResult) -> list[StageResult]:
        """Both stages, at once where their engines can share a device (``sampling_stages_at_once``).
        A cached result whose store is gone (a deleted work folder) is recomputed, not returned: it
        would name samples that no longer exist."""
        from mpo.model_identity import model_fingerprint
        from mpo.sampling import STAGES, stage_store

        config = self.config
        if config.sampling_deployment:
            return run_stage_deployment(config.sampling_deployment, config)  # type: ignore[no-any-return]
        task = tasks.with_stage_policy(tasks.sample_stage, config.stages.sampling, **self.result_storage)
        futures = []
        for stage in STAGES:
            step = self.steps.sample(stage, prompts)
            fresh = not stage_store(step.kwargs["out"], stage, config.sampling, config.model).is_dir()
            futures.append(
                task.with_options(refresh_cache=fresh).submit(
                    **_call(
                        step,
                        prompts_version=prompts.version,
                        model_fingerprint=model_fingerprint(config.model),
                    )
                )
            )
            if not config.sample_stages_together():
                futures[-1].wait()  # this stage's engine is closed before the next one loads
        return [future.result() for future in futures]

    def pairs(self, samples: list[StageResult], prompts: IngestResult) -> PairsResult:
        step = self.steps.pairs(samples, prompts)
        done = (Path(step.kwargs["out"]) / "report.json").exists()
        task = tasks.with_stage_policy(
            tasks.make_pairs, self.config.stages.pairs, refresh_cache=not done, **self.result_storage
        )
        pairs: PairsResult = task(**_call(step))
        emit_event(
            event="mpo.pairs.ready",
            resource={"prefect.resource.id": f"mpo.pairs.{pairs.version}"},
            payload={"pairs_dir": pairs.out_dir, "pairs": pairs.counts["pairs"]},
        )
        return pairs

    def train(self, pairs: PairsResult) -> tuple[StageResult | None, dict[str, TrainingResult]]:
        """Reference log-probs, then MPO and the SFT baseline: one after the other, side by side
        (each its own process with half the CPU threads), or as the training deployment."""
        config = self.config
        if config.training_deployment:
            return run_stage_deployment(config.training_deployment, config, pairs=pairs)  # type: ignore[no-any-return]
        reference_task = tasks.with_stage_policy(tasks.reference_logps, config.stages.ref_logps)
        reference: StageResult = reference_task(**_call(self.steps.reference(pairs)))
        train = tasks.with_stage_policy(tasks.train_policy, config.stages.train)
        plans = self.steps.trainings(pairs)
        if len(plans) > 1 and config.baseline_side_by_side:
            threads = side_by_side_threads()
            steps = [self.steps.train(pairs, plan, torch_threads=threads) for plan in plans]
            futures = [train.submit(**_call(step, own_process=True)) for step in steps]
            return reference, {
                plan.name: future.result() for plan, future in zip(plans, futures, strict=True)
            }
        return reference, {plan.name: train(**_call(self.steps.train(pairs, plan))) for plan in plans}

    def evaluate(self, models: dict[str, str], heldout: IngestResult) -> dict[str, EvalResult]:
        task = tasks.with_stage_policy(tasks.evaluate_model, self.config.stages.evaluate)
        return {
            name: task(**_call(self.steps.evaluate(name, model, heldout))) for name, model in models.items()
        }

    def publish(self, summary: RunSummary) -> None:
        publish_run(summary)


@flow(name="mpo-data-engine", log_prints=True)
def data_engine(config: FlowConfig) -> RunSummary:
    """The whole DAG on one config; returns the run summary (also published as artifacts)."""
    return run_pipeline(PrefectRunner(config))


def run_stage_deployment(name: str, config: FlowConfig, **parameters: Any) -> Any:
    """Run a stage flow as its deployment (on its own work pool, e.g. GPU workers), wait for it and
    return its result; it shows in the UI as a sub-flow of this run. Across machines, point every
    worker at shared result storage (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``) and a shared work folder."""
    from prefect.deployments import run_deployment

    parameters = {"config": config.model_dump(mode="json"), **parameters}
    flow_run: Any = run_deployment(name, parameters=parameters, timeout=None)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"deployment {name} run {flow_run.name} ({flow_run.id}) ended "
            f"{state.name if state else 'without a state'}; see it in the UI"
        )
    return state.result()


def run_flow(config: PipelineConfig, **options: Any) -> Any:
    """``data_engine`` with the configured task runner (what ``mpo run`` and ``mpo demo`` call);
    a plain ``PipelineConfig`` runs with the Prefect settings' defaults."""
    flow_config = config if isinstance(config, FlowConfig) else FlowConfig.model_validate(config.model_dump())
    if current_step_lines() is not None:
        _task_info_off_the_console()
    return data_engine.with_options(task_runner=flow_config.task_runner_instance())(flow_config, **options)


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
