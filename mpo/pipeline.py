"""The pipeline itself, apart from any orchestrator: the chain of stages, where each writes,
how versions are keyed, and a plain in-process runner.

ingest -> {correctness, DropoutNTP} -> pairs -> reference log-probs -> MPO (+ SFT baseline)
-> held-out evaluation -> summary. ``run_pipeline`` owns the chain: what runs, on what, in
which order, and how the results add up to a ``RunSummary``. A ``Runner`` decides only how
each step runs: ``LocalRunner`` here, one job after the other in this process (a job with a
time limit or an engine interpreter in a child process), or the Prefect runner in ``flows/``
(tasks with retries, caching, artifacts). Both run the same ``mpo.jobs`` with the same
arguments (``Steps``), and every stage resumes from what its folder holds, so any runner can
pick up another's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mpo import jobs
from mpo.config import PipelineConfig
from mpo.results import (
    Comparison,
    EvalResult,
    IngestResult,
    PairsResult,
    RunSummary,
    StageResult,
    TrainingResult,
)
from mpo.time_limit import Emit, call_with_time_limit
from mpo.train import TrainConfig


def sft_only(training: TrainConfig) -> TrainConfig:
    """The training config with only the SFT term: the baseline MPO is compared against."""
    loss = training.loss.model_copy(update={"dpo_weight": 0.0, "bco_weight": 0.0, "sft_weight": 1.0})
    return training.model_copy(update={"loss": loss})


def side_by_side_threads() -> int:
    """torch threads for each of two trainings sharing this machine (MPO and its SFT baseline).

    A tiny model's step is bound by Python's per-op overhead, not by cores: two single-thread
    trainings side by side each keep the speed of one alone (benchmarks/README.md)."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


@dataclass(frozen=True)
class RunLayout:
    """Every folder of a run under ``workdir``, and the keys that version them."""

    workdir: Path

    @property
    def ingested(self) -> Path:
        return self.workdir / "ingested"

    @property
    def heldout(self) -> Path:
        return self.workdir / "heldout"

    @property
    def samples(self) -> Path:
        return self.workdir / "samples"

    @property
    def evaluation(self) -> Path:
        return self.workdir / "eval"

    @property
    def summary_file(self) -> Path:
        return self.workdir / "summary.json"

    def pairs(self, config: PipelineConfig, prompts_version: str, samples_dirs: list[str]) -> Path:
        """The pairs' data version: the prompt set, the sample stores and the pairing config.

        A scheduled refresh that brings new prompts gets a new version (a new pairs folder),
        while the stores only sample what they lack; the same inputs give the same version.
        """
        stores = sorted(Path(d).name for d in samples_dirs)
        digest = hashlib.sha256(json.dumps([config.fingerprint("pairing"), stores]).encode()).hexdigest()[:8]
        return self.workdir / "pairs" / f"v-{prompts_version[:8]}-{digest}"

    def training(self, config: PipelineConfig, pairs_dir: str, training: TrainConfig, name: str) -> Path:
        """A folder per (pairs version, starting model and its weights, training config): a changed
        config trains afresh, the same one resumes."""
        from mpo.model_identity import model_fingerprint

        key = config.model_copy(update={"training": training}).fingerprint("training", "model")
        key = hashlib.sha256(f"{key}/{model_fingerprint(config.model)}".encode()).hexdigest()[:12]
        return self.workdir / "train" / Path(pairs_dir).name / f"{name}-{key}"

    def write_summary(self, summary: RunSummary) -> list[Path]:
        """``summary.json``, then the run's charts from it (``mpo.report``); returns the charts' paths."""
        from mpo.report import write_plots

        summary.write(self.summary_file)
        return write_plots(self.workdir)


@dataclass(frozen=True)
class Step:
    """One job call: the ``mpo.jobs`` function, its arguments, and how it must run."""

    label: str  # how the terminal names it, as the Prefect runner's task runs: "sample-correctness"
    job: Callable[..., Any]
    kwargs: dict[str, Any]
    time_limit: float | None = None
    python: str | None = None  # the interpreter of an engine's own environment

    def run(self, emit: Emit, own_process: bool = False) -> Any:
        """In this process, or in a child (time limit, other interpreter, ``own_process``); its
        events also feed its line on the terminal when one is shown (``mpo.progress``)."""
        from mpo.progress import step

        with step(self.label) as line:

            def both(event: dict[str, Any]) -> None:
                line(event)
                emit(event)

            return call_with_time_limit(
                self.job, self.kwargs, self.time_limit, both, own_process=own_process, python=self.python
            )


@dataclass(frozen=True)
class TrainingPlan:
    """One training of the run: ``mpo``, or ``sft`` for the baseline, and its own folder."""

    name: str
    config: TrainConfig
    out: Path


@dataclass(frozen=True)
class Steps:
    """Every job's arguments from the config and the layout, so that all runners call the jobs alike."""

    config: PipelineConfig

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.config.workdir))

    def _engine(self) -> dict[str, Any]:
        """What the two jobs that generate (sampling and evaluation) need of the sampling engine;
        both run under ``engine_python`` where one is configured."""
        config = self.config
        return {"engine": config.engine, "engine_options": config.engine_options, "sampling": config.sampling}

    def ingest(self, source: Path | str, out: Path) -> Step:
        return Step(
            f"ingest-{Path(source).name}",
            jobs.ingest_job,
            {"source": str(source), "out": str(out), "strict": self.config.strict_ingest},
        )

    def sample(self, stage: str, prompts: IngestResult) -> Step:
        config = self.config
        kwargs = {
            "stage": stage,
            "prompts_dir": prompts.out_dir,
            "model": config.model,
            **self._engine(),
            "out": str(self.layout.samples),
        }
        return Step(
            f"sample-{stage}",
            jobs.sample_job,
            kwargs,
            config.stages.sampling.time_limit_seconds,
            config.engine_python,
        )

    def pairs(self, samples: list[StageResult], prompts: IngestResult) -> Step:
        samples_dirs = [s.out_dir for s in samples]
        out = self.layout.pairs(self.config, prompts.version, samples_dirs)
        kwargs = {
            "samples_dirs": samples_dirs,
            "prompts_dir": prompts.out_dir,
            "out": str(out),
            "pairing": self.config.pairing,
        }
        return Step("pairs", jobs.pairs_job, kwargs)

    def reference(self, pairs: PairsResult) -> Step:
        config = self.config
        kwargs = {
            "pairs_dir": pairs.out_dir,
            "model": config.model,
            "max_length": config.training.max_length,
            "bf16": config.training.bf16,
        }
        return Step("reference-logps", jobs.reference_job, kwargs, config.stages.ref_logps.time_limit_seconds)

    def trainings(self, pairs: PairsResult) -> list[TrainingPlan]:
        """MPO, then the SFT baseline when asked for, each in its own folder."""
        wanted = [("mpo", self.config.training)]
        if self.config.sft_baseline:
            wanted.append(("sft", sft_only(self.config.training)))
        return [
            TrainingPlan(name, training, self.layout.training(self.config, pairs.out_dir, training, name))
            for name, training in wanted
        ]

    def train(self, pairs: PairsResult, plan: TrainingPlan, torch_threads: int | None = None) -> Step:
        kwargs = {
            "pairs_dir": pairs.out_dir,
            "model": self.config.model,
            "out": str(plan.out),
            "training": plan.config,
            "eval_pairs": None,
            "torch_threads": torch_threads,
            "name": plan.name,
        }
        return Step(f"train-{plan.name}", jobs.train_job, kwargs, self.config.stages.train.time_limit_seconds)

    def evaluate(self, name: str, model: str, heldout: IngestResult) -> Step:
        config = self.config
        kwargs = {
            "model": model,
            "prompts_dir": heldout.out_dir,
            "out": str(self.layout.evaluation),
            **self._engine(),
            "pairing": config.pairing,
            "max_tokens": config.eval_max_tokens,
            "name": name,
        }
        return Step(
            f"evaluate-{name}",
            jobs.evaluate_job,
            kwargs,
            config.stages.evaluate.time_limit_seconds,
            config.engine_python,
        )


class Runner(Protocol):
    """How each step of the chain runs (in this process, as Prefect tasks, as deployments).

    ``run_pipeline`` decides what runs on what; a runner only runs it, with the arguments
    ``steps`` gives, and returns the jobs' results."""

    @property
    def steps(self) -> Steps: ...

    def ingest(self, source: Path | str, out: Path) -> IngestResult: ...

    def sample(self, prompts: IngestResult) -> list[StageResult]: ...

    def pairs(self, samples: list[StageResult], prompts: IngestResult) -> PairsResult: ...

    def train(self, pairs: PairsResult) -> tuple[StageResult | None, dict[str, TrainingResult]]:
        """Reference log-probs, then every training of ``steps.trainings``."""
        ...

    def evaluate(self, models: dict[str, str], heldout: IngestResult) -> dict[str, EvalResult]: ...

    def publish(self, summary: RunSummary) -> None:
        """Show the finished run (print it, or publish artifacts)."""
        ...


def run_pipeline(runner: Runner) -> RunSummary:
    """The whole chain under ``runner``; returns the summary, also written to ``summary.json``
    with the run's charts beside it."""
    from mpo.evaluate import compare_models

    config, layout = runner.steps.config, runner.steps.layout
    timings: dict[str, float] = {}

    def timed(step: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        timings[step] = time.perf_counter() - started
        return result

    def ingest() -> tuple[IngestResult, IngestResult | None]:
        prompts = runner.ingest(config.train_data, layout.ingested)
        if not config.evaluate or config.heldout_data is None:
            return prompts, None
        return prompts, runner.ingest(config.heldout_data, layout.heldout)

    prompts, heldout = timed("ingest", ingest)
    sampled = timed("sampling", lambda: runner.sample(prompts))
    pairs = timed("pairs", lambda: runner.pairs(sampled, prompts))
    reference, trainings = timed("training", lambda: runner.train(pairs)) if config.train else (None, {})
    models = {"start": config.model, **{name: t.final_model for name, t in trainings.items()}}
    evaluation: dict[str, EvalResult] = {}
    comparison: dict[str, Comparison] = {}
    if heldout is not None:
        evaluation = timed("evaluation", lambda: runner.evaluate(models, heldout))
        compared = compare_models(
            layout.evaluation,
            heldout.out_dir,
            models,
            config.sampling,
            config.pairing,
            config.eval_max_tokens,
        )
        comparison = {pair: Comparison(**values) for pair, values in compared.items()}
    summary = RunSummary(
        workdir=str(layout.workdir),
        ingest=prompts,
        heldout=heldout,
        sampling=sampled,
        pairs=pairs,
        reference=reference,
        trainings=trainings,
        models=models,
        evaluation=evaluation,
        comparison=comparison,
        timings=timings,
    )
    layout.write_summary(summary)
    runner.publish(summary)
    return summary


@dataclass
class LocalRunner:
    """Every step in this process, one after the other; no retries (a re-run resumes) and no
    caching beyond what each stage's folder holds. ``emit`` gets the jobs' log and progress events."""

    steps: Steps
    emit: Emit = field(default=lambda _event: None)

    def ingest(self, source: Path | str, out: Path) -> IngestResult:
        result: IngestResult = self.steps.ingest(source, out).run(self.emit)
        return result

    def sample(self, prompts: IngestResult) -> list[StageResult]:
        from mpo.sampling import STAGES

        return [self.steps.sample(stage, prompts).run(self.emit) for stage in STAGES]

    def pairs(self, samples: list[StageResult], prompts: IngestResult) -> PairsResult:
        result: PairsResult = self.steps.pairs(samples, prompts).run(self.emit)
        return result

    def train(self, pairs: PairsResult) -> tuple[StageResult | None, dict[str, TrainingResult]]:
        reference = self.steps.reference(pairs).run(self.emit)
        trained = {
            plan.name: self.steps.train(pairs, plan).run(self.emit) for plan in self.steps.trainings(pairs)
        }
        return reference, trained

    def evaluate(self, models: dict[str, str], heldout: IngestResult) -> dict[str, EvalResult]:
        return {
            name: self.steps.evaluate(name, model, heldout).run(self.emit) for name, model in models.items()
        }

    def publish(self, summary: RunSummary) -> None:
        for chart in sorted((Path(summary.workdir) / "plots").glob("*.png")):
            self.emit({"log": f"chart: {chart}"})


def run_local(config: PipelineConfig, on_event: Emit | None = None) -> RunSummary:
    """The whole pipeline in this process, without an orchestrator (``LocalRunner``)."""
    return run_pipeline(LocalRunner(Steps(config), on_event or (lambda _event: None)))
