"""One terminal line per long step: model loads, warm-up, sampling, training, evaluation.

Jobs report through ``emit`` events (``mpo.time_limit.Emit``): ``{"progress": percent}``,
``{"status": text}`` and ``{"log": text}``. While a ``StepLines`` display is open, ``step(label)``
gives each step one line that updates in place (a bar, the latest status or log line, the
elapsed time) and stays behind when the step ends, so a run on the terminal reads as its list
of steps rather than a scroll of library logs. Outside a display, ``step`` costs nothing:
the library, tests and worker processes run without one.

The display is process-wide (``current``): the CLI opens it, and runners that call jobs in
threads (the Prefect runner's tasks) reach it without passing it through every layer.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

from mpo.time_limit import Emit

_lock = threading.Lock()
_current: StepLines | None = None


class StepLines:
    """A rich progress display with one line per step; a context manager that makes itself current."""

    def __init__(self, console: Console | None = None) -> None:
        self._bars_were: str | None = None
        # The status takes what the fixed columns leave and is cut with an ellipsis, so each step
        # stays on one line at any terminal width.
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn(
                "{task.description}", table_column=Column(width=24, no_wrap=True, overflow="ellipsis")
            ),
            BarColumn(bar_width=16),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn(
                "{task.fields[status]}",
                style="dim",
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            console=console,
            expand=True,
        )

    def __enter__(self) -> StepLines:
        global _current
        with _lock:
            _current = self
        self._library_bars(enabled=False)
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        global _current
        self.progress.stop()
        self._library_bars(enabled=True)
        with _lock:
            _current = None

    def _library_bars(self, enabled: bool) -> None:
        """The Hugging Face libraries' own bars (loading weights, writing shards) off while the step
        lines show: in this process, and through the environment in the jobs' child processes."""
        if enabled:
            if self._bars_were is None:
                os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
            else:
                os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = self._bars_were
        else:
            self._bars_were = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            if enabled and self._bars_were is None:
                transformers_logging.enable_progress_bar()
            elif not enabled:
                transformers_logging.disable_progress_bar()


def current() -> StepLines | None:
    return _current


def _status(text: str) -> str:
    return " ".join(str(text).split())  # one line, whatever the job sent


@contextmanager
def step(label: str) -> Iterator[Emit]:
    """A line for ``label`` in the current display while the block runs; yields the ``emit`` that
    feeds it. The line ends at 100% when the block returns, marked failed when it raises."""
    lines = current()
    if lines is None:
        yield lambda _event: None
        return
    progress = lines.progress
    task = progress.add_task(label, total=None, status="")

    def emit(event: dict[str, Any]) -> None:
        if "progress" in event:
            progress.update(task, total=100.0, completed=float(event["progress"]))
        for key in ("status", "log"):
            if key in event:
                progress.update(task, status=_status(event[key]))

    try:
        yield emit
    except BaseException as error:
        progress.update(task, status=f"[red]failed: {_status(repr(error))}[/red]")
        progress.stop_task(task)
        raise
    progress.update(task, total=100.0, completed=100.0)
    progress.stop_task(task)
