import json
from pathlib import Path

from typer.testing import CliRunner

from mpo.cli import app

runner = CliRunner()


def test_synth_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--count", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "synth_count" in result.output
    assert len(json.loads((tmp_path / "d" / "meta.json").read_text())) == 6


def test_tiny_model_command_with_warmup(tmp_path: Path, synth_dir: Path) -> None:
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "m"), "--warmup-steps", "2", "--data", str(synth_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "tiny_model.json").read_text())
    assert summary["warmup_steps"] == 2 and summary["first_loss"] > 0
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "processor_config.json").exists()


def test_synth_rejects_bad_count(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--count", "0"])
    assert result.exit_code != 0
