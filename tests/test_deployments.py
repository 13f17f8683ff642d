"""prefect.yaml deploys on a real local server, and a deployment runs to completion through a worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from prefect_server import PREFECT, ROOT, deploy_project, fault_injection, prefect_server, project_settings

from mpo.results import RunSummary
from mpo.train import read_metrics


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
    settings = project_settings(tmp_path / "run", synth_dir / "meta.json", tiny_model_dir)
    with prefect_server(tmp_path / "prefect-home", **settings) as server:
        env = server.env
        deployed = deploy_project(server)
        for name in ("mpo-data-engine/data-engine", "mpo-sampling/sampling", "mpo-training/training"):
            assert name in deployed or name.split("/")[1] in deployed
        listing = run(["deployment", "ls"], env)
        assert "data-engine" in listing and "sampling" in listing and "training" in listing
        # A nightly refresh that outlasts a day is not joined by the next: one data-engine run at a time.
        [engine] = [d for d in server.query("/deployments/filter") if d["name"] == "data-engine"]
        assert engine["global_concurrency_limit"]["limit"] == 1
        assert engine["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

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

        # The nightly refresh, as its schedule runs it (the data-engine deployment's parameters, with
        # training on) twice: new prompts arrive in between. The second run samples only those into a
        # new pairs version beside the old one and trains on it from the starting model; its training
        # fails once after its first checkpoint (a fault injected into the worker's flow-run process)
        # and the stage's retry resumes from that checkpoint.
        data = copy_dataset(synth_dir, tmp_path / "data")
        refresh = {
            **config,
            "workdir": str(tmp_path / "refresh"),
            "train_data": str(data / "meta.json"),
            "train": True,
            "training": {"max_steps": 4, "save_every": 2, "batch_size": 4, "max_length": 512},
            "stages": {"train": {"retries": 1, "retry_delay_seconds": 1}},
        }
        summaries, workers = [], []
        for arrived in (False, True):
            worker_env = env
            if arrived:
                add_closed_prompt(data)
                worker_env = {**env, **fault_injection(tmp_path / "inject", "mpo.train:save_checkpoint")}
            params = json.dumps({"config": refresh})
            run(["deployment", "run", "mpo-data-engine/data-engine", "--params", params], env)
            workers.append(run(["worker", "start", "--pool", "cpu", "--run-once"], worker_env, timeout=600))
            assert "Finished in state Completed()" in workers[-1]
            summaries.append(RunSummary.read(tmp_path / "refresh" / "summary.json"))
            if not arrived:
                first_final = Path(summaries[0].trainings["mpo"].final_model) / "model.safetensors"
                first_stamp = first_final.stat().st_mtime_ns
        first, second = summaries
        assert second.ingest.counts["prompts"] == first.ingest.counts["prompts"] + 1
        written = {s.stage: s.counts["samples_written"] for s in second.sampling}
        assert written == {"correctness": config["sampling"]["n"], "dropout_ntp": 0}  # only the new prompt
        assert second.data_version != first.data_version
        assert {p.name for p in (tmp_path / "refresh" / "pairs").iterdir()} == {
            first.data_version,
            second.data_version,
        }
        # trained on the new version, in its own folder, from the starting model; the injected
        # failure was retried and resumed at the checkpoint: every step once, none lost or redone
        assert "injected fault in mpo.train:save_checkpoint" in workers[1] and "Retry 1/1" in workers[1]
        trained = second.trainings["mpo"]
        assert Path(trained.out_dir).parent.name == second.data_version
        assert trained.resumed_from == 2 and trained.counts["steps"] == 4
        assert [r["step"] for r in read_metrics(trained.metrics_file) if r.get("split") != "eval"] == [
            1,
            2,
            3,
            4,
        ]
        assert first.trainings["mpo"].resumed_from == 0
        assert first_final.stat().st_mtime_ns == first_stamp  # the first version's model is left as it was
        assert second.models["start"] == first.models["start"] == str(tiny_model_dir)
        # both runs, each with its own run summary, as the UI lists them
        refresh_runs = {
            r["id"]
            for r in server.query("/flow_runs/filter")
            if r["parameters"].get("config", {}).get("workdir") == refresh["workdir"]
        }
        assert len(refresh_runs) == 2
        summaries_by_run = {
            a["flow_run_id"] for a in server.query("/artifacts/filter") if a["key"] == "mpo-run-summary"
        }
        assert refresh_runs <= summaries_by_run

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
