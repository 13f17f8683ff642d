"""Sampling partitions on 1 and on 2 workers of a Prefect `gpu` pool: speedup, duplicates, losses, overhead.

The real path a GPU cluster takes: a local Prefect server, the project's deployments, one process
worker per "GPU" (`CUDA_VISIBLE_DEVICES=i`, `--limit 1`, one torch thread each: a CPU core stands in
for a GPU), and the data engine run by `mpo run` with `sampling_deployment` set, so each partition
is a sub-flow run that a free worker picks up. The same prompts are sampled into a fresh work folder
per worker count with the transformers engine on the tiny model.

Per run: the sampling stage's wall time (the run summary's `sampling` timing), the partitions' job
seconds (each job's own time: engine load, generation, shard writes) and the overhead, the share
of the workers' wall time outside the jobs: 1 - sum(job seconds) / (workers x wall), i.e. cutting
the partitions, scheduling, starting each flow-run process, handing results back and workers idle
at the end. Duplicates and losses are counted in the stores themselves.

    .venv/bin/python benchmarks/scale_sampling.py --count 400 --partitions 4    # a quick look
    .venv/bin/python benchmarks/scale_sampling.py --count 2400 --partitions 4   # parts of minutes, as on GPUs

The last line: `workers=2 speedup=<x.xx> duplicates=<n> lost=<n> overhead=<pct>%`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from prefect_server import PREFECT, deploy_project, prefect_server, project_settings  # noqa: E402

from mpo.results import RunSummary  # noqa: E402
from mpo.sampling import SAMPLE_KEY, read_prompts  # noqa: E402
from mpo.schemas import SAMPLES, read_dir  # noqa: E402


def start_workers(count: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen[bytes]]:
    workers = []
    for index in range(count):
        worker_env = {
            **env,
            "CUDA_VISIBLE_DEVICES": str(index),
            "OMP_NUM_THREADS": "1",  # one core per worker, as one GPU per worker
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        workers.append(
            subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1", "--name", f"gpu-{index}"],
                cwd=ROOT,
                env=worker_env,
                stdout=(logs / f"worker-{count}-{index}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return workers


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=60)


def store_check(workdir: Path, n: int) -> tuple[int, int, int]:
    """(samples, duplicated samples, samples missing) over both stages' stores."""
    prompts = read_prompts(workdir / "ingested" / "prompts")
    total = duplicates = lost = 0
    for stage, kind, per_prompt in (("correctness", "closed", n), ("dropout_ntp", "open", 1)):
        (store,) = (workdir / "samples").glob(f"{stage}-*")
        stored = pl.from_arrow(read_dir(store, SAMPLES))
        assert isinstance(stored, pl.DataFrame)
        distinct = stored.unique(subset=list(SAMPLE_KEY))
        wanted = prompts.filter(pl.col("kind") == kind).height * per_prompt
        total += stored.height
        duplicates += stored.height - distinct.height
        lost += wanted - distinct.height
    return total, duplicates, lost


def run(
    workers: int, args: argparse.Namespace, data: Path, model: Path, env: dict[str, str], tmp: Path
) -> dict:
    workdir = tmp / f"run-{workers}"
    config = {
        "workdir": str(workdir),
        "train_data": str(data / "meta.json"),
        "model": str(model),
        "train": False,
        "evaluate": False,
        "sampling": {
            "n": args.n,
            "max_tokens": args.max_tokens,
            "dropout_max_tokens": args.max_tokens,
            "prompts_per_shard": args.prompts_per_shard,
            "partitions": args.partitions,
            "samples_per_partition": args.samples_per_partition,
        },
        "sampling_deployment": "mpo-sampling/sampling",
    }
    path = tmp / f"run-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = start_workers(workers, env, tmp)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mpo.cli", "run", str(path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        stop(started)
    if done.returncode:
        raise SystemExit(f"mpo run failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    summary = RunSummary.read(workdir / "summary.json")
    wall = summary.timings["sampling"]
    job_seconds = sum(part.seconds for stage in summary.sampling for part in stage.partitions or [stage])
    samples, duplicates, lost = store_check(workdir, args.n)
    return {
        "workers": workers,
        "served": len({w for stage in summary.sampling for w in stage.workers()}),
        "wall": wall,
        "jobs": job_seconds,
        "overhead": 1 - job_seconds / (workers * wall),
        "samples": samples,
        "duplicates": duplicates,
        "lost": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400, help="synthetic examples per dataset (6 datasets)")
    parser.add_argument("--n", type=int, default=8, help="samples per closed prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts-per-shard", type=int, default=32)
    parser.add_argument("--partitions", type=int, default=4, help="at most, per stage")
    args = parser.parse_args()
    closed = 5 * args.count  # the synthetic data: five closed datasets and one open (describe)
    args.samples_per_partition = -(-closed * args.n // args.partitions)  # correctness: exactly that many

    from mpo.synth import generate
    from mpo.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="mpo-scale-") as folder:
        tmp = Path(folder)
        generate(tmp / "data", count=args.count, seed=0, heldout_fraction=0.0)
        build_tiny_model(tmp / "model", seed=0)
        settings = project_settings(tmp / "run", tmp / "data" / "meta.json", tmp / "model")
        with prefect_server(tmp / "prefect-home", **settings) as server:
            deploy_project(server)
            rows = [run(workers, args, tmp / "data", tmp / "model", server.env, tmp) for workers in (1, 2)]

    print(
        f"{args.count * 6} prompts, n={args.n}, max_tokens={args.max_tokens}, at most {args.partitions} "
        f"partitions per stage of at least {args.samples_per_partition} samples"
    )
    print("| workers | served by | sampling wall s | job s | overhead | samples | duplicates | lost |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['workers']} | {row['served']} | {row['wall']:.1f} | {row['jobs']:.1f} | "
            f"{100 * row['overhead']:.1f}% | {row['samples']} | {row['duplicates']} | {row['lost']} |"
        )
    one, two = rows
    print(
        f"workers=2 speedup={one['wall'] / two['wall']:.2f} duplicates={two['duplicates']} "
        f"lost={two['lost']} overhead={100 * two['overhead']:.1f}%"
    )


if __name__ == "__main__":
    main()
