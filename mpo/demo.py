"""The demo as configuration: ``configs/demo.yaml`` names the synthetic data, the tiny model's
warm-up and the pipeline; ``prepare`` draws the data, builds (or keeps) the model and returns the
``PipelineConfig`` that any runner then runs. ``mpo demo`` is this plus ``mpo run``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mpo.config import PipelineConfig, set_fields
from mpo.tiny_model import WarmupRecipe

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class DemoData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(..., min_length=1, description="synthetic datasets (mpo.synth.TASKS)")
    count: int = Field(400, ge=2, description="prompts per dataset, train + held-out")
    heldout_fraction: float = Field(0.3, gt=0, lt=1)


class DemoWarmup(BaseModel):
    """``mpo.tiny_model.WarmupRecipe`` as configuration: its defaults, but 1,000 steps."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=0)
    lr: float = Field(WarmupRecipe.lr, gt=0)
    vision_lr_scale: float = Field(WarmupRecipe.vision_lr_scale, gt=0)
    prior_bias: float = Field(WarmupRecipe.prior_bias, ge=0, le=1)
    prior_in_reasoning: bool = WarmupRecipe.prior_in_reasoning

    def recipe(self) -> WarmupRecipe:
        return WarmupRecipe(**self.model_dump())


class DemoModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, ge=28)
    warmup_count: int = Field(500, ge=1, description="warm-up examples per dataset")
    warmup: DemoWarmup = Field(default_factory=DemoWarmup)


class DemoConfig(BaseModel):
    """``configs/demo.yaml``: where, which data, which tiny model, and the pipeline to run on them."""

    model_config = ConfigDict(extra="forbid")

    workdir: Path = Path("demo-run")
    seed: int = Field(0, ge=0, description="seed of the data, the model, sampling and training")
    data: DemoData
    tiny_model: DemoModel = Field(default_factory=DemoModel)
    pipeline: dict[str, Any] = Field(
        default_factory=dict,
        description="PipelineConfig fields but the four the "
        "demo fills in (workdir, train_data, heldout_data, model)",
    )

    @classmethod
    def load(cls, path: Path | str = DEFAULT_CONFIG, assignments: dict[str, Any] | None = None) -> DemoConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no demo config there (the repository's is configs/demo.yaml)")
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of DemoConfig fields")
        return cls.model_validate(set_fields(raw, assignments or {}))


def prepare(
    config: DemoConfig, on_step: Callable[[int, float], None] | None = None
) -> tuple[PipelineConfig, dict[str, Any]]:
    """Draw the data and build (or keep) the tiny model; returns the pipeline config and the model's summary."""
    from mpo.synth import generate
    from mpo.tiny_model import TinyModelSpec, ensure_tiny_model

    workdir = config.workdir.resolve()
    datasets = tuple(config.data.datasets)
    generate(
        workdir / "data",
        count=config.data.count,
        seed=config.seed,
        heldout_fraction=config.data.heldout_fraction,
        datasets=datasets,
    )
    warmup = config.tiny_model.warmup
    recipe = warmup.recipe()
    model = ensure_tiny_model(
        workdir / "model-start",
        config.seed,
        recipe,
        TinyModelSpec(config.tiny_model.image_size),
        datasets,
        config.tiny_model.warmup_count,
        on_step=on_step,
    )
    seeded = set_fields(config.pipeline, {"sampling.seed": config.seed, "training.seed": config.seed})
    pipeline = PipelineConfig.model_validate(
        {
            **seeded,
            "workdir": workdir,
            "train_data": workdir / "data" / "meta.json",
            "heldout_data": workdir / "data" / "meta_heldout.json",
            "model": str(workdir / "model-start"),
        }
    )
    return pipeline, model
