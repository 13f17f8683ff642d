"""Held-out accuracy: greedy answers to closed prompts, judged by the pairing verifiers.

Evaluation is the correctness stage with one greedy sample per prompt (same CoT
templates, same answer extraction, same per-dataset verifiers), so a model is scored
exactly the way its training data was made. Samples land under ``out`` in a folder
keyed by model and config like any stage, so re-evaluating a model is free.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from mpo.answers import Verdict
from mpo.engines.base import Engine
from mpo.pairs import PairingConfig, judge_samples
from mpo.results import DatasetAccuracy
from mpo.sampling import SamplingConfig, read_prompts, read_stage_samples, run_stage, stage_store

# Paired differences the run summary reports, when both models were evaluated.
COMPARISONS = (("mpo", "start"), ("sft", "start"), ("mpo", "sft"))


def greedy_config(sampling: SamplingConfig, max_tokens: int) -> SamplingConfig:
    return sampling.model_copy(update={"n": 1, "temperature": 0.0, "max_tokens": max_tokens})


def accuracy_table(samples: pl.DataFrame, pairing: PairingConfig) -> dict[str, DatasetAccuracy]:
    """Per dataset: prompts, correct, format failures and accuracy (correct / prompts)."""
    judged = judge_samples(samples, pairing)
    stats = (
        judged.group_by("dataset")
        .agg(
            prompts=pl.len(),
            correct=(pl.col("verdict") == Verdict.CORRECT.value).sum(),
            format_failures=(pl.col("verdict") == Verdict.FORMAT_FAILURE.value).sum(),
        )
        .sort("dataset")
    )
    return {
        row.pop("dataset"): DatasetAccuracy(**row, accuracy=row["correct"] / row["prompts"])
        for row in stats.iter_rows(named=True)
    }


def evaluation_store(out: Path | str, model: str, sampling: SamplingConfig, max_tokens: int = 256) -> Path:
    """The folder under ``out`` where ``greedy_samples`` keeps ``model``'s answers: found from the
    model's path and the config alone, so reading back an evaluation loads no model."""
    return stage_store(out, "correctness", greedy_config(sampling, max_tokens), model)


def greedy_samples(
    engine: Engine, prompts_dir: Path | str, out: Path | str, sampling: SamplingConfig, max_tokens: int = 256
) -> pl.DataFrame:
    """One greedy answer of ``engine``'s model per closed prompt in ``prompts_dir`` (one row each)."""
    report = run_stage("correctness", prompts_dir, engine, out, greedy_config(sampling, max_tokens))
    return read_stage_samples(report.out_dir, read_prompts(prompts_dir))


def evaluate_accuracy(
    engine: Engine,
    prompts_dir: Path | str,
    out: Path | str,
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int = 256,
) -> dict[str, DatasetAccuracy]:
    """Greedy accuracy of ``engine``'s model on the closed prompts in ``prompts_dir``, per dataset."""
    samples = greedy_samples(engine, prompts_dir, out, sampling, max_tokens)
    if samples.height == 0:
        return {}
    return accuracy_table(samples, pairing)


def overall(table: dict[str, DatasetAccuracy]) -> float:
    """Mean of the per-dataset accuracies (each dataset weighs the same)."""
    return sum(row.accuracy for row in table.values()) / len(table) if table else 0.0


def overall_standard_error(table: dict[str, DatasetAccuracy]) -> float:
    """Standard error of ``overall`` from the finite held-out sample (binomial per dataset).

    Why: a few hundred held-out prompts leave a few points of noise, so two models whose
    means differ by about that much are not told apart; the summary prints it beside the mean.
    """
    if not table:
        return 0.0
    return math.sqrt(sum(row.standard_error**2 for row in table.values())) / len(table)


def correct_per_prompt(samples: pl.DataFrame, pairing: PairingConfig) -> pl.DataFrame:
    """prompt_id, dataset, gold answer, the model's answer (``said``) and whether it is
    correct (0/1), one row per greedy sample."""
    return judge_samples(samples, pairing).select(
        "prompt_id",
        "dataset",
        "answer",
        said="extracted",
        correct=(pl.col("verdict") == Verdict.CORRECT.value).cast(pl.Float64),
    )


def evaluated_prompts(
    out: Path | str,
    prompts_dir: Path | str,
    model: str,
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int = 256,
) -> pl.DataFrame:
    """``correct_per_prompt`` of a model that ``evaluate_accuracy`` already scored, read back
    from its store (same ``out``, config and ``max_tokens``)."""
    store = evaluation_store(out, model, sampling, max_tokens)
    if not store.is_dir():
        raise FileNotFoundError(f"{model}: no evaluation under {out} for this config (expected {store})")
    return correct_per_prompt(read_stage_samples(store, read_prompts(prompts_dir)), pairing)


def mean_and_error(frame: pl.DataFrame, column: str) -> tuple[float, float]:
    """Mean of ``column`` over datasets (each weighs the same, like ``overall``) and its
    standard error from the per-dataset sample variances."""
    stats = frame.group_by("dataset").agg(
        mean=pl.col(column).mean(), var=pl.col(column).var().fill_null(0.0), n=pl.len()
    )
    if stats.height == 0:
        return 0.0, 0.0
    mean = float(stats["mean"].sum()) / stats.height
    error = math.sqrt(sum(v / n for v, n in zip(stats["var"], stats["n"], strict=True))) / stats.height
    return mean, error


def paired_difference(first: pl.DataFrame, second: pl.DataFrame) -> tuple[float, float]:
    """``first``'s mean accuracy minus ``second``'s (``correct_per_prompt`` frames of the same
    prompts) and its paired standard error.

    Why: two models answer the same held-out prompts, so most of each mean's noise (which
    prompts happened to be drawn) is shared; the error of the per-prompt differences is what
    says whether one model is ahead, and it is well under the two means' errors combined.
    """
    joined = first.select("prompt_id", "dataset", first="correct").join(
        second.select("prompt_id", second="correct"), on="prompt_id", how="inner"
    )
    if not joined.height == first.height == second.height:
        raise ValueError(
            f"paired difference needs the same prompts, one answer each: {first.height} and "
            f"{second.height} rows, {joined.height} in common"
        )
    return mean_and_error(joined.with_columns(difference=pl.col("first") - pl.col("second")), "difference")


def compare_models(
    out: Path | str,
    prompts_dir: Path | str,
    models: dict[str, str],
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int = 256,
) -> dict[str, dict[str, float]]:
    """Paired differences (``COMPARISONS``) between evaluated models, keyed ``"mpo - sft"``:
    ``difference`` and ``standard_error`` as fractions."""
    pairs = [(first, second) for first, second in COMPARISONS if first in models and second in models]
    scores = {
        name: evaluated_prompts(out, prompts_dir, models[name], sampling, pairing, max_tokens)
        for name in sorted({name for pair in pairs for name in pair})
    }
    return {
        f"{first} - {second}": dict(
            zip(
                ("difference", "standard_error"),
                paired_difference(scores[first], scores[second]),
                strict=True,
            )
        )
        for first, second in pairs
    }
