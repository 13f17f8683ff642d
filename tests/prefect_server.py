"""A real Prefect server on 127.0.0.1 for the tests that need one (deployments, workers, the UI)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str  # the UI
    api: str
    env: dict[str, str]  # what a client process of this server needs

    def query(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST to the REST API (``/flow_runs/filter``, ``/artifacts/filter``): what the UI reads."""
        request = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@contextmanager
def prefect_server(home: Path, **env: str) -> Iterator[Server]:
    """``prefect server start`` with its own home (database), stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "local Prefect server did not start in 120 s"
                time.sleep(1)
        yield Server(url, f"{url}/api", environment)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def project_settings(workdir: Path, train_data: Path, model: Path) -> dict[str, str]:
    """What ``prefect.yaml`` reads from the environment of the machine that deploys."""
    return {
        "MPO_REPO_DIR": str(ROOT),
        "MPO_WORKDIR": str(workdir),
        "MPO_TRAIN_DATA": str(train_data),
        "MPO_MODEL": str(model),
    }


def deploy_project(server: Server) -> str:
    """The ``cpu`` and ``gpu`` process pools and every deployment of ``prefect.yaml``; returns what
    ``prefect deploy`` printed."""
    for pool in ("cpu", "gpu"):
        _prefect(["work-pool", "create", pool, "--type", "process"], server.env)
    return _prefect(["--no-prompt", "deploy", "--all"], server.env)


def _prefect(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def fault_injection(folder: Path, target: str, after_calls: int = 0, kill: bool = False) -> dict[str, str]:
    """Environment that makes ``target`` (``module:function``) fail once, on call ``after_calls + 1``,
    in every Python process started with it: a ``sitecustomize`` on ``PYTHONPATH``. A worker's
    flow-run process inherits it, so a failure lands inside a real deployment run, where nothing
    can be monkeypatched from the test. By default the call goes through first, so what it wrote
    stays, then raises (once per process). ``kill``: the process SIGKILLs itself before the call
    instead (a lost worker, an OOM kill), once across all processes (a marker file in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    module, function = target.split(":")
    marker = folder / "killed"
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import importlib
            import os
            import signal

            _module = importlib.import_module({module!r})
            _original = getattr(_module, {function!r})
            _calls = [0]


            def _fails_once(*args, **kwargs):
                _calls[0] += 1
                number = _calls[0]  # this call's: other threads may call meanwhile
                if {kill!r}:
                    if number == {after_calls + 1}:
                        try:
                            os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        except FileExistsError:
                            return _original(*args, **kwargs)
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _original(*args, **kwargs)
                result = _original(*args, **kwargs)
                if number == {after_calls + 1}:
                    raise RuntimeError("injected fault in {target}: a lost worker")
                return result


            setattr(_module, {function!r}, _fails_once)
            """
        )
    )
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}
