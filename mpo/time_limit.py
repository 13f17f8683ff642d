"""Hard time limits: run a stage in a child process and kill it when its time is up.

A thread-based timeout (what Prefect's ``timeout_seconds`` does) cannot interrupt a
CUDA kernel or a hung NCCL collective: the Python thread never gets control back. A
process can always be killed, and killing it frees its GPU memory, so GPU stages that
must not hang a worker forever run through ``call_with_time_limit``. Stages resume
from their shards and checkpoints, so a killed attempt loses at most its unfinished
unit of work and a retry picks up from there.

The child reports back through a pipe: events (progress, log lines) while it runs, then
its result or its exception, re-raised in the parent with its own type so that error
handling (never retrying bad input) works the same as in-process.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]


class StageTimeout(TimeoutError):
    """The stage ran past its hard limit and its process was killed (transient: retry it)."""


class ChildProcessDied(RuntimeError):
    """The stage's process ended without a result (killed by the OOM killer, a segfault, ...)."""


def _ignore(_event: Any) -> None:
    return None


def _child(connection: Connection, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        result = fn(**kwargs, emit=lambda event: connection.send(("event", event)))
        connection.send(("result", result))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        text = traceback.format_exc()
        try:
            connection.send(("error", error, text))
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its text
            connection.send(("error", RuntimeError(f"{type(error).__name__}: {error}"), text))
    finally:
        connection.close()


def call_with_time_limit(fn: Callable[..., T], kwargs: dict[str, Any], seconds: float | None,
                         on_event: Emit | None = None, grace_seconds: float = 10.0, own_process: bool = False) -> T:
    """``fn(**kwargs, emit=...)``, in this process when ``seconds`` is None (and ``own_process``
    is not asked for), else in a fresh (spawned) process that is terminated, then killed after
    ``grace_seconds``, at the limit. ``own_process`` without a limit runs the child unbounded:
    two Python-bound jobs in two processes do not share one interpreter lock.

    ``fn`` must be importable by name (a module-level function) and its arguments and
    result picklable; ``emit(event)`` forwards events to ``on_event`` in the caller.
    Raises ``StageTimeout`` at the limit and ``ChildProcessDied`` if the child vanishes.
    """
    forward = on_event or _ignore
    if seconds is None and not own_process:
        return fn(**kwargs, emit=forward)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"a time limit must be positive, got {seconds}")
    context = multiprocessing.get_context("spawn")  # fork would copy CUDA state and threads
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child_end, fn, kwargs), name=f"mpo-{fn.__name__}", daemon=True)
    deadline = time.monotonic() + (seconds if seconds is not None else float("inf"))
    process.start()
    child_end.close()
    answered = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageTimeout(f"{fn.__module__}.{fn.__name__} ran past its hard limit of {seconds:g} s; "
                                   "its process was killed")
            if parent_end.poll(min(remaining, 1.0)):
                try:
                    message = parent_end.recv()
                except EOFError:
                    process.join(5)
                    raise ChildProcessDied(f"{fn.__module__}.{fn.__name__}: its process exited with code "
                                           f"{process.exitcode} and sent no result") from None
                if message[0] == "event":
                    forward(message[1])
                    continue
                answered = True
                if message[0] == "result":
                    return message[1]  # type: ignore[no-any-return]
                else:
                    error, text = message[1], message[2]
                    error.add_note(f"in the stage's child process:\n{text}")
                    raise error
    finally:
        parent_end.close()
        if answered:  # let it exit on its own: terminated mid-shutdown, it leaks its semaphores
            process.join(grace_seconds)
        if process.is_alive():
            process.terminate()
            process.join(grace_seconds)
            if process.is_alive():
                process.kill()
        process.join()
