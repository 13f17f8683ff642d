"""Atomic file writes: a reader never sees a half-written file.

Every stage writes through these helpers (temp file in the same directory, fsync,
``os.replace``), so a killed process leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path | str, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    ``write`` receives a temporary path next to ``path`` (same filesystem, so the
    rename is atomic). On any error the temporary file is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def publish_dir(final: Path | str, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder with ``fill(tmp)``, then swap it in for ``final``.

    Readers see either the whole old folder or the whole new one (between the two
    renames, briefly, none); a killed run leaves only a hidden temporary folder, which
    a later call on this host removes once its process is gone. Two writers at once (two
    runs of the same step) each publish whole; the later one's folder stays.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.new-*"):
        if _owner_gone(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-{_OWNER}-", dir=final.parent))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _attempt in range(5):
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
        if final.exists():
            with contextlib.suppress(FileNotFoundError):  # another writer moved it away first
                os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:  # another writer's folder landed in between: move it aside and retry
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"{final}: could not publish: other writers kept replacing it")


_OWNER = f"{socket.gethostname()}-{os.getpid()}"


def _owner_gone(name: str) -> bool:
    """Whether the process that made a temporary folder (``.NAME.new-HOST-PID-xxxx``) is gone: only
    known for this host's processes; a folder of another naming is an old leftover."""
    host_pid = name.split(".new-", 1)[1].rsplit("-", 1)[0]
    host, _, pid = host_pid.rpartition("-")
    if not pid.isdigit() or not host:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
