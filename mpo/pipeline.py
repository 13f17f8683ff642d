"""The pipeline itself, apart from any orchestrator: the chain of stages, where each writes,
how versions are keyed, and a plain in-process runner.

ingest -> {correctness, DropoutNTP} -> pairs -> reference log-probs -> MPO (+ SFT baseline)
-> held-out evaluation -> summary. ``run_pipeline`` owns the chain: what runs, on what, in
which order, what may run at the same time, and how the results add up to a ``RunSummary``.
``Steps`` turns the config into ``Step``s (``mpo.step``: a job and its arguments, as data). A
``Runner`` only runs steps: ``LocalRunner`` here (this process, threads for steps that run
together), or the Prefect runner in ``flows/`` (one task for every step, with the stage's
retries, caching and tags; a deployment on a GPU pool where configured). Every stage resumes
from what its folder holds, so any runner can pick up another's work.
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
    PartitionedResult,
    RunSummary,
    StageResult,
    TrainingResult,
)
from mpo.step import Step
from mpo.time_limit import Emit
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
    def reference(self) -> Path:
        """Reference log-probs by pair and reference, shared by every pairs version of the run."""
        return self.workdir / "reference"

    @property
    def summary_file(self) -> Path:
        return self.workdir / "summary.json"

    @property
    def gallery(self) -> Path:
        """The pairs of the run's data version with their images, to open in a browser (``mpo view``)."""
        return self.workdir / "pairs.html"

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
        """``summary.json``, the run's charts from it (``mpo.report``; their paths are returned) and the
        gallery of its pairs (``pairs.html``)."""
        from mpo.gallery import write_gallery
        from mpo.report import write_plots

        summary.write(self.summary_file)
        if summary.pairs.counts.get("pairs"):
            write_gallery(summary.pairs.out_dir, self.gallery)
        return write_plots(self.workdir)


@dataclass(frozen=True)
class TrainingPlan:
    """One training of the run: ``mpo``, or ``sft`` for the baseline, and its own folder."""

    name: str
    config: TrainConfig
    out: Path


@dataclass(frozen=True)
class Steps:
    """Every job's step from the config and the layout, so that all runners call the jobs alike."""

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
        return Step.of(
            jobs.ingest_job,
            f"ingest-{Path(source).name}",
            "ingest",
            kwargs={"source": str(source), "out": str(out), "strict": self.config.strict_ingest},
            time_limit=self.config.stages.ingest.time_limit_seconds,
        )

    def sample(self, stage: str, prompts: IngestResult) -> list[Step]:
        """One sampling stage, as ``sampling.partitions`` steps that may run at once: each samples
        its own part of the prompts into the stage's one store. Their results are cached by
        orchestrators that cache: new prompts or new weights at the same path are a new key, and
        a deleted store is sampled again."""
        from mpo.model_identity import model_fingerprint
        from mpo.sampling import stage_store

        config = self.config
        out = self.layout.samples
        kind = "closed" if stage == "correctness" else "open"
        count = config.sampling.partitions_for(stage, prompts.kinds.get(kind, 0))
        identity = {"prompts": prompts.version, "weights": model_fingerprint(config.model)}
        return [
            Step.of(
                jobs.sample_job,
                f"sample-{stage}" if count == 1 else f"sample-{stage}-{index + 1}of{count}",
                "sampling",
                kwargs={
                    "stage": stage,
                    "prompts_dir": prompts.out_dir,
                    "model": config.model,
                    **self._engine(),
                    "out": str(out),
                    "partition": (index, count),
                },
                time_limit=config.stages.sampling.time_limit_seconds,
                python=config.engine_python,
                holds_device=not config.sample_stages_together(),
                identity=identity,
                output=str(stage_store(out, stage, config.sampling, config.model)),
            )
            for index in range(count)
        ]

    def pairs(self, samples: list[StageResult], prompts: IngestResult) -> Step:
        samples_dirs = [s.out_dir for s in samples]
        out = self.layout.pairs(self.config, prompts.version, samples_dirs)
        return Step.of(
            jobs.pairs_job,
            "pairs",
            "pairs",
            kwargs={
                "samples_dirs": samples_dirs,
                "prompts_dir": prompts.out_dir,
                "out": str(out),
                "pairing": self.config.pairing,
            },
            time_limit=self.config.stages.pairs.time_limit_seconds,
            identity={},  # ``out`` names the data version: it keys the result
            output=str(out / "report.json"),
        )

    def reference(self, pairs: PairsResult) -> list[Step]:
        """Reference log-probs as ``reference_partitions`` steps over the pairs shards, kept by pair
        and reference in the run's store (``RunLayout.reference``)."""
        config = self.config
        count = config.reference_partitions
        return [
            Step.of(
                jobs.reference_job,
                "reference-logps" if count == 1 else f"reference-logps-{index + 1}of{count}",
                "ref_logps",
                kwargs={
                    "pairs_dir": pairs.out_dir,
                    "model": config.model,
                    "max_length": config.training.max_length,
                    "bf16": config.training.bf16,
                    "store": str(self.layout.reference),
                    "partition": (index, count),
                },
                time_limit=config.stages.ref_logps.time_limit_seconds,
            )
            for index in range(count)
        ]

    def trainings(self, pairs: PairsResult) -> list[TrainingPlan]:
        """MPO, then the SFT baseline when asked for, each in its own folder."""
        wanted = [("mpo", self.config.training)]
        if self.config.sft_baseline:
            wanted.append(("sft", sft_only(self.config.training)))
        return [
            TrainingPlan(name, training, self.layout.training(self.config, pairs.out_dir, training, name))
            for name, training in wanted
        ]

    def train(self, pairs: PairsResult, plan: TrainingPlan, side_by_side: bool = False) -> Step:
        """One training; ``side_by_side``: in its own process with its share of the CPU threads, so
        that it runs beside another training (``baseline_side_by_side``); otherwise it holds the
        device: one after the other in one place, each on its own worker where a runner has them."""
        return Step.of(
            jobs.train_job,
            f"train-{plan.name}",
            "train",
            kwargs={
                "pairs_dir": pairs.out_dir,
                "model": self.config.model,
                "out": str(plan.out),
                "training": plan.config,
                "eval_pairs": None,
                "torch_threads": side_by_side_threads() if side_by_side else None,
                "name": plan.name,
            },
            time_limit=self.config.stages.train.time_limit_seconds,
            own_process=side_by_side,
            holds_device=not side_by_side,
        )

    def evaluate(self, name: str, model: str, heldout: IngestResult) -> Step:
        config = self.config
        return Step.of(
            jobs.evaluate_job,
            f"evaluate-{name}",
            "evaluate",
            kwargs={
                "model": model,
                "prompts_dir": heldout.out_dir,
                "out": str(self.layout.evaluation),
                **self._engine(),
                "pairing": config.pairing,
                "max_tokens": config.eval_max_tokens,
                "name": name,
            },
            time_limit=config.stages.evaluate.time_limit_seconds,
            python=config.engine_python,
        )

    def compare(self, models: dict[str, str], heldout: IngestResult) -> Step:
        config = self.config
        return Step.of(
            jobs.compare_job,
            "compare",
            "evaluate",
            kwargs={
                "out": str(self.layout.evaluation),
                "prompts_dir": heldout.out_dir,
                "models": models,
                "sampling": config.sampling,
                "pairing": config.pairing,
                "max_tokens": config.eval_max_tokens,
            },
            time_limit=config.stages.evaluate.time_limit_seconds,
        )


class Runner(Protocol):
    """How steps run: in this process, as Prefect tasks, as deployments on a GPU pool.

    A runner runs the steps it is given and returns the jobs' results; ``run_pipeline`` decides
    what runs, on what, in which order and what runs at the same time, so every runner honours
    every field of the config."""

    def run(self, step: Step) -> Any:
        """One step; returns its job's result."""
        ...

    def run_together(self, steps: list[Step]) -> list[Any]:
        """Steps that do not depend on each other, at the same time where the runner can (never two
        ``holds_device`` steps on one device); returns their results in order."""
        ...

    def publish(self, summary: RunSummary) -> None:
        """Show the finished run (print it, or publish artifacts)."""
        ...


def run_pipeline(config: PipelineConfig, runner: Runner) -> RunSummary:
    """The whole chain under ``runner``; returns the summary, also written to ``summary.json``
    with the run's charts beside it."""
    from mpo.sampling import STAGES

    steps = Steps(config)
    layout = steps.layout
    timings: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        timings[name] = time.perf_counter() - started
        return result

    def ingest() -> tuple[IngestResult, IngestResult | None]:
        prompts = runner.run(steps.ingest(config.train_data, layout.ingested))
        if not config.evaluate or config.heldout_data is None:
            return prompts, None
        return prompts, runner.run(steps.ingest(config.heldout_data, layout.heldout))

    def train(pairs: PairsResult) -> tuple[PartitionedResult, dict[str, TrainingResult]]:
        reference = PartitionedResult.merge("reference", runner.run_together(steps.reference(pairs)))
        plans = steps.trainings(pairs)
        side_by_side = config.baseline_side_by_side and len(plans) > 1
        results = runner.run_together([steps.train(pairs, plan, side_by_side) for plan in plans])
        return reference, {plan.name: result for plan, result in zip(plans, results, strict=True)}

    def sample(prompts: IngestResult) -> list[PartitionedResult]:
        """Every partition of both stages in one group: the runner runs them at once where it can
        (``Step.holds_device`` says which may not share a device)."""
        parts = {stage: steps.sample(stage, prompts) for stage in STAGES}
        results = iter(runner.run_together([step for stage in STAGES for step in parts[stage]]))
        return [PartitionedResult.merge(stage, [next(results) for _ in parts[stage]]) for stage in STAGES]

    prompts, heldout = timed("ingest", ingest)
    sampled = timed("sampling", lambda: sample(prompts))
    pairs = timed("pairs", lambda: runner.run(steps.pairs(sampled, prompts)))
    reference, trainings = timed("training", lambda: train(pairs)) if config.train else (None, {})
    models = {"start": config.model, **{name: t.final_model for name, t in trainings.items()}}
    evaluation: dict[str, EvalResult] = {}
    comparison: dict[str, Comparison] = {}
    if heldout is not None:

        def evaluate() -> tuple[dict[str, EvalResult], dict[str, Comparison]]:
            scored = {
                name: runner.run(steps.evaluate(name, model, heldout)) for name, model in models.items()
            }
            return scored, runner.run(steps.compare(models, heldout))

        evaluation, comparison = timed("evaluation", evaluate)
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
    """Every step in this process (a step with a time limit, an engine interpreter or its own
    process in a child); steps that run together run in threads, but those that hold a device one
    after the other. No retries (a re-run resumes) and no caching beyond what each stage's folder
    holds. ``emit`` gets the jobs' events."""

    emit: Emit = field(default=lambda _event: None)

    def run(self, step: Step) -> Any:
        return step.run(self.emit)

    def run_together(self, steps: list[Step]) -> list[Any]:
        """Steps that hold a device one after the other (one machine, one device), the others at once."""
        from concurrent.futures import ThreadPoolExecutor

        shared = [step for step in steps if not step.holds_device]
        with ThreadPoolExecutor(max(1, len(shared))) as pool:
            futures = {id(step): pool.submit(self.run, step) for step in shared}
            alone = {id(step): self.run(step) for step in steps if step.holds_device}
            return [alone[id(step)] if step.holds_device else futures[id(step)].result() for step in steps]

    def publish(self, summary: RunSummary) -> None:
        for chart in sorted((Path(summary.workdir) / "plots").glob("*.png")):
            self.emit({"log": f"chart: {chart}"})


def run_local(config: PipelineConfig, on_event: Emit | None = None) -> RunSummary:
    """The whole pipeline in this process, without an orchestrator (``LocalRunner``)."""
    return run_pipeline(config, LocalRunner(on_event or (lambda _event: None)))


@dataclass(frozen=True)
class RunnerEntry:
    """A runner as ``mpo run --runner NAME`` finds it: its config model (the library's fields plus
    the runner's own settings) and how it runs the pipeline on such a config.

    Orchestrators live outside the library and offer themselves through the ``mpo.runners`` entry
    point group (the Prefect runner: ``flows.data_engine:RUNNER``, declared in pyproject.toml), so
    ``mpo/`` never imports them and works where they are not installed."""

    config_type: type[PipelineConfig]
    run: Callable[[PipelineConfig], RunSummary]


RUNNER_GROUP = "mpo.runners"
LOCAL = RunnerEntry(config_type=PipelineConfig, run=run_local)


def runner_names() -> list[str]:
    from importlib.metadata import entry_points

    return ["local", *sorted(entry.name for entry in entry_points(group=RUNNER_GROUP))]


def find_runner(name: str) -> RunnerEntry:
    """``local``, or the runner an installed package declares under ``mpo.runners``. A declared
    runner whose package's requirements are missing (Prefect) raises ``ModuleNotFoundError``."""
    from importlib.metadata import entry_points

    if name == "local":
        return LOCAL
    found = entry_points(group=RUNNER_GROUP, name=name)
    if not found:
        raise LookupError(f"no runner {name!r}; installed: {', '.join(runner_names())}")
    entry: RunnerEntry = next(iter(found)).load()
    return entry
