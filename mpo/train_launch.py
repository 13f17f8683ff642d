"""One training in several processes from inside a job: ``torch.distributed.run`` around ``mpo.train``.

The training stage of the DAG is one job (``mpo.jobs.train_job``); with ``training.processes`` above
one it starts ``python -m torch.distributed.run --standalone --nproc-per-node N -m mpo.train_launch
SPEC`` and waits. Each rank reads the same spec (the pairs, the model, the output folder, the
training config) and calls ``mpo.train.train``, which joins the process group torchrun describes
(DDP, or FSDP2 with ``parallel: fsdp``; NCCL on the worker's visible GPUs, gloo on CPUs) and resumes
from the folder's newest checkpoint as it always does. Rank 0 writes the result beside the
checkpoints; the job reads it back. While the ranks run, the job follows ``metrics.jsonl`` for its
progress and log lines.

The launcher dies with the job: it gets SIGTERM when the job's process ends (``PR_SET_PDEATHSIG``),
so a job killed at its hard time limit takes torchrun and its ranks with it, and a retry resumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpo.io import atomic_write_text
from mpo.results import TrainingResult
from mpo.train import TrainConfig

RESULT_FILE = ".launch-result.json"


def _die_with_parent() -> None:
    """In the launcher, before it runs: SIGTERM when the process that started it ends (Linux)."""
    with contextlib.suppress(OSError):  # not Linux: the launcher may outlive a killed job
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train_in_processes(
    pairs_dir: str,
    model: str,
    out: str,
    training: TrainConfig,
    eval_pairs: str | None,
    on_metrics: Callable[[dict[str, Any]], None],
    poll_seconds: float = 1.0,
) -> TrainingResult:
    """``mpo.train.train`` in ``training.processes`` processes under torchrun; returns rank 0's result.
    ``on_metrics`` gets each new training record of ``metrics.jsonl`` as the ranks write it."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / ".launch-spec.json"
    atomic_write_text(
        spec,
        json.dumps(
            {
                "pairs_dir": pairs_dir,
                "model": model,
                "out": out,
                "training": training.model_dump(mode="json"),
                "eval_pairs": eval_pairs,
            }
        ),
    )
    (folder / RESULT_FILE).unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={training.processes}",
        "-m",
        "mpo.train_launch",
        str(spec),
    ]
    metrics = folder / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    log = folder / "launch.log"  # the ranks' output: a pipe nobody reads while they run would fill
    with log.open("w") as output:
        launcher = subprocess.Popen(
            command, preexec_fn=_die_with_parent, stdout=output, stderr=subprocess.STDOUT
        )
        while launcher.poll() is None:
            time.sleep(poll_seconds)
            seen = _follow(metrics, seen, on_metrics)
    _follow(metrics, seen, on_metrics)
    if launcher.returncode != 0:
        raise RuntimeError(
            f"training in {training.processes} processes failed (torchrun exit {launcher.returncode}); "
            f"the ranks' output, {log}, ends:\n" + log.read_text()[-3000:]
        )
    return _read_result(folder / RESULT_FILE)


def _follow(metrics: Path, seen: int, on_metrics: Callable[[dict[str, Any]], None]) -> int:
    """Pass on the complete lines of ``metrics`` after the first ``seen``; returns the new count."""
    if not metrics.exists():
        return seen
    lines = metrics.read_text().split("\n")[:-1]  # the last piece may be a line being written
    for line in lines[seen:]:
        record = json.loads(line)
        if record.get("split") != "eval":
            on_metrics(record)
    return max(seen, len(lines))


def _read_result(path: Path) -> TrainingResult:
    return TrainingResult.model_validate_json(path.read_text())


def main(spec_file: str) -> None:
    """One rank: train as the spec says; rank 0 records the result for the job."""
    from mpo.train import train

    spec = json.loads(Path(spec_file).read_text())
    config = TrainConfig.model_validate(spec["training"])
    result = train(spec["pairs_dir"], spec["model"], spec["out"], config, eval_pairs=spec["eval_pairs"])
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(Path(spec["out"]) / RESULT_FILE, result.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1])
