"""Each heavy stage as its own flow, so deployments can run it on its own work pool.

``mpo-sampling`` (ingest + both sampling stages) and ``mpo-training`` (reference log-probs +
the trainings) go to a ``gpu`` pool; the full ``mpo-data-engine`` flow stays on ``cpu`` or
runs everything where one machine has a GPU. They are the Prefect runner's own steps, so a
stage run alone writes exactly where the full flow would and each resumes the other's work.
"""

from __future__ import annotations

from prefect import flow

from flows.config import FlowConfig
from flows.data_engine import PrefectRunner
from mpo.results import PairsResult, StageResult, TrainingResult


def _here(config: FlowConfig) -> PrefectRunner:
    """The runner for this flow's own work: the stages it was handed run here, not as deployments again."""
    return PrefectRunner(config.model_copy(update={"sampling_deployment": None, "training_deployment": None}))


@flow(name="mpo-sampling", log_prints=True, persist_result=True)
def sampling(config: FlowConfig) -> list[StageResult]:
    """Ingest the prompts and run both sampling stages; returns the stages' results."""
    runner = _here(config)
    return runner.sample(runner.ingest(config.train_data, runner.steps.layout.ingested))


@flow(name="mpo-training", log_prints=True, persist_result=True)
def training(config: FlowConfig, pairs: PairsResult) -> tuple[StageResult | None, dict[str, TrainingResult]]:
    """Reference log-probs into the pairs, then MPO (and the SFT baseline when the config asks)."""
    return _here(config).train(pairs)
