"""Held-out accuracy figures: the mean over datasets and its standard error."""

from __future__ import annotations

import math

import pytest

from mpo.evaluate import overall, overall_standard_error


def test_standard_error_of_the_mean_over_datasets() -> None:
    table = {"a": {"prompts": 100, "correct": 50, "accuracy": 0.5},
             "b": {"prompts": 400, "correct": 360, "accuracy": 0.9}}
    assert overall(table) == pytest.approx(0.7)
    # each dataset weighs 1/2: sqrt(0.5*0.5/100 + 0.9*0.1/400) / 2
    assert overall_standard_error(table) == pytest.approx(math.sqrt(0.0025 + 0.000225) / 2)


def test_standard_error_shrinks_with_more_prompts_and_is_zero_without_any() -> None:
    small = {"a": {"prompts": 120, "accuracy": 0.4}}
    large = {"a": {"prompts": 1200, "accuracy": 0.4}}
    assert overall_standard_error(large) == pytest.approx(overall_standard_error(small) / math.sqrt(10))
    assert overall_standard_error({}) == 0.0
    assert overall_standard_error({"a": {"prompts": 0, "accuracy": 0.0}}) == 0.0
