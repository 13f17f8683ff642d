"""Held-out accuracy: greedy answers to closed prompts, judged by the pairing verifiers.

Evaluation is the correctness stage with one greedy sample per prompt (same CoT
templates, same answer extraction, same per-dataset verifiers), so a model is scored
exactly the way its training data was made. Samples land under ``out`` in a folder
keyed by model and config like any stage, so re-evaluating a model is free.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl

from mpo.answers import Verdict
from mpo.engines.base import Engine
from mpo.pairs import PairingConfig, judge_samples
from mpo.sampling import SamplingConfig, read_prompts, read_stage_samples, run_stage


def greedy_config(sampling: SamplingConfig, max_tokens: int) -> SamplingConfig:
    return sampling.model_copy(update={"n": 1, "temperature": 0.0, "max_tokens": max_tokens})


def accuracy_table(samples: pl.DataFrame, pairing: PairingConfig) -> dict[str, dict[str, Any]]:
    """Per dataset: prompts, correct, format failures and accuracy (correct / prompts)."""
    judged = judge_samples(samples, pairing)
    stats = (judged.group_by("dataset")
             .agg(prompts=pl.len(),
                  correct=(pl.col("verdict") == Verdict.CORRECT.value).sum(),
                  format_failures=(pl.col("verdict") == Verdict.FORMAT_FAILURE.value).sum())
             .sort("dataset"))
    return {row["dataset"]: {**row, "accuracy": row["correct"] / row["prompts"]} for row in stats.iter_rows(named=True)}


def greedy_samples(engine: Engine, prompts_dir: Path | str, out: Path | str, sampling: SamplingConfig,
                   max_tokens: int = 256) -> pl.DataFrame:
    """One greedy answer of ``engine``'s model per closed prompt in ``prompts_dir`` (one row each)."""
    report = run_stage("correctness", prompts_dir, engine, out, greedy_config(sampling, max_tokens))
    return read_stage_samples(report.out_dir, read_prompts(prompts_dir))


def evaluate_accuracy(engine: Engine, prompts_dir: Path | str, out: Path | str, sampling: SamplingConfig,
                      pairing: PairingConfig, max_tokens: int = 256) -> dict[str, dict[str, Any]]:
    """Greedy accuracy of ``engine``'s model on the closed prompts in ``prompts_dir``, per dataset."""
    samples = greedy_samples(engine, prompts_dir, out, sampling, max_tokens)
    if samples.height == 0:
        return {}
    return accuracy_table(samples, pairing)


def overall(table: dict[str, dict[str, Any]]) -> float:
    """Mean of the per-dataset accuracies (each dataset weighs the same)."""
    return sum(row["accuracy"] for row in table.values()) / len(table) if table else 0.0


def overall_standard_error(table: dict[str, dict[str, Any]]) -> float:
    """Standard error of ``overall`` from the finite held-out sample (binomial per dataset).

    Why: a few hundred held-out prompts leave a few points of noise, so two models whose
    means differ by about that much are not told apart; the summary prints it beside the mean.
    """
    if not table:
        return 0.0
    variance = sum(row["accuracy"] * (1 - row["accuracy"]) / row["prompts"] for row in table.values() if row["prompts"])
    return math.sqrt(variance) / len(table)
