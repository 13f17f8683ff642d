"""Handing a step to a deployment: a sub-flow run on another work pool (GPU workers), waited for.

The step travels as the deployment's parameter (``mpo.step.Step`` is data). Its flow run's
idempotency key is the step's digest and the attempt number of the task that hands it over, so
that two runs handing over the same step at the same time share one flow run (the second waits
for the first's), and a retry after a crashed or failed flow run starts a new one: a repeated key
returns the existing flow run whatever its state. A completed flow run whose output has since
gone (a deleted work folder) is not reused.
"""

from __future__ import annotations

from typing import Any

from mpo.step import Step

# How often a waiting task asks for its flow run's state: the last part's end is seen this late at
# most (Prefect's default is 5 s); hundreds of parts at once ask the server that many times as often.
POLL_SECONDS = 2.0


def idempotency_key(step: Step, attempt: int, flow_run_id: str) -> str:
    """Same step, same attempt: same key, whichever run hands it over. A step without an ``output``
    cannot tell a stale result from a good one, so its key is scoped to the handing flow run."""
    scope = flow_run_id if step.output is None else ""
    return f"{step.label}-{step.digest(scope)[:16]}-attempt-{attempt}"


def run_on_deployment(deployment: str, step: Step) -> Any:
    """Run ``step`` as a flow run of ``deployment``, wait for it and return its job's result. Across
    machines, every worker needs the shared work folder and result storage (deployments/README.md)."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run, task_run

    attempt = task_run.run_count or 1
    key = idempotency_key(step, attempt, str(flow_run.id or ""))
    parameters = {"step": step.model_dump(mode="json")}
    run: Any = run_deployment(
        deployment, parameters=parameters, idempotency_key=key, timeout=None, poll_interval=POLL_SECONDS
    )
    if run.state is not None and run.state.is_completed() and step.output_missing():
        # a finished run of the same step whose data is gone: this flow run's own, fresh one
        run = run_deployment(
            deployment,
            parameters=parameters,
            idempotency_key=f"{key}-{flow_run.id}",
            timeout=None,
            poll_interval=POLL_SECONDS,
        )
    state = run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"{step.label}: deployment {deployment} run {run.name} ({run.id}) ended "
            f"{state.name if state else 'without a state'}; see it in the UI"
        )
    return state.result()
