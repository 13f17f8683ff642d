"""What each stage returns and what a run adds up to.

Every stage job returns a ``StageResult`` (or a subclass with what only that stage has):
where it wrote, what it counted, what it dropped and why, and how long it took. A run's
``RunSummary`` holds them all, renders itself as markdown (the CLI prints it, Prefect
publishes it) and round-trips through ``summary.json``, so scripts and the report read
fields by name, not by string keys of nested dicts. pydantic models pickle, so the same
objects come back from a child process, an engine interpreter or a cached Prefect result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mpo.io import atomic_write_text


class DatasetPairStats(BaseModel):
    """One dataset's line of a pairing: its prompts and samples, how often its closed prompts' samples
    were right, the pairs it gave per source, and what was filtered, by reason."""

    prompts: int = 0
    samples: int = 0
    accuracy: float | None = Field(None, description="correct / judged samples; None: no closed prompts")
    format_failures: int | None = None
    all_correct_prompts: int | None = None
    all_wrong_prompts: int | None = None
    pairs: dict[str, int] = Field(default_factory=dict, description="per source")
    filtered: dict[str, int] = Field(default_factory=dict, description="samples or pairs, per reason")


class PairingReport(BaseModel):
    """What ``mpo pairs`` did (its ``report.json``): per dataset, and the pairs per source."""

    datasets: dict[str, DatasetPairStats] = Field(default_factory=dict)
    pairs: int = 0
    pairs_by_source: dict[str, int] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="the PairingConfig it ran with")

    def drops(self) -> dict[str, int]:
        """Filtered samples and pairs by reason, over every dataset."""
        totals: dict[str, int] = {}
        for stats in self.datasets.values():
            for reason, count in stats.filtered.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals


class DatasetAccuracy(BaseModel):
    """One dataset's greedy held-out accuracy: one answer per prompt."""

    prompts: int
    correct: int
    format_failures: int = 0
    accuracy: float = Field(description="correct / prompts")

    @property
    def standard_error(self) -> float:
        """Binomial standard error of ``accuracy`` over this many prompts."""
        return (self.accuracy * (1 - self.accuracy) / self.prompts) ** 0.5 if self.prompts else 0.0


class StageResult(BaseModel):
    """One stage's outcome: its output folder, counts by name, drops by reason, seconds of work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    out_dir: str
    counts: dict[str, int] = Field(default_factory=dict)
    drops: dict[str, int] = Field(default_factory=dict, description="rows left out, by reason")
    seconds: float = 0.0
    worker: str = Field("", description="where it ran: host and CUDA_VISIBLE_DEVICES (``worker_name``)")
    attempts: int = Field(1, ge=1, description="runs it took: more than one after a retried failure")


def worker_name() -> str:
    """This process's worker as a GPU pool sees it: the host and the devices it was given."""
    import os
    import socket

    return f"{socket.gethostname()} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


class PartitionedResult(StageResult):
    """A stage cut into partitions (sampling, reference log-probs): its counts summed over them,
    each partition's own result kept (where it ran, how many attempts it took)."""

    partitions: list[StageResult] = Field(default_factory=list)

    @classmethod
    def merge(cls, stage: str, parts: list[StageResult]) -> PartitionedResult:
        """The stage's result from its partitions' (``correctness:2/4``: all of one stage, one store)."""
        counts: dict[str, int] = {}
        drops: dict[str, int] = {}
        for part in parts:
            for name, value in part.counts.items():
                counts[name] = counts.get(name, 0) + value
            for reason, value in part.drops.items():
                drops[reason] = drops.get(reason, 0) + value
        return cls(
            stage=stage,
            out_dir=parts[0].out_dir,
            counts=counts,
            drops=drops,
            seconds=max(part.seconds for part in parts),
            worker=", ".join(sorted({part.worker for part in parts})),
            attempts=max(part.attempts for part in parts),
            partitions=parts if len(parts) > 1 else [],
        )

    def workers(self) -> set[str]:
        return {part.worker for part in self.partitions} or {self.worker}

    def retried(self) -> list[StageResult]:
        return [part for part in self.partitions if part.attempts > 1]


class IngestResult(StageResult):
    """The prompts table: ``out_dir`` is the prompts folder; drops are quarantined rows by reason."""

    version: str = Field(description="content hash of the prompt set: a new prompt, a new version")
    prompts_by_dataset: dict[str, int] = Field(default_factory=dict)
    kinds: dict[str, int] = Field(default_factory=dict, description="closed / open prompts")


class PairsResult(StageResult):
    """The preference pairs of one data version; drops are samples and pairs filtered, by reason."""

    pairs_by_source: dict[str, int] = Field(default_factory=dict)
    datasets: dict[str, DatasetPairStats] = Field(default_factory=dict)

    @property
    def version(self) -> str:
        return Path(self.out_dir).name


class ReferenceResult(StageResult):
    """Reference log-probs written into a pairs version (or the part of its shards a partition
    holds); counts: ``shards`` written, ``skipped_shards`` done before, ``pairs_computed`` here and
    ``pairs_from_store``; drops: ``too_long`` pairs (training skips them too)."""

    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="the reference the values belong to: model fingerprint, precision, max length",
    )


class TrainingResult(StageResult):
    """One training run (``stage``: ``train:mpo`` or ``train:sft``); ``out_dir`` its folder."""

    final_model: str
    metrics_file: str
    first: dict[str, float] = Field(default_factory=dict, description="metrics of the first step")
    last: dict[str, float] = Field(default_factory=dict, description="metrics of the last step")
    resumed_from: int = Field(0, description="the checkpoint step this run resumed from (0: fresh)")
    evaluation: dict[str, float] = Field(
        default_factory=dict, description="reward metrics on the held-out pairs (eval_pairs), at the end"
    )


class EvalResult(StageResult):
    """Greedy held-out accuracy of one model (``stage``: ``evaluate:<name>``), per dataset."""

    model: str
    by_dataset: dict[str, DatasetAccuracy] = Field(default_factory=dict)

    @property
    def mean(self) -> float:
        from mpo.evaluate import overall

        return overall(self.by_dataset)

    @property
    def standard_error(self) -> float:
        from mpo.evaluate import overall_standard_error

        return overall_standard_error(self.by_dataset)


def shape_version() -> str:
    """A hash of the stage results' schemas. Orchestrators that cache results as pickled objects key
    on it, so that results of another shape (an older version of this package) miss the cache
    instead of coming back with fields missing."""
    models = (
        StageResult,
        PartitionedResult,
        IngestResult,
        PairsResult,
        ReferenceResult,
        TrainingResult,
        EvalResult,
    )
    schemas = [model.model_json_schema() for model in models]
    return hashlib.sha256(json.dumps(schemas, sort_keys=True).encode()).hexdigest()[:12]


class Comparison(BaseModel):
    """A paired difference of two models' mean accuracy on the same prompts (fractions)."""

    model_config = ConfigDict(frozen=True)

    difference: float
    standard_error: float

    @property
    def verdict(self) -> str:
        return verdict(self.difference, self.standard_error)


def verdict(difference: float, error: float) -> str:
    """Ahead / behind only outside two standard errors: a few hundred held-out prompts leave
    points of noise, and a demo's table should not read noise as a result."""
    if abs(difference) <= 2 * error:
        return "within noise"
    return "ahead" if difference > 0 else "behind"


class RunSummary(BaseModel):
    """A whole run: every stage's result, the models scored, their comparison, time per step."""

    model_config = ConfigDict(extra="forbid")

    workdir: str
    ingest: IngestResult
    heldout: IngestResult | None = None
    sampling: list[PartitionedResult]
    pairs: PairsResult
    reference: PartitionedResult | None = None
    trainings: dict[str, TrainingResult] = Field(default_factory=dict, description="by name: mpo, sft")
    models: dict[str, str] = Field(description="the models scored, by name: start, mpo, sft")
    evaluation: dict[str, EvalResult] = Field(default_factory=dict)
    comparison: dict[str, Comparison] = Field(default_factory=dict, description='keyed "mpo - sft"')
    timings: dict[str, float] = Field(default_factory=dict, description="wall seconds per pipeline step")

    @property
    def data_version(self) -> str:
        return self.pairs.version

    def stages(self) -> list[StageResult]:
        """Every stage result in pipeline order."""
        return [
            self.ingest,
            *([self.heldout] if self.heldout else []),
            *self.sampling,
            self.pairs,
            *([self.reference] if self.reference else []),
            *self.trainings.values(),
            *self.evaluation.values(),
        ]

    def write(self, path: Path | str) -> None:
        atomic_write_text(Path(path), self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path | str) -> RunSummary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no run summary (is {path.parent} a finished run's work folder?)"
            )
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path}: not a run summary of this version ({error})") from None

    def render(self) -> str:
        """The summary as markdown."""
        lines = ["# MPO data engine run", "", f"Work dir: `{self.workdir}`", ""]
        quarantined = sum(self.ingest.drops.values())
        lines += ["## Inputs", f"{self.ingest.counts.get('prompts', 0)} prompts, {quarantined} quarantined"]
        lines += [f"- {reason}: {count}" for reason, count in sorted(self.ingest.drops.items())]
        lines += [
            "",
            "## Pairs",
            f"{self.pairs.counts.get('pairs', 0)} pairs (data version `{self.data_version}`): "
            + ", ".join(f"{k} {v}" for k, v in self.pairs.pairs_by_source.items()),
            "",
            "| dataset | sampled accuracy | pairs |",
            "| --- | ---: | ---: |",
        ]
        for dataset, stats in self.pairs.datasets.items():
            accuracy = stats.accuracy
            lines.append(
                f"| {dataset} | {'-' if accuracy is None else f'{accuracy:.1%}'} | "
                f"{sum(stats.pairs.values())} |"
            )
        lines += self._render_partitions()
        if self.evaluation:
            lines += self._render_evaluation()
        lines += ["", "## Stages", "| stage | counts | dropped | seconds |", "| --- | --- | --- | ---: |"]
        for result in self.stages():
            counts = ", ".join(f"{k} {v}" for k, v in result.counts.items()) or "-"
            drops = ", ".join(f"{k} {v}" for k, v in sorted(result.drops.items())) or "-"
            lines.append(f"| {result.stage} | {counts} | {drops} | {result.seconds:.1f} |")
        lines += ["", "## Time per step", "| step | seconds |", "| --- | ---: |"]
        lines += [f"| {step} | {seconds:.1f} |" for step, seconds in self.timings.items()]
        charts = sorted((Path(self.workdir) / "plots").glob("*.png"))
        if charts:
            lines += ["", "## Charts", *[f"- `{chart}`" for chart in charts]]
        gallery = Path(self.workdir) / "pairs.html"
        if gallery.is_file():
            lines += [
                "",
                f"Pairs with their images, to open in a browser: `{gallery}` (`mpo view` draws others).",
            ]
        return "\n".join(lines) + "\n"

    def _render_partitions(self) -> list[str]:
        """Where the stages cut into partitions ran: how many parts, on how many workers, retries."""
        parted = [
            stage for stage in [*self.sampling, self.reference] if stage is not None and stage.partitions
        ]
        if not parted:
            return []
        lines = [
            "",
            "## Partitions",
            "| stage | partitions | workers | retried |",
            "| --- | ---: | ---: | --- |",
        ]
        for stage in parted:
            retried = ", ".join(f"{part.stage} ({part.attempts} attempts)" for part in stage.retried()) or "-"
            lines.append(f"| {stage.stage} | {len(stage.partitions)} | {len(stage.workers())} | {retried} |")
        return lines

    def _render_evaluation(self) -> list[str]:
        names = list(self.evaluation)
        datasets = sorted({d for result in self.evaluation.values() for d in result.by_dataset})
        lines = [
            "",
            "## Held-out accuracy (greedy)",
            "| dataset | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(names),
        ]
        for dataset in datasets:
            cells = [
                f"{self.evaluation[n].by_dataset[dataset].accuracy:.1%}"
                if dataset in self.evaluation[n].by_dataset
                else "-"
                for n in names
            ]
            lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{self.evaluation[n].mean:.1%}**" for n in names) + " |")
        lines.append(
            "| ± standard error | "
            + " | ".join(f"{self.evaluation[n].standard_error:.1%}" for n in names)
            + " |"
        )
        if self.comparison:
            lines += [
                "",
                "Paired differences on the same prompts (± standard error; more than two errors apart "
                "counts as ahead or behind):",
            ]
            lines += [
                f"- {pair}: {100 * c.difference:+.1f} ± {100 * c.standard_error:.1f} points, {c.verdict}"
                for pair, c in self.comparison.items()
            ]
        return lines
