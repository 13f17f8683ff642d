"""One step of a run: which ``mpo.jobs`` function, with which arguments, and how it must run.

A runner (``mpo.pipeline.LocalRunner``, the Prefect runner in ``flows/``) gets nothing but steps:
it decides how a step runs (this process, a task with retries, a deployment on a GPU pool), the
step says what runs. A step is data, not a closure: the job is named by its import path and the
arguments are plain values or pydantic configs, so a step travels as JSON (a deployment's
parameter, a remote worker) and comes back with its arguments typed again from the job's own
signature (``job_kwargs``). Its ``cache_key`` names the result for orchestrators that cache
results across runs.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic_core import to_jsonable_python

from mpo.results import StageResult, worker_name
from mpo.time_limit import Emit, call_with_time_limit

STAGES = ("ingest", "sampling", "pairs", "ref_logps", "train", "evaluate")


def job_path(job: Callable[..., Any]) -> str:
    """``mpo.jobs:sample_job``: how a step names its job."""
    return f"{job.__module__}:{job.__qualname__}"


def load_job(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"a step's job is 'module:function', got {path!r}")
    job: Any = importlib.import_module(module)
    for part in name.split("."):
        job = getattr(job, part)
    return job  # type: ignore[no-any-return]


class Step(BaseModel):
    """One job call of a run, as data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(description="its name on the terminal and in the UI: 'sample-correctness'")
    stage: str = Field(description="the config section of its policy: " + ", ".join(STAGES))
    job: str = Field(description="the job function, 'module:function' (``mpo.jobs``)")
    kwargs: dict[str, Any] = Field(description="the job's arguments (not ``emit``)")
    time_limit: float | None = Field(None, description="hard limit: the job runs in a child, killed then")
    python: str | None = Field(None, description="the interpreter of an engine's own environment")
    own_process: bool = Field(False, description="in a child process even without a limit")
    holds_device: bool = Field(
        False,
        description="holds most of a device's memory (a vLLM or lmdeploy engine): two such steps never "
        "run at once in one place; a runner that puts each on its own worker runs them together",
    )
    identity: dict[str, str] | None = Field(
        None,
        description="what identifies the result beyond the arguments (a prompt set's version, the "
        "weights' fingerprint); None: the result is not cached across runs",
    )
    output: str | None = Field(
        None, description="a path a cached result refers to: gone (a deleted work folder), recompute"
    )

    @classmethod
    def of(cls, job: Callable[..., Any], label: str, stage: str, **fields: Any) -> Step:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
        return cls(job=job_path(job), label=label, stage=stage, **fields)

    def job_function(self) -> Callable[..., Any]:
        return load_job(self.job)

    def job_kwargs(self) -> dict[str, Any]:
        """The arguments typed by the job's signature: a step that came as JSON gets its configs back
        as pydantic objects; typed ones pass through."""
        job = self.job_function()
        hints = typing.get_type_hints(job)
        parameters = inspect.signature(job).parameters
        unknown = set(self.kwargs) - set(parameters)
        if unknown:
            raise TypeError(f"step {self.label}: {self.job} takes no {sorted(unknown)}")
        return {
            name: TypeAdapter(hints[name]).validate_python(value) if name in hints else value
            for name, value in self.kwargs.items()
        }

    def digest(self, *extra: str) -> str:
        """A hash of the job, its arguments, ``identity`` and ``extra`` (e.g. the results' shape). How
        the step runs (its label, limit, interpreter, process) is not part of it."""
        blob = json.dumps(
            [self.job, to_jsonable_python(self.kwargs), self.identity, list(extra)],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def cache_key(self, *extra: str) -> str | None:
        """``digest`` for a step whose result may be cached across runs; None for the others."""
        return None if self.identity is None else self.digest(*extra)

    def output_missing(self) -> bool:
        return self.output is not None and not Path(self.output).exists()

    def run(self, emit: Emit) -> Any:
        """In this process, or in a child (time limit, other interpreter, ``own_process``); its events
        also feed its line on the terminal when one is shown (``mpo.progress``)."""
        from mpo.progress import step

        with step(self.label) as line:

            def both(event: dict[str, Any]) -> None:
                line(event)
                emit(event)

            result = call_with_time_limit(
                self.job_function(),
                self.job_kwargs(),
                self.time_limit,
                both,
                own_process=self.own_process,
                python=self.python,
            )
        if isinstance(result, StageResult):  # the child ran here too: same host, same devices
            result = result.model_copy(update={"worker": worker_name()})
        return result
