"""Hard time limits: a stage in a child process is killed at its limit, whatever it is doing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mpo.time_limit import ChildProcessDied, StageTimeout, call_with_time_limit


def stuck(pid_file: str, emit: Any) -> None:
    """Stands in for a hung CUDA call: ignores SIGTERM and never returns to Python code that could time out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    emit({"log": "started"})
    while True:
        time.sleep(0.1)


def counts(n: int, emit: Any) -> int:
    for i in range(n):
        emit({"progress": 100.0 * (i + 1) / n})
    return n * 2


def rejects_input(emit: Any) -> None:
    raise ValueError("row 3: field 'answer' is missing")


def dies(emit: Any) -> None:
    os._exit(9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_stuck_stage_is_killed_at_its_limit(tmp_path: Path) -> None:
    events: list[Any] = []
    started = time.monotonic()
    with pytest.raises(StageTimeout, match="hard limit of 3 s"):
        call_with_time_limit(stuck, {"pid_file": str(tmp_path / "pid")}, 3, events.append, grace_seconds=1)
    assert time.monotonic() - started < 15
    assert events == [{"log": "started"}]
    pid = int((tmp_path / "pid").read_text())
    assert not _alive(pid), "the child survived its limit"
    assert isinstance(StageTimeout("x"), TimeoutError)  # transient: the retry condition retries it


def test_events_and_result_come_back_from_the_child() -> None:
    events: list[Any] = []
    assert call_with_time_limit(counts, {"n": 4}, 60, events.append) == 8
    assert [e["progress"] for e in events] == [25.0, 50.0, 75.0, 100.0]


def pid(emit: Any) -> int:
    return os.getpid()


def test_without_a_limit_the_job_runs_in_process() -> None:
    events: list[Any] = []
    assert call_with_time_limit(counts, {"n": 2}, None, events.append) == 4 and len(events) == 2
    assert call_with_time_limit(pid, {}, None) == os.getpid()


def test_own_process_without_a_limit_runs_in_a_child() -> None:
    """Two Python-bound jobs side by side (MPO and its SFT baseline) each need an interpreter."""
    events: list[Any] = []
    assert call_with_time_limit(pid, {}, None, own_process=True) != os.getpid()
    assert (
        call_with_time_limit(counts, {"n": 2}, None, events.append, own_process=True) == 4
        and len(events) == 2
    )


def test_a_child_error_keeps_its_type_so_bad_input_is_not_retried() -> None:
    with pytest.raises(ValueError, match="field 'answer'") as raised:
        call_with_time_limit(rejects_input, {}, 60)
    assert any("child process" in note for note in raised.value.__notes__)


def test_a_vanished_child_is_reported() -> None:
    with pytest.raises(ChildProcessDied, match="exited with code 9"):
        call_with_time_limit(dies, {}, 60)


def leaves_with_a_slow_exit_handler(marker: str, emit: Any) -> str:
    """Registers an exit handler that runs as the child shuts down, after its result is sent
    (multiprocessing's own finalizers unregister semaphores the same way)."""
    from multiprocessing import util

    def write_marker() -> None:
        time.sleep(0.5)
        Path(marker).write_text("clean exit")

    util.Finalize(None, write_marker, exitpriority=10)
    return "done"


def test_a_child_that_answered_is_left_to_exit_on_its_own(tmp_path: Path) -> None:
    marker = tmp_path / "exited"
    result = call_with_time_limit(
        leaves_with_a_slow_exit_handler, {"marker": str(marker)}, 60, grace_seconds=10
    )
    assert result == "done"
    assert marker.read_text() == "clean exit", "the child was terminated while it shut down"


class EngineOnlyError(Exception):
    """Stands in for an exception class that exists only in the engine's environment."""

    def __reduce__(self) -> Any:
        return (_missing_class, ())


def _missing_class() -> None:
    raise ModuleNotFoundError("No module named 'vllm'")


def raises_engine_error(emit: Any) -> None:
    raise EngineOnlyError("engine core died")


@pytest.fixture
def importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another interpreter imports the job by module name: let it find this test module."""
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def test_another_interpreter_runs_the_job_with_events_result_and_error_types(importable_tests: None) -> None:
    """``python=``: the job runs under the given interpreter (an engine's environment), not multiprocessing."""
    import sys

    events: list[Any] = []
    assert call_with_time_limit(counts, {"n": 2}, None, events.append, python=sys.executable) == 4
    assert [e["progress"] for e in events] == [50.0, 100.0]
    assert call_with_time_limit(pid, {}, None, python=sys.executable) != os.getpid()
    with pytest.raises(ValueError, match="field 'answer'"):
        call_with_time_limit(rejects_input, {}, None, python=sys.executable)
    with pytest.raises(RuntimeError, match="EngineOnlyError: engine core died") as raised:
        call_with_time_limit(raises_engine_error, {}, None, python=sys.executable)
    assert any("raise EngineOnlyError" in note for note in raised.value.__notes__)
    with pytest.raises(ChildProcessDied, match="exited with code 9"):
        call_with_time_limit(dies, {}, 60, python=sys.executable)


def test_another_interpreter_is_killed_at_its_limit(importable_tests: None, tmp_path: Path) -> None:
    import sys

    with pytest.raises(StageTimeout, match="hard limit of 3 s"):
        call_with_time_limit(
            stuck, {"pid_file": str(tmp_path / "pid")}, 3, grace_seconds=1, python=sys.executable
        )
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_a_missing_interpreter_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot start the stage's interpreter"):
        call_with_time_limit(counts, {"n": 1}, None, python=str(tmp_path / "no-python"))
