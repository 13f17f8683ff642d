"""prefect.yaml deploys on a real local server, and a deployment runs to completion through a worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mpo.results import RunSummary

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str], env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def copy_dataset(source: Path, target: Path) -> Path:
    """A copy of a synthetic dataset whose meta.json points at the copy (it holds absolute paths)."""
    shutil.copytree(source, target)
    for name in ("meta.json", "meta_heldout.json"):
        meta = target / name
        meta.write_text(meta.read_text().replace(str(source), str(target)))
    return target


def add_closed_prompt(data: Path) -> None:
    """One new counting prompt: an existing one, asked another way (a new prompt id)."""
    annotation = data / "annotations" / "train" / "synth_count.jsonl"
    row = json.loads(annotation.read_text().splitlines()[0])
    row["question"] += " Count them carefully."
    with annotation.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


@pytest.mark.timeout(900)
def test_deploy_all_and_run_one_deployment_through_a_worker(
    synth_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MPO_REPO_DIR": str(ROOT),
        "MPO_WORKDIR": str(tmp_path / "run"),
        "MPO_TRAIN_DATA": str(synth_dir / "meta.json"),
        "MPO_MODEL": str(tiny_model_dir),
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "local Prefect server did not start in 120 s"
                time.sleep(1)
        for pool in ("cpu", "gpu"):
            run(["work-pool", "create", pool, "--type", "process"], env)
        deployed = run(["--no-prompt", "deploy", "--all"], env)
        for name in ("mpo-data-engine/data-engine", "mpo-sampling/sampling", "mpo-training/training"):
            assert name in deployed or name.split("/")[1] in deployed
        listing = run(["deployment", "ls"], env)
        assert "data-engine" in listing and "sampling" in listing and "training" in listing

        config = {
            "workdir": str(tmp_path / "run"),
            "train_data": str(synth_dir / "meta.json"),
            "model": str(tiny_model_dir),
            "train": False,
            "sampling": {"n": 2, "max_tokens": 8, "dropout_max_tokens": 8, "prompts_per_shard": 16},
        }
        run(
            ["deployment", "run", "mpo-data-engine/data-engine", "--params", json.dumps({"config": config})],
            env,
        )
        worker = run(["worker", "start", "--pool", "cpu", "--run-once"], env, timeout=600)
        assert "Finished in state Completed()" in worker
        assert list((tmp_path / "run" / "pairs").glob("*/data/*.parquet"))

        # The nightly refresh, as its schedule runs it (the data-engine deployment, train off) twice:
        # new prompts arrive in between, and the second run samples only those, into a new pairs
        # version beside the old one.
        data = copy_dataset(synth_dir, tmp_path / "data")
        refresh = {**config, "workdir": str(tmp_path / "refresh"), "train_data": str(data / "meta.json")}
        summaries = []
        for arrived in (False, True):
            if arrived:
                add_closed_prompt(data)
            run(
                [
                    "deployment",
                    "run",
                    "mpo-data-engine/data-engine",
                    "--params",
                    json.dumps({"config": refresh}),
                ],
                env,
            )
            worker = run(["worker", "start", "--pool", "cpu", "--run-once"], env, timeout=600)
            assert "Finished in state Completed()" in worker
            summaries.append(RunSummary.read(tmp_path / "refresh" / "summary.json"))
        first, second = summaries
        assert second.ingest.counts["prompts"] == first.ingest.counts["prompts"] + 1
        written = {s.stage: s.counts["samples_written"] for s in second.sampling}
        assert written == {"correctness": config["sampling"]["n"], "dropout_ntp": 0}  # only the new prompt
        assert second.data_version != first.data_version
        assert {p.name for p in (tmp_path / "refresh" / "pairs").iterdir()} == {
            first.data_version,
            second.data_version,
        }

        # The full flow on the cpu pool hands sampling and training to the gpu pool's deployments.
        gpu_worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "gpu"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            split = {
                **config,
                "workdir": str(tmp_path / "run2"),
                "train": True,
                "sampling_deployment": "mpo-sampling/sampling",
                "training_deployment": "mpo-training/training",
                "training": {"max_steps": 2, "batch_size": 4, "max_length": 512},
            }
            run(
                [
                    "deployment",
                    "run",
                    "mpo-data-engine/data-engine",
                    "--params",
                    json.dumps({"config": split}),
                ],
                env,
            )
            worker = run(["worker", "start", "--pool", "cpu", "--run-once"], env, timeout=600)
            assert "Finished in state Completed()" in worker
        finally:
            os.killpg(gpu_worker.pid, signal.SIGTERM)
            gpu_worker.wait(timeout=60)
        runs = run(["flow-run", "ls"], {**env, "COLUMNS": "400"}).splitlines()
        for name in ("mpo-sampling", "mpo-training"):
            assert [line for line in runs if name in line and "COMPLETED" in line], f"no completed {name} run"
        assert list((tmp_path / "run2" / "samples").glob("correctness-*/shard-*.parquet"))
        assert list((tmp_path / "run2" / "train").glob("*/mpo-*/final/config.json"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
