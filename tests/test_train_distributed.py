"""Two CPU processes under torchrun (gloo): δ stays in sync and DDP matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(args: list[str], procs: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if procs > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            str(WORKER),
            *args,
        ]
    else:
        command = [sys.executable, str(WORKER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def deltas(path: Path) -> list[float]:
    return [json.loads(line)["delta"] for line in path.read_text().splitlines()]


@pytest.mark.timeout(900)
def test_two_ddp_processes_keep_delta_in_sync_and_match_one_process(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    steps = "4"
    run_worker([str(ref_pairs_dir), str(tiny_model_dir), str(tmp_path / "ddp"), "2", steps], procs=2)
    run_worker([str(ref_pairs_dir), str(tiny_model_dir), str(tmp_path / "single"), "4", steps], procs=1)

    rank0, rank1 = (
        deltas(tmp_path / "ddp" / "delta-rank0.jsonl"),
        deltas(tmp_path / "ddp" / "delta-rank1.jsonl"),
    )
    single = deltas(tmp_path / "single" / "delta-rank0.jsonl")
    assert len(rank0) == len(rank1) == 4
    assert rank0 == rank1  # all-reduced: bit-identical on both ranks
    assert rank0 == pytest.approx(single, abs=1e-5)  # and the same δ as one process seeing all 4 pairs
    assert len(set(rank0)) > 1  # it moves

    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    alone = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    for key in ddp:
        assert torch.allclose(ddp[key], alone[key], atol=2e-5), key


@pytest.mark.timeout(900)
def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = [str(ref_pairs_dir), str(tiny_model_dir), str(tmp_path / "fsdp"), "2", "4", "fsdp"]
    run_worker([*args, "2"], procs=2)  # two steps, a gathered checkpoint, stop
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002" / "model.safetensors").exists()
    run_worker(args, procs=2)  # resume from it for steps 3 and 4
    run_worker([str(ref_pairs_dir), str(tiny_model_dir), str(tmp_path / "single"), "4", "4"], procs=1)

    rank0, rank1 = (
        deltas(tmp_path / "fsdp" / "delta-rank0.jsonl"),
        deltas(tmp_path / "fsdp" / "delta-rank1.jsonl"),
    )
    assert rank0 == rank1 and len(rank0) == 4
    assert rank0 == pytest.approx(deltas(tmp_path / "single" / "delta-rank0.jsonl"), abs=1e-5)
    sharded = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    alone = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert sharded.keys() == alone.keys()
    for key in sharded:
        assert torch.allclose(sharded[key], alone[key], atol=2e-5), key


def training_losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") != "eval"]


@pytest.mark.timeout(900)
def test_the_dags_training_step_in_two_processes_matches_torchrun_by_hand(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``training.processes: 2``: the DAG's training step runs torch.distributed.run itself, with the
    same losses as a person typing ``torchrun --nproc-per-node 2 -m mpo.cli train`` on the same pairs."""
    import yaml

    from mpo.config import PipelineConfig
    from mpo.pipeline import LocalRunner, Steps
    from mpo.results import PairsResult
    from mpo.train import TrainConfig

    training = TrainConfig(learning_rate=1e-3, batch_size=2, max_steps=3, max_length=512, warmup_ratio=0.0)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(training.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    by_hand = [
        *(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "mpo.cli",
        ),
        *("train", "--pairs", str(ref_pairs_dir), "--model", str(tiny_model_dir)),
        *("--out", str(tmp_path / "by-hand"), "--config", str(tmp_path / "train.yaml")),
    ]
    done = subprocess.run(by_hand, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    events: list[dict] = []
    config = PipelineConfig(
        workdir=tmp_path / "dag",
        train_data=tmp_path,
        model=str(tiny_model_dir),
        training=training.model_copy(update={"processes": 2}),
    )
    steps = Steps(config)
    pairs = PairsResult(stage="pairs", out_dir=str(ref_pairs_dir))
    [plan] = steps.trainings(pairs)
    result = LocalRunner(events.append).run(steps.train(pairs, plan))
    assert result.counts["steps"] == 3 and Path(result.final_model, "model.safetensors").exists()
    expected = training_losses(tmp_path / "by-hand" / "metrics.jsonl")
    assert len(expected) == 3
    assert training_losses(Path(result.metrics_file)) == pytest.approx(expected, abs=1e-6)
    assert [e["progress"] for e in events if "progress" in e] == pytest.approx([100 / 3, 200 / 3, 100.0])


@pytest.mark.timeout(900)
def test_a_training_killed_at_its_limit_takes_its_ranks_with_it(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mpo import jobs
    from mpo.time_limit import StageTimeout, call_with_time_limit
    from mpo.train import TrainConfig

    training = TrainConfig(
        learning_rate=1e-3, batch_size=2, max_steps=10_000, max_length=512, save_every=2, processes=2
    )
    kwargs = {
        "pairs_dir": str(ref_pairs_dir),
        "model": str(tiny_model_dir),
        "out": str(tmp_path / "run"),
        "training": training,
        "eval_pairs": None,
    }
    with pytest.raises(StageTimeout):
        call_with_time_limit(jobs.train_job, kwargs, 20.0, grace_seconds=2.0)
    spec = str(tmp_path / "run" / ".launch-spec.json")
    for _ in range(30):  # SIGTERM reaches torchrun, which stops its ranks
        left = subprocess.run(["pgrep", "-f", spec], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(1)
    assert left == [], "torchrun or its ranks outlived the killed job"
