"""The GPU stages as self-contained jobs: load what they need, run, return small values.

Each job takes plain, picklable arguments plus ``emit`` (a callback for events: ``{"log":
text}`` lines and ``{"progress": percent}``) and returns a ``StageResult`` (``mpo.results``):
where it wrote, what it counted and dropped, how long it took. That
makes one job runnable the same way in the caller's process or in a child process under
a hard time limit (``mpo.time_limit``), where an engine or a model lives and dies with
the process. Orchestration (Prefect tasks, the CLI) stays outside.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mpo.errors import InputError
from mpo.pairs import PairingConfig
from mpo.prompt_rows import ReplyAs
from mpo.results import (
    Comparison,
    EvalResult,
    IngestResult,
    PairsResult,
    ReferenceResult,
    StageResult,
    TrainingResult,
)
from mpo.sampling import SamplingConfig
from mpo.time_limit import Emit
from mpo.train import TrainConfig


def _load_engine(engine: str, model: str, options: dict[str, Any], emit: Emit) -> Any:
    """The engine, saying on the step's line that it loads and how long it took (a vLLM start is
    tens of seconds, and the line would otherwise sit still)."""
    from mpo.engines import load_engine

    emit({"status": f"loading {engine} engine: {Path(model).name}"})
    started = time.perf_counter()
    loaded = load_engine(engine, model, **options)
    emit({"status": f"{engine} engine loaded in {time.perf_counter() - started:.1f} s"})
    return loaded


def ingest_job(
    source: str,
    out: str,
    strict: bool,
    emit: Emit,
    columns: dict[str, str] | None = None,
    image_root: str | None = None,
    reply_as: ReplyAs | None = None,
    seed: int = 0,
) -> IngestResult:
    """meta.json / prompt files -> prompts table + quarantine (``mpo.ingest.ingest``)."""
    from mpo.ingest import ingest

    result = ingest(
        Path(source),
        Path(out),
        strict=strict,
        seed=seed,
        columns=columns,
        image_root=Path(image_root) if image_root else None,
        reply_as=reply_as,
        on_rows=lambda rows: emit({"status": f"{rows:,} rows read"}),
    )
    emit(
        {
            "log": f"ingested {result.counts['prompts']} prompts from {source}, {sum(result.drops.values())} quarantined"
        }
    )
    return result


def pairs_job(
    samples_dirs: list[str], prompts_dir: str | None, out: str, pairing: PairingConfig, emit: Emit
) -> PairsResult:
    """The samples of the prompts in ``prompts_dir`` (None: every sample) -> preference pairs in ``out``."""
    from mpo.pairs import run_pairing
    from mpo.sampling import read_prompts

    started = time.perf_counter()
    prompt_ids = read_prompts(prompts_dir)["prompt_id"] if prompts_dir is not None else None
    report = run_pairing([Path(d) for d in samples_dirs], Path(out), pairing, prompt_ids)
    emit({"log": f"{report.pairs} pairs: {report.pairs_by_source}"})
    return PairsResult(
        stage="pairs",
        out_dir=out,
        counts={"pairs": report.pairs},
        drops=report.drops(),
        seconds=time.perf_counter() - started,
        pairs_by_source=report.pairs_by_source,
        datasets=report.datasets,
    )


def sample_job(
    stage: str,
    prompts_dir: str,
    model: str,
    engine: str,
    engine_options: dict[str, Any],
    sampling: SamplingConfig,
    out: str,
    emit: Emit,
    partition: tuple[int, int] = (0, 1),
) -> StageResult:
    """One sampling stage, or one ``partition`` of it (index, count), with one engine load: samples
    only the prompts its store lacks."""
    from mpo.sampling import plan_stage, run_stage

    started = time.perf_counter()
    plan = plan_stage(stage, prompts_dir, model, out, sampling, partition)

    def advance(done: int, total: int, skipped: bool) -> None:
        emit({"progress": 100.0 * done / max(1, total)})
        emit({"log": f"{plan.label} shard {done}/{total} {'already done' if skipped else 'written'}"})

    if not plan.shards:  # nothing left here: no engine to load
        emit({"log": f"{plan.label}: {len(plan.finished)} shards already done"})
        return plan.result(0, time.perf_counter() - started)
    sampler = _load_engine(engine, model, engine_options, emit)
    try:
        return run_stage(stage, prompts_dir, sampler, out, sampling, on_shard=advance, partition=partition)
    finally:
        sampler.close()


def reference_job(
    pairs_dir: str,
    model: str,
    max_length: int,
    emit: Emit,
    bf16: bool | None = None,
    store: str | None = None,
    partition: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    device: str | None = None,
) -> ReferenceResult:
    """Frozen reference log-probs into each pairs shard (of ``partition``; finished shards are skipped),
    computed as training will compute (``bf16``: the training config's); with a ``store``, pairs
    computed before (another version of the same pairs) are taken from it. Pairs too long to fit
    are counted as drops: training skips them too."""
    from mpo.ref_logps import compute_reference_logps

    emit({"status": f"reference log-probs of {Path(model).name}"})
    result = compute_reference_logps(
        pairs_dir,
        model,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        store=store,
        partition=partition,
        on_shard=lambda path, _rows: emit({"status": f"{path.name} written"}),
    )
    counts = result.counts
    emit(
        {
            "log": f"{result.stage}: {counts['shards']} shards written ({counts['pairs_computed']} pairs computed, "
            f"{counts['pairs_from_store']} from the store), {counts['skipped_shards']} already done, "
            f"{result.drops.get('too_long', 0)} pairs too long"
        }
    )
    return result


def train_job(
    pairs_dir: str,
    model: str,
    out: str,
    training: TrainConfig,
    eval_pairs: str | None,
    emit: Emit,
    torch_threads: int | None = None,
    name: str = "mpo",
    stop_after: int | None = None,
) -> TrainingResult:
    """Training (``name``: mpo, or sft for the baseline), in ``training.processes`` processes under
    torchrun when above one (``mpo.train_launch``); resumes from the newest checkpoint in ``out``.
    ``torch_threads`` caps torch's CPU threads (for a job that shares the machine with another);
    None keeps torch's default. ``stop_after`` ends it with a checkpoint after that many steps in
    all (to train in slices; the next call resumes)."""
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
                    "log": f"{name} step {record['step']} loss {record['loss']:.4f} "
                    f"margin {record['reward_margin']:+.4f} reward acc {record['reward_accuracy']:.2f}"
                }
            )

    started = time.perf_counter()
    emit({"status": f"loading {Path(model).name} and the pairs"})
    if training.processes > 1 and "WORLD_SIZE" not in os.environ:  # not already one rank of torchrun
        from mpo.train_launch import train_in_processes

        emit({"status": f"training in {training.processes} processes (torch.distributed.run)"})
        if stop_after is not None:
            raise InputError(
                "stop_after trains in one process; run torchrun yourself to stop a multi-process run"
            )
        result = train_in_processes(pairs_dir, model, out, training, eval_pairs, log_step)
    else:
        result = train(
            pairs_dir, model, out, training, eval_pairs=eval_pairs, stop_after=stop_after, on_step=log_step
        )
    return result.model_copy(update={"stage": f"train:{name}", "seconds": time.perf_counter() - started})


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
    name: str = "model",
) -> EvalResult:
    """Greedy held-out accuracy per dataset of ``model`` (called ``name`` in the summary); reuses
    finished evaluation shards."""
    from mpo.evaluate import evaluate_accuracy, evaluation_store

    started = time.perf_counter()
    sampler = _load_engine(engine, model, engine_options, emit)
    try:
        table = evaluate_accuracy(sampler, prompts_dir, out, sampling, pairing, max_tokens)
    finally:
        sampler.close()
    emit(
        {
            "log": f"{name} ({Path(model).name}): "
            + ", ".join(f"{d} {r.accuracy:.1%}" for d, r in table.items())
        }
    )
    return EvalResult(
        stage=f"evaluate:{name}",
        out_dir=str(evaluation_store(out, model, sampling, max_tokens)),
        counts={
            "prompts": sum(r.prompts for r in table.values()),
            "correct": sum(r.correct for r in table.values()),
        },
        seconds=time.perf_counter() - started,
        model=model,
        by_dataset=table,
    )


def compare_job(
    out: str,
    prompts_dir: str,
    models: dict[str, str],
    sampling: SamplingConfig,
    pairing: PairingConfig,
    max_tokens: int,
    emit: Emit,
) -> dict[str, Comparison]:
    """Paired differences of the evaluated models on the same held-out prompts ("mpo - start",
    "mpo - sft"), from the evaluation stores the evaluation jobs wrote."""
    from mpo.evaluate import compare_models

    compared = compare_models(out, prompts_dir, models, sampling, pairing, max_tokens)
    comparison = {pair: Comparison(**values) for pair, values in compared.items()}
    for pair, result in comparison.items():
        emit({"log": f"{pair}: {100 * result.difference:+.1f} ± {100 * result.standard_error:.1f} points"})
    return comparison
