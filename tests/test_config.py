"""Configs from YAML with dotted overrides, and the demo as a checked-in config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpo.config import PipelineConfig, set_fields
from mpo.demo import DemoConfig
from mpo.synth import CLAIM_PATTERNS, VERIFY_MODES


def test_set_fields_sets_dotted_paths_and_names_a_clash() -> None:
    raw = {"training": {"max_steps": 5}, "model": "m"}
    assert set_fields(raw, {"training.max_steps": 10, "sampling.n": 4}) == {
        "training": {"max_steps": 10},
        "model": "m",
        "sampling": {"n": 4},
    }
    assert raw["training"]["max_steps"] == 5  # the input is left as it was
    with pytest.raises(ValueError, match="--set model.path: model is a value"):
        set_fields(raw, {"model.path": "x"})


def test_pipeline_config_from_yaml_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"train_data": "data/meta.json", "model": "m", "training": {"max_steps": 5}})
    )
    config = PipelineConfig.from_yaml(tmp_path / "run.yaml", {"training.max_steps": 7, "engine_python": None})
    assert config.training.max_steps == 7 and config.train_data == tmp_path / "data" / "meta.json"
    with pytest.raises(ValueError, match="max_steps"):
        PipelineConfig.from_yaml(tmp_path / "run.yaml", {"training.max_steps": 0})


def test_the_demo_config_holds_the_demo_and_its_overrides_reach_the_pipeline() -> None:
    demo = DemoConfig.load()
    assert demo.data.datasets == ["synth_colour", "synth_count", "synth_choice", "synth_describe"]
    assert demo.pipeline["pairing"]["claim_patterns"] == CLAIM_PATTERNS  # the YAML and mpo.synth agree
    assert demo.pipeline["pairing"]["verify_modes"] == VERIFY_MODES
    changed = DemoConfig.load(assignments={"pipeline.training.max_steps": 3, "tiny_model.warmup.steps": 0})
    assert changed.pipeline["training"]["max_steps"] == 3 and changed.tiny_model.warmup.steps == 0
    with pytest.raises(FileNotFoundError, match="no demo config there"):
        DemoConfig.load("/nonexistent/demo.yaml")
