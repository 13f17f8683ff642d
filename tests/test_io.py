"""Atomic folder publishing: leftovers of dead writers are cleared, live writers are left alone."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from mpo.io import publish_dir


def test_a_dead_writers_folder_is_cleared_and_a_live_ones_is_not(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    leftover = tmp_path / f".data.new-{host}-{dead.stdout.strip()}-abc"
    live = tmp_path / f".data.new-{host}-1-abc"  # pid 1 is alive
    elsewhere = tmp_path / ".data.new-another-host-123-abc"
    for folder in (leftover, live, elsewhere):
        folder.mkdir()
    publish_dir(tmp_path / "data", lambda tmp: (tmp / "part.txt").write_text("x"))
    assert (tmp_path / "data" / "part.txt").read_text() == "x"
    assert not leftover.exists() and live.exists() and elsewhere.exists()


def test_writers_at_once_each_publish_a_whole_folder(tmp_path: Path) -> None:
    gate = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(index: int) -> None:
        def fill(tmp: Path) -> None:
            for part in range(3):
                (tmp / f"part-{part}.txt").write_text(str(index))
            gate.wait()  # all four swap at the same moment

        try:
            publish_dir(tmp_path / "data", fill)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    contents = {p.read_text() for p in (tmp_path / "data").iterdir()}
    assert len(contents) == 1 and len(list((tmp_path / "data").iterdir())) == 3  # one writer's, whole
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
