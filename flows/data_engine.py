"""The data engine flow: ingest -> {correctness, DropoutNTP} in parallel -> pairs -> reference
log-probs -> MPO training (and an optional SFT baseline) -> evaluation -> report.

Run it embedded (``mpo run CONFIG.yaml``: Prefect's ephemeral API, no server), from a
deployment (``prefect.yaml``), or watch it in the UI by pointing ``PREFECT_API_URL`` at a
server. Stage outputs live under ``config.workdir``; every stage resumes from what is
already there, so a retry or a re-run with the same config redoes nothing finished.
The run summary (the models scored, accuracy, pairs, time per stage) is also written to
``workdir/summary.json`` for scripts such as ``benchmarks/demo_accuracy.py``.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.logging import get_run_logger

from flows.config import FlowConfig
from mpo.config import PipelineConfig
from mpo.evaluate import compare_models
from mpo.pipeline import RunLayout, render_summary, sft_only, side_by_side_threads
from mpo.sampling import STAGES
from mpo.train import TrainConfig
from tasks.stages import (
    evaluate_model,
    ingest_prompts,
    make_pairs,
    reference_logps,
    sample_stage,
    train_policy,
    with_stage_policy,
)


def result_storage(config: FlowConfig) -> dict[str, Any]:
    """Task options that persist cached results where the config says (a folder or a block slug)."""
    if config.result_storage is None:
        return {}
    if (
        re.fullmatch(r"[a-z0-9-]+/[A-Za-z0-9_-]+", config.result_storage)
        and not Path(config.result_storage).exists()
    ):
        return {"result_storage": config.result_storage}  # a saved block: "<block-type>/<block-name>"
    from prefect.filesystems import LocalFileSystem

    # Prefect takes result storage only as a saved block: save one per folder, named by its path.
    folder = str(Path(config.result_storage).resolve())
    name = "mpo-results-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
    LocalFileSystem(basepath=folder).save(name, overwrite=True)
    return {"result_storage": f"local-file-system/{name}"}


def sample_prompts(config: FlowConfig, prompts: dict[str, Any]) -> list[dict[str, Any]]:
    """Both sampling stages at once (each loads its engine once and loops over its shards).

    A cached result whose store folder is gone (a deleted work folder) is recomputed,
    not returned: its path would name samples that no longer exist.
    """
    from mpo.model_identity import model_fingerprint
    from mpo.sampling import stage_store

    sample = with_stage_policy(sample_stage, config.stages.sampling, **result_storage(config))
    out = str(RunLayout(Path(config.workdir)).samples)
    futures = [
        sample.with_options(
            refresh_cache=not stage_store(out, stage, config.sampling, config.model).is_dir()
        ).submit(
            stage,
            prompts["prompts_dir"],
            prompts["version"],
            config.model,
            model_fingerprint(config.model),
            config.engine,
            config.engine_options,
            config.sampling,
            out,
            config.stages.sampling.time_limit_seconds,
            config.engine_python,
        )
        for stage in STAGES
    ]
    return [f.result() for f in futures]


def _training_arguments(
    config: FlowConfig, pairs_dir: str, training: TrainConfig, name: str
) -> dict[str, Any]:
    """``train_policy``'s arguments, its folder from the run layout."""
    out = RunLayout(Path(config.workdir)).training(config, pairs_dir, training, name)
    return {
        "pairs_dir": pairs_dir,
        "model": config.model,
        "out": str(out),
        "training": training,
        "time_limit": config.stages.train.time_limit_seconds,
    }


def train_on_pairs(config: FlowConfig, pairs_dir: str, training: TrainConfig, name: str) -> dict[str, Any]:
    """Train one model on the pairs (``name``: mpo or sft), resuming what its folder holds."""
    result: dict[str, Any] = with_stage_policy(train_policy, config.stages.train)(
        **_training_arguments(config, pairs_dir, training, name)
    )
    return result


def train_mpo_and_baseline_side_by_side(
    config: FlowConfig, pairs_dir: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """MPO and the SFT baseline at once, each in its own process with half the CPU threads."""
    threads = side_by_side_threads()
    task = with_stage_policy(train_policy, config.stages.train)
    futures = [
        task.submit(
            **_training_arguments(config, pairs_dir, training, name), own_process=True, torch_threads=threads
        )
        for training, name in ((config.training, "mpo"), (sft_only(config.training), "sft"))
    ]
    mpo, sft = (future.result() for future in futures)
    return mpo, sft


@flow(name="mpo-data-engine", log_prints=True)
def data_engine(config: FlowConfig) -> dict[str, Any]:
    """The whole DAG on one config; returns the run summary (also published as artifacts)."""
    logger = get_run_logger()
    layout = RunLayout(Path(config.workdir))
    stages = config.stages
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"workdir": str(layout.workdir)}

    started = time.perf_counter()
    ingest = with_stage_policy(ingest_prompts, stages.ingest)
    prompts = ingest(str(config.train_data), str(layout.ingested), config.strict_ingest)
    heldout = (
        ingest(str(config.heldout_data), str(layout.heldout), config.strict_ingest)
        if config.evaluate and config.heldout_data
        else None
    )
    timings["ingest"] = time.perf_counter() - started
    summary["ingest"] = prompts

    started = time.perf_counter()
    if config.sampling_deployment:
        sampled = run_stage_deployment(config.sampling_deployment, config)
    else:
        sampled = sample_prompts(config, prompts)
    timings["sampling"] = time.perf_counter() - started
    summary["sampling"] = sampled

    started = time.perf_counter()
    pairs_dir = layout.pairs(config, prompts["version"], [s["samples_dir"] for s in sampled])
    pairs_version = pairs_dir.name
    make = with_stage_policy(
        make_pairs,
        stages.pairs,
        refresh_cache=not (pairs_dir / "report.json").exists(),
        **result_storage(config),
    )
    pairs = make([s["samples_dir"] for s in sampled], prompts["prompts_dir"], str(pairs_dir), config.pairing)
    timings["pairs"] = time.perf_counter() - started
    summary["pairs"] = pairs["report"]
    summary["data_version"] = pairs_version
    emit_event(
        event="mpo.pairs.ready",
        resource={"prefect.resource.id": f"mpo.pairs.{pairs_version}"},
        payload={"pairs_dir": str(pairs_dir), "pairs": pairs["report"]["pairs"]},
    )

    models = {"start": config.model}
    baseline: dict[str, Any] | None = None
    if config.train:
        started = time.perf_counter()
        if config.training_deployment:
            trained = run_stage_deployment(config.training_deployment, config, pairs_dir=str(pairs_dir))
            timings["reference log-probs + MPO training"] = time.perf_counter() - started
        else:
            with_stage_policy(reference_logps, stages.ref_logps)(
                str(pairs_dir),
                config.model,
                config.training.max_length,
                stages.ref_logps.time_limit_seconds,
                config.training.bf16,
            )
            timings["reference log-probs"] = time.perf_counter() - started
            started = time.perf_counter()
            if config.sft_baseline and config.baseline_side_by_side:
                trained, baseline = train_mpo_and_baseline_side_by_side(config, str(pairs_dir))
                timings["MPO + SFT baseline, side by side"] = time.perf_counter() - started
            else:
                trained = train_on_pairs(config, str(pairs_dir), config.training, "mpo")
                timings["MPO training"] = time.perf_counter() - started
        models["mpo"] = trained["final_model"]
        summary["training"] = trained
        _training_curves(trained["metrics_file"])
        if baseline is not None:
            models["sft"] = baseline["final_model"]
        elif config.sft_baseline:
            started = time.perf_counter()
            baseline = (
                run_stage_deployment(
                    config.training_deployment, config, pairs_dir=str(pairs_dir), sft_baseline=True
                )
                if config.training_deployment
                else train_on_pairs(config, str(pairs_dir), sft_only(config.training), "sft")
            )
            models["sft"] = baseline["final_model"]
            timings["SFT baseline"] = time.perf_counter() - started

    summary["models"] = models
    if heldout is not None:
        started = time.perf_counter()
        evaluate = with_stage_policy(evaluate_model, stages.evaluate)
        summary["evaluation"] = {
            name: evaluate(
                model,
                heldout["prompts_dir"],
                str(layout.evaluation),
                config.engine,
                config.engine_options,
                config.sampling,
                config.pairing,
                config.eval_max_tokens,
                stages.evaluate.time_limit_seconds,
                config.engine_python,
            )
            for name, model in models.items()
        }
        summary["comparison"] = compare_models(
            layout.evaluation,
            heldout["prompts_dir"],
            models,
            config.sampling,
            config.pairing,
            config.eval_max_tokens,
        )
        timings["evaluation"] = time.perf_counter() - started
    summary["timings"] = timings
    layout.write_summary(summary)
    _publish_summary(summary)
    logger.info(
        "data engine done: %s pairs; %s",
        pairs["report"]["pairs"],
        {k: round(v, 1) for k, v in timings.items()},
    )
    return summary


def run_stage_deployment(name: str, config: FlowConfig, **parameters: Any) -> Any:
    """Run a stage flow as its deployment (on its own work pool, e.g. GPU workers), wait for it
    and return its result. It shows in the UI as a sub-flow of this run.

    The stage flows persist their (small) results; across machines, point every worker at
    shared result storage (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``) and a shared work folder.
    """
    from prefect.deployments import run_deployment

    flow_run: Any = run_deployment(
        name, parameters={"config": config.model_dump(mode="json"), **parameters}, timeout=None
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"deployment {name} run {flow_run.name} ({flow_run.id}) ended "
            f"{state.name if state else 'without a state'}; see it in the UI"
        )
    return state.result()


def task_runner(config: FlowConfig) -> Any:
    """The task runner the config asks for (Dask needs the `dask` extra: prefect-dask + distributed)."""
    if config.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.dask_workers,
            "processes": config.dask_processes,
            "threads_per_worker": 1,
        }
    )


def run_pipeline(config: PipelineConfig, **options: Any) -> Any:
    """Run ``data_engine`` with the configured task runner (what ``mpo run`` and ``mpo demo`` call);
    a plain ``PipelineConfig`` runs with the Prefect settings' defaults."""
    flow_config = config if isinstance(config, FlowConfig) else FlowConfig.model_validate(config.model_dump())
    return data_engine.with_options(task_runner=task_runner(flow_config))(flow_config, **options)


def _training_curves(metrics_file: str) -> None:
    from mpo.train import read_metrics

    records = [r for r in read_metrics(metrics_file) if r.get("split") != "eval"]
    stride = max(1, len(records) // 50)
    rows = [
        {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in r.items()
            if k in ("step", "loss", "dpo", "bco", "sft", "reward_margin", "reward_accuracy", "delta", "lr")
        }
        for r in records[::stride]
    ]
    create_table_artifact(
        key="mpo-training-curves", table=rows, description="MPO training: loss terms and rewards"
    )


def _publish_summary(summary: dict[str, Any]) -> None:
    """Markdown run summary + a table of pairs per source and dataset."""
    pairs = summary["pairs"]
    create_table_artifact(
        key="mpo-pairs-per-source",
        description="preference pairs per dataset and source",
        table=[
            {
                "dataset": d,
                **{s: stats.get("pairs", {}).get(s, 0) for s in ("correctness", "format", "dropout_ntp")},
            }
            for d, stats in pairs["datasets"].items()
        ],
    )
    create_markdown_artifact(
        key="mpo-run-summary", markdown=render_summary(summary), description="MPO data engine run summary"
    )
