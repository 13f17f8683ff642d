"""The flows that deployments on other work pools run: one step each, handed over by the data engine.

The data-engine flow (on a ``cpu`` pool) hands sampling steps to ``mpo-sampling`` and reference
and training steps to ``mpo-training`` (both on a ``gpu`` pool) when ``sampling_deployment`` /
``training_deployment`` are set (``flows.handoff``). The step is the parameter: the same job with
the same arguments as in the data engine's own process, so it writes exactly where the full flow
would and each resumes the other's work. It runs once here, without retries: the handing task
retries it as a new flow run (a crashed worker takes its flow run with it).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mpo.step import Step
from tasks.stages import run_step


@flow(name="mpo-sampling", log_prints=True, persist_result=True)
def sampling(step: Step) -> Any:
    """One sampling step (a stage, or a part of one) with one engine load; returns its result."""
    return run_step.with_options(task_run_name=step.label)(step)


@flow(name="mpo-training", log_prints=True, persist_result=True)
def training(step: Step) -> Any:
    """Reference log-probs into a pairs version, or one training (MPO, the SFT baseline)."""
    return run_step.with_options(task_run_name=step.label)(step)
