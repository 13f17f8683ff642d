"""One terminal line per step: what the jobs emit lands on their step's line, and nothing
shows (or costs) without a display."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mpo.progress import StepLines, current, step


def _lines() -> tuple[StepLines, io.StringIO]:
    out = io.StringIO()
    return StepLines(Console(file=out, width=140, force_terminal=False)), out


def test_each_step_gets_one_line_with_its_progress_and_latest_status() -> None:
    display, out = _lines()
    with display:
        assert current() is display
        with step("sample correctness") as emit:
            emit({"status": "loading transformers engine: tiny"})
            emit({"progress": 40.0})
            emit({"log": "correctness shard 2/5 written"})
        with step("train mpo") as emit:
            emit({"log": "mpo step 10 loss 0.6931 margin +0.0000 reward acc 0.50 " + "x" * 200})
    assert current() is None
    text = out.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 2, text
    correctness, train = lines
    assert "sample correctness" in correctness and "100%" in correctness
    assert "correctness shard 2/5 written" in correctness and "loading" not in correctness
    assert "train mpo" in train and "100%" in train and "…" in train and "x" * 100 not in train


def test_a_failed_step_says_so_on_its_line() -> None:
    display, out = _lines()
    with display, pytest.raises(RuntimeError), step("sample dropout_ntp") as emit:
        emit({"progress": 50.0})
        raise RuntimeError("a lost worker")
    text = out.getvalue()
    assert (
        "sample dropout_ntp" in text
        and "failed: RuntimeError('a lost worker')" in text
        and "100%" not in text
    )


def test_without_a_display_a_step_is_free() -> None:
    assert current() is None
    with step("pairs") as emit:
        emit({"progress": 10.0, "log": "nothing to show"})
