"""Held-out accuracy figures: the mean over datasets, its standard error, paired differences."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mpo.evaluate import mean_and_error, overall, overall_standard_error, paired_difference
from mpo.results import DatasetAccuracy


def test_standard_error_of_the_mean_over_datasets() -> None:
    table = {
        "a": DatasetAccuracy(prompts=100, correct=50, accuracy=0.5),
        "b": DatasetAccuracy(prompts=400, correct=360, accuracy=0.9),
    }
    assert overall(table) == pytest.approx(0.7)
    # each dataset weighs 1/2: sqrt(0.5*0.5/100 + 0.9*0.1/400) / 2
    assert overall_standard_error(table) == pytest.approx(math.sqrt(0.0025 + 0.000225) / 2)


def test_standard_error_shrinks_with_more_prompts_and_is_zero_without_any() -> None:
    small = {"a": DatasetAccuracy(prompts=120, correct=48, accuracy=0.4)}
    large = {"a": DatasetAccuracy(prompts=1200, correct=480, accuracy=0.4)}
    assert overall_standard_error(large) == pytest.approx(overall_standard_error(small) / math.sqrt(10))
    assert overall_standard_error({}) == 0.0
    assert overall_standard_error({"a": DatasetAccuracy(prompts=0, correct=0, accuracy=0.0)}) == 0.0


def scored(correct: dict[str, list[float]]) -> pl.DataFrame:
    """A ``correct_per_prompt``-shaped frame: prompts ``{dataset}-{i}`` with the given 0/1 scores."""
    return pl.DataFrame(
        [
            {"prompt_id": f"{dataset}-{i}", "dataset": dataset, "correct": value}
            for dataset, values in correct.items()
            for i, value in enumerate(values)
        ]
    )


def test_paired_difference_is_the_mean_of_per_prompt_differences_with_their_error() -> None:
    first = scored({"a": [1, 1, 0, 0], "b": [1, 1, 1, 1]})
    second = scored({"a": [1, 0, 0, 0], "b": [0, 1, 1, 1]})
    difference, error = paired_difference(first, second)
    # per dataset: a differs by [0, 1, 0, 0] (mean 1/4, var 1/4), b by [1, 0, 0, 0] (same)
    assert difference == pytest.approx(0.25)
    assert error == pytest.approx(math.sqrt(0.25 / 4 + 0.25 / 4) / 2)
    # the paired error is well under the two means' errors combined: most of the noise is shared
    unpaired = math.hypot(mean_and_error(first, "correct")[1], mean_and_error(second, "correct")[1])
    assert error < unpaired
    assert paired_difference(first, first) == (0.0, 0.0)


def test_paired_difference_refuses_models_scored_on_different_prompts() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(scored({"a": [1, 0, 1]}), scored({"a": [1, 0]}))


def test_compare_models_reads_back_the_evaluations_and_names_a_model_never_evaluated(
    hf_engine: Any, tiny_model_dir: Path, prompts_dir: Path, tmp_path: Path
) -> None:
    from mpo.evaluate import compare_models, evaluate_accuracy
    from mpo.pairs import PairingConfig
    from mpo.sampling import SamplingConfig
    from mpo.synth import VERIFY_MODES

    sampling, pairing = SamplingConfig(prompts_per_shard=16), PairingConfig(verify_modes=VERIFY_MODES)
    table = evaluate_accuracy(hf_engine, prompts_dir, tmp_path, sampling, pairing, max_tokens=8)
    assert sum(row.prompts for row in table.values()) == 40  # the closed prompts, one answer each
    model = str(tiny_model_dir)
    # one model under two names: the same answers, so no difference; no sft, so no pair with it
    assert compare_models(tmp_path, prompts_dir, {"start": model, "mpo": model}, sampling, pairing, 8) == {
        "mpo - start": {"difference": 0.0, "standard_error": 0.0}
    }
    with pytest.raises(FileNotFoundError, match="no evaluation"):
        compare_models(tmp_path, prompts_dir, {"start": model, "mpo": model}, sampling, pairing, 16)
