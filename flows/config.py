"""The Prefect runner's settings, on top of the library's ``PipelineConfig``.

Retries with backoff and jitter, tags for concurrency limits, where cached results persist,
which stages run as deployments on other work pools, and the task runner: none of it means
anything outside Prefect, so none of it lives in ``mpo/``. ``FlowConfig`` is the flow's
parameter (the UI form) and what ``mpo run`` loads for the Prefect runner.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mpo.config import PipelineConfig, StageLimit, StageLimits


class StagePolicy(StageLimit):
    """How Prefect runs one stage: retries with backoff and jitter, tags, and the hard time limit."""

    retries: int = Field(2, ge=0, description="retries after a failure that is not a bad-input error")
    retry_delay_seconds: float = Field(10.0, ge=0, description="first retry delay; doubles each retry")
    retry_jitter_factor: float = Field(0.2, ge=0, description="random spread of each delay (0.2 = ±20%)")
    tags: list[str] = Field(default_factory=list, description="task tags, e.g. 'gpu' for a concurrency limit")

    def delays(self) -> list[float]:
        return [self.retry_delay_seconds * 2**i for i in range(self.retries)]


def _gpu_policy() -> StagePolicy:
    return StagePolicy(tags=["gpu"])


class StagePolicies(StageLimits):
    ingest: StagePolicy = Field(default_factory=lambda: StagePolicy(retries=0))
    sampling: StagePolicy = Field(default_factory=_gpu_policy)
    pairs: StagePolicy = Field(default_factory=StagePolicy)
    ref_logps: StagePolicy = Field(default_factory=_gpu_policy)
    train: StagePolicy = Field(default_factory=_gpu_policy)
    evaluate: StagePolicy = Field(default_factory=_gpu_policy)


class FlowConfig(PipelineConfig):
    """``PipelineConfig`` plus what the Prefect flow does with it."""

    stages: StagePolicies = Field(default_factory=StagePolicies)
    result_storage: str | None = Field(
        None,
        description="where cached stage results persist: a local folder, or a storage block slug such as "
        "'s3-bucket/mpo-results' (default: Prefect's local storage)",
    )
    sampling_deployment: str | None = Field(
        None,
        description="run sampling as this deployment (e.g. 'mpo-sampling/sampling' on a gpu pool) and wait "
        "for it, instead of in this flow run; the work folder must be shared",
    )
    training_deployment: str | None = Field(
        None,
        description="run reference log-probs + training as this deployment (e.g. 'mpo-training/training')",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="where submitted stages run: a thread pool, or a Dask cluster (`dask` extra)"
    )
    dask_address: str | None = Field(
        None, description="scheduler of an existing Dask cluster (tcp://host:8786)"
    )
    dask_workers: int = Field(
        2, ge=1, description="workers of the local Dask cluster when no address is given"
    )
    dask_processes: bool = Field(True, description="local Dask workers as processes (False: threads)")

    def result_storage_options(self) -> dict[str, Any]:
        """Task options that persist cached results where ``result_storage`` says (a folder or a block slug)."""
        if self.result_storage is None:
            return {}
        slug = re.fullmatch(r"[a-z0-9-]+/[A-Za-z0-9_-]+", self.result_storage)
        if slug and not Path(self.result_storage).exists():
            return {"result_storage": self.result_storage}  # a saved block: "<block-type>/<block-name>"
        from prefect.filesystems import LocalFileSystem

        # Prefect takes result storage only as a saved block: save one per folder, named by its path.
        folder = str(Path(self.result_storage).resolve())
        name = "mpo-results-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
        LocalFileSystem(basepath=folder).save(name, overwrite=True)
        return {"result_storage": f"local-file-system/{name}"}

    def task_runner_instance(self) -> Any:
        """The task runner asked for (Dask needs the `dask` extra: prefect-dask + distributed)."""
        if self.task_runner == "threads":
            return handoff_threads()
        from prefect_dask import DaskTaskRunner

        if self.dask_address:
            return DaskTaskRunner(address=self.dask_address)
        workers = {"n_workers": self.dask_workers, "processes": self.dask_processes, "threads_per_worker": 1}
        return DaskTaskRunner(cluster_kwargs=workers)


def handoff_threads() -> Any:
    """A thread pool wide enough for every sampling partition of a run at once: a partition handed
    to a GPU worker only waits here, and a pool the size of this machine's cores (Prefect's
    default) would keep all but a few of the GPU workers idle."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=256)
