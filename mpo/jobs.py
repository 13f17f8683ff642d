"""The GPU stages as self-contained jobs: load what they need, run, return small values.

Each job takes plain, picklable arguments plus ``emit`` (a callback for events: ``{"log":
text}`` lines and ``{"progress": percent}``) and returns a dict of paths and counts. That
makes one job runnable the same way in the caller's process or in a child process under
a hard time limit (``mpo.time_limit``), where an engine or a model lives and dies with
the process. Orchestration (Prefect tasks, the CLI) stays outside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpo.pairs import PairingConfig
from mpo.sampling import SamplingConfig
from mpo.time_limit import Emit
from mpo.train import TrainConfig


def ingest_job(source: str, out: str, strict: bool, emit: Emit) -> dict[str, Any]:
    """meta.json / JSONL / Parquet -> prompts table + quarantine; returns its path, version and counts."""
    from mpo.ingest import ingest
    from mpo.sampling import prompts_version, read_prompts

    report = ingest(Path(source), Path(out), strict=strict)
    prompts_dir = Path(out) / "prompts"
    table = read_prompts(prompts_dir)
    emit(
        {
            "log": f"ingested {table.height} prompts from {source}, {report.as_dict()['total_quarantined']} quarantined"
        }
    )
    return {"prompts_dir": str(prompts_dir), "version": prompts_version(table), **report.as_dict()}


def pairs_job(
    samples_dirs: list[str], prompts_dir: str, out: str, pairing: PairingConfig, emit: Emit
) -> dict[str, Any]:
    """The samples of the prompts in ``prompts_dir`` -> preference pairs; returns the folder and the report."""
    from mpo.pairs import run_pairing
    from mpo.sampling import read_prompts

    prompt_ids = read_prompts(prompts_dir)["prompt_id"]
    report = run_pairing([Path(d) for d in samples_dirs], Path(out), pairing, prompt_ids)
    emit({"log": f"{report['pairs']} pairs: {report['pairs_by_source']}"})
    return {"pairs_dir": out, "report": report}


def sample_job(
    stage: str,
    prompts_dir: str,
    model: str,
    engine: str,
    engine_options: dict[str, Any],
    sampling: SamplingConfig,
    out: str,
    emit: Emit,
) -> dict[str, Any]:
    """One sampling stage with one engine load: samples only the prompts its store lacks."""
    from mpo.engines import load_engine
    from mpo.sampling import run_stage

    def advance(done: int, total: int, skipped: bool) -> None:
        emit({"progress": 100.0 * done / max(1, total)})
        emit({"log": f"{stage} shard {done}/{total} {'already done' if skipped else 'written'}"})

    sampler = load_engine(engine, model, **engine_options)
    try:
        report = run_stage(stage, prompts_dir, sampler, out, sampling, on_shard=advance)
    finally:
        sampler.close()
    return {
        "stage": stage,
        "samples_dir": str(report.out_dir),
        "shards": report.shards,
        "skipped_shards": report.skipped,
        "samples_written": report.samples_written,
    }


def reference_job(
    pairs_dir: str, model: str, max_length: int, emit: Emit, bf16: bool | None = None
) -> dict[str, Any]:
    """Frozen reference log-probs into each pairs shard (finished shards are skipped), computed as
    training will compute (``bf16``: the training config's)."""
    from mpo.ref_logps import compute_reference_logps

    report = compute_reference_logps(pairs_dir, model, max_length=max_length, bf16=bf16)
    emit(
        {
            "log": f"reference log-probs: {report.shards} shards written, {report.skipped_shards} already done, "
            f"{report.too_long} pairs too long"
        }
    )
    return {
        "pairs_dir": pairs_dir,
        "shards": report.shards,
        "skipped_shards": report.skipped_shards,
        "too_long": report.too_long,
    }


def train_job(
    pairs_dir: str,
    model: str,
    out: str,
    training: TrainConfig,
    eval_pairs: str | None,
    emit: Emit,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """MPO training; resumes from the newest checkpoint in ``out``. ``torch_threads`` caps torch's
    CPU threads (for a job that shares the machine with another); None keeps torch's default."""
    import torch

    from mpo.train import train

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)

    def log_step(record: dict[str, Any]) -> None:
        if training.max_steps:  # with epochs only, the trainer alone knows the total
            emit({"progress": 100.0 * record["step"] / training.max_steps})
        if record["step"] == 1 or record["step"] % 10 == 0:
            emit(
                {
                    "log": f"step {record['step']} loss {record['loss']:.4f} margin {record['reward_margin']:+.4f} "
                    f"reward acc {record['reward_accuracy']:.2f}"
                }
            )

    result = train(pairs_dir, model, out, training, eval_pairs=eval_pairs, on_step=log_step)
    return {
        "final_model": str(result.final_model),
        "metrics_file": str(result.metrics_file),
        "steps": result.steps,
        "first": result.first,
        "last": result.last,
        "resumed_from": result.resumed_from,
    }


def evaluate_job(
    model: str,
    prompts_dir: str,
    out: str,
    engine: str,
    engine_options: dict[str, Any],
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int,
    emit: Emit,
) -> dict[str, dict[str, Any]]:
    """Greedy held-out accuracy per dataset (reuses finished evaluation shards)."""
    from mpo.engines import load_engine
    from mpo.evaluate import evaluate_accuracy

    sampler = load_engine(engine, model, **engine_options)
    try:
        table = evaluate_accuracy(sampler, prompts_dir, out, sampling, pairing, max_tokens)
    finally:
        sampler.close()
    emit({"log": f"{Path(model).name}: " + ", ".join(f"{d} {r['accuracy']:.1%}" for d, r in table.items())})
    return table
