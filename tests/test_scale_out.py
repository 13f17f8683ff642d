"""Many GPU workers from one flow run: sampling partitions as sub-flow runs on a ``gpu`` process pool.

A real local server, the project's deployments, two workers started as one per GPU would be
(``CUDA_VISIBLE_DEVICES=0`` and ``=1``, ``--limit 1``), and the data engine run by ``mpo run``
against the server. Checked in the sample stores themselves: every prompt sampled exactly as often
as the config asks (nothing twice, nothing lost), through a worker's flow run killed mid-partition
and through two data-engine runs started at once on the same prompts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
import yaml
from prefect_server import (
    PREFECT,
    ROOT,
    Server,
    deploy_project,
    fault_injection,
    prefect_server,
    project_settings,
)

from mpo.results import RunSummary
from mpo.sampling import SAMPLE_KEY, read_prompts
from mpo.schemas import SAMPLES, read_dir

PARTITIONS = 4
N = 2


@contextmanager
def gpu_workers(server: Server, envs: list[dict[str, str]], logs: Path) -> Iterator[None]:
    """One process worker per GPU of the ``gpu`` pool, each taking one flow run at a time."""
    workers = []
    for index, extra in enumerate(envs):
        env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "CUDA_VISIBLE_DEVICES": str(index), **extra}
        log = (logs / f"worker-{index}.log").open("w")
        workers.append(
            subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1", "--name", f"gpu-{index}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        yield
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)


def mpo_run(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mpo.cli", "run", str(config)],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(run: subprocess.Popen[str]) -> str:
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-4000:]
    return output


def assert_sampled_exactly_once(workdir: Path) -> None:
    """Every closed prompt ``N`` times and every open prompt once, in the store itself."""
    prompts = read_prompts(workdir / "ingested" / "prompts")
    for stage, kind, per_prompt in (("correctness", "closed", N), ("dropout_ntp", "open", 1)):
        (store,) = (workdir / "samples").glob(f"{stage}-*")
        stored = pl.from_arrow(read_dir(store, SAMPLES))
        assert isinstance(stored, pl.DataFrame)
        assert stored.select(SAMPLE_KEY).is_duplicated().sum() == 0, f"{stage}: samples written twice"
        counts = stored.group_by("prompt_id").len()
        wanted = prompts.filter(pl.col("kind") == kind)["prompt_id"]
        assert set(counts["prompt_id"]) == set(wanted), f"{stage}: prompts lost"
        assert set(counts["len"]) == {per_prompt}


@pytest.mark.timeout(1200)
def test_partitions_spread_over_two_gpu_workers_survive_a_kill_and_a_second_run(
    synth_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = project_settings(tmp_path / "run", synth_dir / "meta.json", tiny_model_dir)

    def config(workdir: Path) -> Path:
        fields = {
            "workdir": str(workdir),
            "train_data": str(synth_dir / "meta.json"),
            "model": str(tiny_model_dir),
            "train": False,
            "evaluate": False,
            "sampling": {
                "n": N,
                "max_tokens": 8,
                "dropout_max_tokens": 8,
                "prompts_per_shard": 4,
                "partitions": PARTITIONS,
                "samples_per_partition": 1,  # a few prompts each: as many parts as asked for
            },
            "sampling_deployment": "mpo-sampling/sampling",
            "stages": {"sampling": {"retries": 2, "retry_delay_seconds": 1}},
        }
        path = workdir.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(fields))
        return path

    with prefect_server(tmp_path / "prefect-home", **settings) as server:
        deploy_project(server)
        # The first worker's flow-run process kills itself mid-partition: before its second shard.
        killer = fault_injection(tmp_path / "inject", "mpo.sampling:_sample_rows", after_calls=1, kill=True)
        with gpu_workers(server, [killer, {}], tmp_path):
            output = finished(mpo_run(config(tmp_path / "run"), server.env))
            summary = RunSummary.read(tmp_path / "run" / "summary.json")

            assert (tmp_path / "inject" / "killed").exists(), "the fault was never injected"
            assert_sampled_exactly_once(tmp_path / "run")
            assert [len(stage.partitions) for stage in summary.sampling] == [PARTITIONS, PARTITIONS]
            served = {worker for stage in summary.sampling for worker in stage.workers()}
            assert served == {f"{socket.gethostname()} CUDA_VISIBLE_DEVICES={gpu}" for gpu in (0, 1)}
            retried = [part for stage in summary.sampling for part in stage.retried()]
            assert len(retried) == 1 and retried[0].attempts == 2
            assert f"{retried[0].stage} (2 attempts)" in summary.render()
            assert "Partitions" in output and "retried" in output

            # Two data-engine runs at once on the same prompts and work folder: the second joins the
            # first's partition runs (same step, same attempt: same idempotency key).
            both = [mpo_run(config(tmp_path / "twice"), server.env) for _ in range(2)]
            for run in both:
                finished(run)
            assert_sampled_exactly_once(tmp_path / "twice")

        runs = server.query("/flow_runs/filter")
        sampling_runs = [
            r for r in runs if r["name"] and r["parameters"].get("step", {}).get("stage") == "sampling"
        ]
        twice = [r for r in sampling_runs if str(tmp_path / "twice") in str(r["parameters"])]
        assert len(twice) == 2 * PARTITIONS  # one flow run per partition and stage, not two
        crashed = [r for r in sampling_runs if r["state_type"] == "CRASHED"]
        assert len(crashed) == 1
