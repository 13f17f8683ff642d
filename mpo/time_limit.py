"""Hard time limits and other environments: run a stage in a child process.

A thread-based timeout (what Prefect's ``timeout_seconds`` does) cannot interrupt a
CUDA kernel or a hung NCCL collective: the Python thread never gets control back. A
process can always be killed, and killing it frees its GPU memory, so GPU stages that
must not hang a worker forever run through ``call_with_time_limit``. Stages resume
from their shards and checkpoints, so a killed attempt loses at most its unfinished
unit of work and a retry picks up from there.

The child can also run under another Python: a sampling engine's own environment. vLLM
0.32 and Prefect 3.8-3.9 cannot share one (their fastapi pins do not overlap), so the
orchestrator hands the sampling job to the engine environment's interpreter
(``python=``), which needs this package but not Prefect. Such a child is started with
``python -m mpo.time_limit FD`` (not multiprocessing, whose children re-import the
parent's main module) and gets its job on stdin.

The child reports back through a pipe: events (progress, log lines) while it runs, then
its result or its exception, re-raised in the parent with its own type so that error
handling (never retrying bad input) works the same as in-process. An exception the
parent's environment cannot load comes back as a ``RuntimeError`` with its text.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

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
            payload = pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an unpicklable exception: its text goes back alone
            payload = None
        connection.send(("error", payload, f"{type(error).__name__}: {error}", text))
    finally:
        connection.close()


def _raise_child_error(payload: bytes | None, summary: str, text: str) -> None:
    """Re-raise the child's exception with its own type, or as a RuntimeError with its text
    when it cannot be loaded here (unpicklable, or a class of the child's environment only)."""
    try:
        error = pickle.loads(payload) if payload is not None else None
    except Exception:  # noqa: BLE001 - any failure to load falls back to the text
        error = None
    if not isinstance(error, BaseException):
        error = RuntimeError(summary)
    error.add_note(f"in the stage's child process:\n{text}")
    raise error


class _Child(Protocol):
    """The few process operations the supervising loop needs, for both kinds of child."""

    def alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> int | None: ...


class _SpawnedChild:
    def __init__(self, process: Any) -> None:
        self.process = process

    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        code: int | None = self.process.exitcode
        return code


class _InterpreterChild:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def _spawn(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[_Child, Connection]:
    context = multiprocessing.get_context("spawn")  # fork would copy CUDA state and threads
    parent_end, child_end = context.Pipe(duplex=False)
    # Not daemonic: a job may start processes of its own (vLLM's engine core), which a daemonic
    # process may not; call_with_time_limit always ends the child, limit or not.
    process = context.Process(target=_child, args=(child_end, fn, kwargs), name=f"mpo-{fn.__name__}")
    process.start()
    child_end.close()
    return _SpawnedChild(process), parent_end


def _start_interpreter(
    python: str, fn: Callable[..., Any], kwargs: dict[str, Any]
) -> tuple[_Child, Connection]:
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [python, "-m", "mpo.time_limit", str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,)
        )
    except OSError as error:
        os.close(read_fd)
        raise FileNotFoundError(f"cannot start the stage's interpreter {python!r}: {error}") from error
    finally:
        os.close(write_fd)
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(pickle.dumps((fn.__module__, fn.__qualname__, kwargs)))
    return _InterpreterChild(process), Connection(read_fd, writable=False)


def call_with_time_limit(
    fn: Callable[..., T],
    kwargs: dict[str, Any],
    seconds: float | None,
    on_event: Emit | None = None,
    grace_seconds: float = 10.0,
    own_process: bool = False,
    python: str | None = None,
) -> T:
    """``fn(**kwargs, emit=...)``, in this process when ``seconds`` is None (and neither
    ``own_process`` nor ``python`` asks for a child), else in a child process that is
    terminated, then killed after ``grace_seconds``, at the limit. ``own_process`` without a
    limit runs the child unbounded: two Python-bound jobs in two processes do not share one
    interpreter lock. ``python`` runs the child under that interpreter (another
    environment holding this package), with or without a limit.

    ``fn`` must be importable by name (a module-level function) and its arguments and
    result picklable; ``emit(event)`` forwards events to ``on_event`` in the caller.
    Raises ``StageTimeout`` at the limit and ``ChildProcessDied`` if the child vanishes.
    """
    forward = on_event or _ignore
    if seconds is None and not own_process and python is None:
        return fn(**kwargs, emit=forward)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"a time limit must be positive, got {seconds}")
    deadline = time.monotonic() + (seconds if seconds is not None else float("inf"))
    child, parent_end = _spawn(fn, kwargs) if python is None else _start_interpreter(python, fn, kwargs)
    name = f"{fn.__module__}.{fn.__name__}"
    answered = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageTimeout(f"{name} ran past its hard limit of {seconds:g} s; its process was killed")
            if parent_end.poll(min(remaining, 1.0)):
                try:
                    message = parent_end.recv()
                except EOFError:
                    code = child.join(5)
                    raise ChildProcessDied(
                        f"{name}: its process exited with code {code} and sent no result"
                    ) from None
                if message[0] == "event":
                    forward(message[1])
                    continue
                answered = True
                if message[0] == "result":
                    return message[1]  # type: ignore[no-any-return]
                _raise_child_error(*message[1:])
    finally:
        parent_end.close()
        if answered:  # let it exit on its own: terminated mid-shutdown, it leaks its semaphores
            child.join(grace_seconds)
        if child.alive():
            child.terminate()
            child.join(grace_seconds)
            if child.alive():
                child.kill()
        child.join()


def _interpreter_main(write_fd: int) -> None:
    """The child side of ``python=``: read (module, function, kwargs) from stdin, run, report."""
    module, qualname, kwargs = pickle.loads(sys.stdin.buffer.read())
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    _child(Connection(write_fd, readable=False), fn, kwargs)


if __name__ == "__main__":
    _interpreter_main(int(sys.argv[1]))
