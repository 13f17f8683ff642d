"""The pipeline itself, apart from any orchestrator: where each stage writes, how versions are
keyed, how a run is summarised, and a plain in-process runner.

ingest -> {correctness, DropoutNTP} -> pairs -> reference log-probs -> MPO (+ SFT baseline)
-> held-out evaluation -> summary. Each stage is an ``mpo.jobs`` job; a runner decides how
it runs: ``run_local`` here, one after the other in this process (a stage with a time limit
or an engine interpreter in a child process), or the Prefect flow in ``flows/`` (tasks with
retries, caching, artifacts), which uses the same layout and summary. Every stage resumes
from what its folder holds, so any runner can pick up another's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.config import PipelineConfig
from mpo.io import atomic_write_text
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

    def write_summary(self, summary: dict[str, Any]) -> list[Path]:
        """``summary.json``, then the run's charts from it (``mpo.report``); returns the charts' paths."""
        from mpo.report import write_plots

        atomic_write_text(self.summary_file, json.dumps(summary, indent=2, default=str) + "\n")
        return write_plots(self.workdir)


def verdict(difference: float, error: float) -> str:
    """Ahead / behind only outside two standard errors: a few hundred held-out prompts leave
    points of noise, and a demo's table should not read noise as a result."""
    if abs(difference) <= 2 * error:
        return "within noise"
    return "ahead" if difference > 0 else "behind"


def render_summary(summary: dict[str, Any]) -> str:
    """The run summary as markdown (the CLI prints it; Prefect publishes it as an artifact)."""
    from mpo.evaluate import overall, overall_standard_error

    lines = ["# MPO data engine run", "", f"Work dir: `{summary['workdir']}`", ""]
    ingest = summary["ingest"]
    lines += ["## Inputs", f"{ingest['total_prompts']} prompts, {ingest['total_quarantined']} quarantined"]
    lines += [f"- {reason}: {count}" for reason, count in sorted(ingest["quarantined"].items())]
    pairs = summary["pairs"]
    lines += [
        "",
        "## Pairs",
        f"{pairs['pairs']} pairs: " + ", ".join(f"{k} {v}" for k, v in pairs["pairs_by_source"].items()),
        "",
        "| dataset | sampled accuracy | pairs |",
        "| --- | ---: | ---: |",
    ]
    for dataset, stats in pairs["datasets"].items():
        accuracy = stats.get("accuracy")
        lines.append(
            f"| {dataset} | {'-' if accuracy is None else f'{accuracy:.1%}'} | "
            f"{sum(stats.get('pairs', {}).values())} |"
        )
    if "evaluation" in summary:
        evaluation = summary["evaluation"]
        names = list(evaluation)
        datasets = sorted({d for table in evaluation.values() for d in table})
        lines += [
            "",
            "## Held-out accuracy (greedy)",
            "| dataset | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(names),
        ]
        for dataset in datasets:
            cells = [
                f"{evaluation[n][dataset]['accuracy']:.1%}" if dataset in evaluation[n] else "-"
                for n in names
            ]
            lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{overall(evaluation[n]):.1%}**" for n in names) + " |")
        lines.append(
            "| ± standard error | "
            + " | ".join(f"{overall_standard_error(evaluation[n]):.1%}" for n in names)
            + " |"
        )
        if summary.get("comparison"):
            lines += [
                "",
                "Paired differences on the same prompts (± standard error; more than two errors apart "
                "counts as ahead or behind):",
            ]
            lines += [
                f"- {pair}: {100 * c['difference']:+.1f} ± {100 * c['standard_error']:.1f} points, "
                f"{verdict(c['difference'], c['standard_error'])}"
                for pair, c in summary["comparison"].items()
            ]
    lines += ["", "## Time per stage", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in summary["timings"].items()]
    charts = sorted((Path(summary["workdir"]) / "plots").glob("*.png"))
    if charts:
        lines += ["", "## Charts", *[f"- `{chart}`" for chart in charts]]
    return "\n".join(lines) + "\n"


def run_local(config: PipelineConfig, on_event: Emit | None = None) -> dict[str, Any]:
    """The whole pipeline in this process, stage after stage, without an orchestrator.

    Stages with a hard time limit (``config.stages.<stage>.time_limit_seconds``) or an engine
    interpreter (``engine_python``) run in a child process, as under Prefect; there are no
    retries (re-running resumes) and no caching beyond what each stage's folder holds. The
    SFT baseline, when asked for, trains after MPO. Returns the run summary, also written to
    ``summary.json``.
    """
    from mpo import jobs
    from mpo.evaluate import compare_models
    from mpo.sampling import STAGES

    emit: Emit = on_event or (lambda _event: None)
    layout = RunLayout(Path(config.workdir))
    stages = config.stages
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"workdir": str(layout.workdir)}

    def run(job: Any, limit: float | None, python: str | None = None, **kwargs: Any) -> Any:
        return call_with_time_limit(job, kwargs, limit, emit, python=python)

    started = time.perf_counter()
    prompts = run(
        jobs.ingest_job,
        None,
        source=str(config.train_data),
        out=str(layout.ingested),
        strict=config.strict_ingest,
    )
    heldout = (
        run(
            jobs.ingest_job,
            None,
            source=str(config.heldout_data),
            out=str(layout.heldout),
            strict=config.strict_ingest,
        )
        if config.evaluate and config.heldout_data
        else None
    )
    timings["ingest"] = time.perf_counter() - started
    summary["ingest"] = prompts

    started = time.perf_counter()
    sampled = [
        run(
            jobs.sample_job,
            stages.sampling.time_limit_seconds,
            config.engine_python,
            stage=stage,
            prompts_dir=prompts["prompts_dir"],
            model=config.model,
            engine=config.engine,
            engine_options=config.engine_options,
            sampling=config.sampling,
            out=str(layout.samples),
        )
        for stage in STAGES
    ]
    timings["sampling"] = time.perf_counter() - started
    summary["sampling"] = sampled

    started = time.perf_counter()
    pairs_dir = layout.pairs(config, prompts["version"], [s["samples_dir"] for s in sampled])
    pairs = run(
        jobs.pairs_job,
        None,
        samples_dirs=[s["samples_dir"] for s in sampled],
        prompts_dir=prompts["prompts_dir"],
        out=str(pairs_dir),
        pairing=config.pairing,
    )
    timings["pairs"] = time.perf_counter() - started
    summary["pairs"] = pairs["report"]
    summary["data_version"] = pairs_dir.name

    models = {"start": config.model}
    if config.train:
        started = time.perf_counter()
        run(
            jobs.reference_job,
            stages.ref_logps.time_limit_seconds,
            pairs_dir=str(pairs_dir),
            model=config.model,
            max_length=config.training.max_length,
            bf16=config.training.bf16,
        )
        timings["reference log-probs"] = time.perf_counter() - started
        trainings = [(config.training, "mpo")] + (
            [(sft_only(config.training), "sft")] if config.sft_baseline else []
        )
        for training, name in trainings:
            started = time.perf_counter()
            trained = run(
                jobs.train_job,
                stages.train.time_limit_seconds,
                pairs_dir=str(pairs_dir),
                model=config.model,
                out=str(layout.training(config, str(pairs_dir), training, name)),
                training=training,
                eval_pairs=None,
            )
            timings[f"{name.upper()} training"] = time.perf_counter() - started
            models[name] = trained["final_model"]
            if name == "mpo":
                summary["training"] = trained

    summary["models"] = models
    if heldout is not None:
        started = time.perf_counter()
        summary["evaluation"] = {
            name: run(
                jobs.evaluate_job,
                stages.evaluate.time_limit_seconds,
                config.engine_python,
                model=model,
                prompts_dir=heldout["prompts_dir"],
                out=str(layout.evaluation),
                engine=config.engine,
                engine_options=config.engine_options,
                sampling=config.sampling,
                pairing=config.pairing,
                max_tokens=config.eval_max_tokens,
            )
            for name, model in models.items()
        }
        summary["comparison"] = compare_models(
            layout.evaluation,
            heldout["prompts_dir"],
            models,
            config.sampling,
            config.pairing,
            config.eval_max_tokens,
        )
        timings["evaluation"] = time.perf_counter() - started
    summary["timings"] = timings
    for plot in layout.write_summary(summary):
        emit({"log": f"chart: {plot}"})
    return summary
