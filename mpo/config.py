"""One pydantic config for the whole pipeline, loadable from YAML.

The same object is the body of ``mpo run CONFIG.yaml``, what each stage reads its settings
from, and (extended with Prefect's settings in ``flows.config``) the Prefect flow's parameter,
which the UI renders as a form. Stage configs
are the library's own (``SamplingConfig``, ``PairingConfig``, ``TrainConfig``), so a
field means the same thing on the command line, in YAML and in the UI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mpo.pairs import PairingConfig
from mpo.sampling import SamplingConfig
from mpo.train import TrainConfig


def set_fields(raw: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a config as loaded from YAML) with dotted paths set: ``{"training.max_steps": 10}``.
    The CLI's ``--set section.field=value``; the config model validates the result."""
    out = json.loads(json.dumps(raw, default=str))
    for path, value in assignments.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {path}: {part} is a value, not a section")
            node = child
        node[last] = value
    return out


class StageLimit(BaseModel):
    """What every runner honours for one stage: a hard time limit."""

    model_config = ConfigDict(extra="forbid")

    time_limit_seconds: float | None = Field(
        None,
        gt=0,
        description="hard limit on the stage: it runs in its own process, killed at the limit (a thread "
        "timeout cannot stop a CUDA call); empty: no limit",
    )


class StageLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingest: StageLimit = Field(default_factory=StageLimit)
    sampling: StageLimit = Field(default_factory=StageLimit)
    pairs: StageLimit = Field(default_factory=StageLimit)
    ref_logps: StageLimit = Field(default_factory=StageLimit)
    train: StageLimit = Field(default_factory=StageLimit)
    evaluate: StageLimit = Field(default_factory=StageLimit)


class PipelineConfig(BaseModel):
    """The data engine: ingest -> sampling (both stages) -> pairs -> reference log-probs -> MPO -> evaluation.

    Only what any runner needs; an orchestrator's own settings (Prefect's retries, result
    storage, deployments, task runners) extend it in its layer (``flows.config.FlowConfig``).
    An unknown field is an error, not ignored: a misspelt setting would silently not apply.
    """

    model_config = ConfigDict(extra="forbid")

    workdir: Path = Field(Path("mpo-run"), description="every stage's output goes under here")
    train_data: Path = Field(
        ...,
        description="prompts to sample: InternVL meta.json, a .jsonl/.json/.parquet file or a folder of them (docs/cli.md, mpo ingest)",
    )
    heldout_data: Path | None = Field(None, description="held-out prompts for evaluation (same formats)")
    model: str = Field(..., description="starting policy (and reference) model folder")
    engine: str = Field("transformers", description="sampling engine: transformers | vllm | lmdeploy")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="passed to the engine")
    engine_python: str | None = Field(
        None,
        description="the Python of the engine's own environment (e.g. .venv-vllm/bin/python): sampling and "
        "evaluation run there, in a child process; needed where the engine cannot share the orchestrator's "
        "environment (vLLM 0.32 and Prefect 3.8-3.9 pin disjoint fastapi ranges); empty: this environment",
    )
    strict_ingest: bool = Field(False, description="stop at the first bad input row instead of quarantining")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    train: bool = Field(True, description="train on the new pairs (a data refresh may only make data)")
    sft_baseline: bool = Field(False, description="also train an SFT-only model on the same chosen responses")
    baseline_side_by_side: bool = Field(
        False,
        description="train the SFT baseline at the same time as MPO, each in its own process with half the "
        "CPU threads (a small model on a CPU is bound by Python, not by cores); leave off on one GPU",
    )
    sampling_stages_at_once: bool | None = Field(
        None,
        description="run the correctness and DropoutNTP stages at the same time; default: only with the "
        "transformers engine (vLLM and lmdeploy each reserve most of a GPU's memory, so two on one GPU fail)",
    )
    reference_partitions: int = Field(
        1,
        ge=1,
        description="parts the reference log-probs are cut into (by pairs shard), one model load each, run "
        "at once where the runner can (the training deployment's GPU workers)",
    )
    evaluate: bool = Field(True, description="greedy held-out accuracy before and after training")
    eval_max_tokens: int = Field(256, ge=1, description="new tokens per greedy evaluation answer")
    stages: StageLimits = Field(default_factory=StageLimits)

    def sample_stages_together(self) -> bool:
        """Whether both sampling stages may hold an engine at the same time (see the field)."""
        if self.sampling_stages_at_once is not None:
            return self.sampling_stages_at_once
        return self.engine == "transformers"

    @classmethod
    def from_yaml(cls, path: Path | str, assignments: dict[str, Any] | None = None) -> PipelineConfig:
        """Load a config (``assignments``: dotted fields set on top, see ``set_fields``); relative
        paths in it are resolved against the YAML file's folder."""
        path = Path(path)
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of PipelineConfig fields")
        config = cls.model_validate(set_fields(loaded, assignments or {}))
        base = path.resolve().parent
        updates: dict[str, Any] = {}
        for name in ("workdir", "train_data", "heldout_data"):
            value = getattr(config, name)
            if value is not None and not Path(value).is_absolute():
                updates[name] = base / value
        for name in ("model", "engine_python"):
            value = getattr(config, name)
            if value is not None and not Path(value).is_absolute() and (base / value).exists():
                updates[name] = str(base / value)
        return config.model_copy(update=updates)

    def fingerprint(self, *parts: str) -> str:
        """Short hash of named sections of this config, for cache keys and folder names."""
        data = self.model_dump(mode="json")
        chosen = {p: data[p] for p in parts} if parts else data
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:12]
