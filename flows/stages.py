"""Each heavy stage as its own flow, so deployments can run it on its own work pool.

``mpo-sampling`` (ingest + both sampling stages) and ``mpo-training`` (reference log-probs
+ MPO) go to a ``gpu`` pool; the full ``mpo-data-engine`` flow stays on ``cpu`` or runs
everything where one machine has a GPU. They reuse the data engine's own steps, so a
stage run alone writes exactly where the full flow would and each resumes the other's work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.config import FlowConfig
from flows.data_engine import sample_prompts, train_on_pairs
from mpo.pipeline import RunLayout, sft_only
from tasks.stages import ingest_prompts, reference_logps, with_stage_policy


@flow(name="mpo-sampling", log_prints=True, persist_result=True)
def sampling(config: FlowConfig) -> list[dict[str, Any]]:
    """Ingest the prompts and run both sampling stages; returns the samples folders."""
    ingest = with_stage_policy(ingest_prompts, config.stages.ingest)
    prompts = ingest(
        str(config.train_data), str(RunLayout(Path(config.workdir)).ingested), config.strict_ingest
    )
    return sample_prompts(config, prompts)


@flow(name="mpo-training", log_prints=True, persist_result=True)
def training(config: FlowConfig, pairs_dir: str, sft_baseline: bool = False) -> dict[str, Any]:
    """Reference log-probs into ``pairs_dir``, then MPO training on it (or, with ``sft_baseline``,
    the SFT-only baseline on the same chosen responses)."""
    if sft_baseline:
        return train_on_pairs(config, pairs_dir, sft_only(config.training), "sft")
    with_stage_policy(reference_logps, config.stages.ref_logps)(
        pairs_dir,
        config.model,
        config.training.max_length,
        config.stages.ref_logps.time_limit_seconds,
        config.training.bf16,
    )
    return train_on_pairs(config, pairs_dir, config.training, "mpo")
