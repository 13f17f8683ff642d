"""The MPO trainer on the tiny model: it learns, resumes exactly, and honours its options."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mpo.loss import MPOLossConfig
from mpo.train import LoraSettings, TrainConfig, checkpoints, read_metrics, train

FAST = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 512, "warmup_ratio": 0.0}


def weights(model_dir: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def learning_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A warmed-up tiny model and gold pairs big enough to learn from (160 train, 40 held-out)."""
    from mpo.ref_logps import compute_reference_logps
    from mpo.synth import generate, solution_pairs
    from mpo.tiny_model import WarmupRecipe, build_tiny_model

    root = tmp_path_factory.mktemp("learning")
    generate(root / "synth", count=40, seed=0)
    build_tiny_model(root / "model", seed=0, synth_dir=root / "synth", recipe=WarmupRecipe(steps=100))
    train_pairs = solution_pairs(root / "synth", root / "pairs")
    heldout_pairs = solution_pairs(root / "synth", root / "heldout-pairs", split="heldout")
    for pairs in (train_pairs, heldout_pairs):
        compute_reference_logps(pairs, root / "model", max_length=512)
    return {"model": root / "model", "pairs": train_pairs, "heldout": heldout_pairs, "root": root}


def test_mpo_learns_the_training_pairs_and_generalises(learning_setup: dict[str, Path]) -> None:
    config = TrainConfig(learning_rate=1e-3, max_steps=150, batch_size=8, max_length=512, warmup_ratio=0.1)
    result = train(
        learning_setup["pairs"],
        learning_setup["model"],
        learning_setup["root"] / "run",
        config,
        eval_pairs=learning_setup["heldout"],
    )
    records = [r for r in read_metrics(result.metrics_file) if r.get("split") != "eval"]
    assert len(records) == 150
    first, last = records[:20], records[-20:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reward_margin") > mean(first, "reward_margin") + 0.1
    assert mean(last, "dpo") < math.log(2) - 0.02
    assert mean(last, "reward_accuracy") > 0.6
    assert result.evaluation["pairs"] == 40
    assert result.evaluation["reward_accuracy"] > 0.5
    assert result.evaluation["reward_margin"] > 0
    for key in (
        "loss",
        "dpo",
        "bco",
        "sft",
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "reward_accuracy",
        "delta",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in records[-1]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(result.final_model)
    AutoProcessor.from_pretrained(result.final_model)


def test_policy_equal_to_reference_starts_at_0_83_plus_sft(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = train(ref_pairs_dir, tiny_model_dir, tmp_path / "run", TrainConfig(max_steps=1, **FAST))
    first = result.first
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["bco"] == pytest.approx(2 * math.log(2), abs=1e-4)
    assert first["loss"] == pytest.approx(0.8 * math.log(2) + 0.4 * math.log(2) + first["sft"], abs=1e-4)


def test_online_reference_gives_the_same_first_step(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pre = train(ref_pairs_dir, tiny_model_dir, tmp_path / "pre", TrainConfig(max_steps=2, **FAST))
    online = train(
        ref_pairs_dir,
        tiny_model_dir,
        tmp_path / "online",
        TrainConfig(max_steps=2, reference="online", **FAST),
    )
    for key in ("loss", "dpo", "reward_margin", "delta"):
        assert online.last[key] == pytest.approx(pre.last[key], abs=1e-4)


def test_resume_is_exact(ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(max_steps=6, grad_accum=2, save_every=2, **FAST)
    straight = train(ref_pairs_dir, tiny_model_dir, tmp_path / "straight", config)
    half = train(ref_pairs_dir, tiny_model_dir, tmp_path / "sliced", config, stop_after=3)
    assert half.counts["steps"] == 3 and not Path(half.final_model).exists()
    assert [p.name for p in checkpoints(tmp_path / "sliced")] == ["step-000002", "step-000003"]
    resumed = train(ref_pairs_dir, tiny_model_dir, tmp_path / "sliced", config)
    assert resumed.resumed_from == 3 and resumed.counts["steps"] == 6

    a, b = weights(straight.final_model), weights(resumed.final_model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = weights(tiny_model_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
    straight_log, sliced_log = read_metrics(straight.metrics_file), read_metrics(resumed.metrics_file)
    assert [r["step"] for r in sliced_log] == [1, 2, 3, 4, 5, 6]  # no step lost or repeated
    for x, y in zip(straight_log, sliced_log, strict=True):
        assert (x["loss"], x["delta"], x["lr"]) == (y["loss"], y["delta"], y["lr"])


def test_freeze_vision_keeps_the_vision_tower(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = train(
        ref_pairs_dir,
        tiny_model_dir,
        tmp_path / "run",
        TrainConfig(max_steps=2, freeze_vision=True, freeze_projector=True, **FAST),
    )
    before, after = weights(tiny_model_dir), weights(result.final_model)
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    text = [k for k in before if "language_model" in k and k.endswith("weight")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_lora_trains_an_adapter_and_saves_a_merged_model(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = TrainConfig(max_steps=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0), save_every=1, **FAST)
    result = train(ref_pairs_dir, tiny_model_dir, tmp_path / "run", config)
    checkpoint = checkpoints(tmp_path / "run")[-1]
    assert (checkpoint / "adapter_config.json").exists() and not (checkpoint / "model.safetensors").exists()
    merged = weights(result.final_model)
    assert not any("lora" in k for k in merged)
    before = weights(tiny_model_dir)
    assert any(not torch.equal(before[k], merged[k]) for k in before if k in merged)
    # Precomputed reference = the model with adapters off: the first step is neutral.
    assert result.first["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    online = train(
        ref_pairs_dir,
        tiny_model_dir,
        tmp_path / "online",
        TrainConfig(max_steps=1, reference="online", lora=LoraSettings(r=4, alpha=8, dropout=0.0), **FAST),
    )
    assert online.first["dpo"] == pytest.approx(math.log(2), abs=1e-4)


def test_missing_or_mismatched_reference_is_a_clear_error(
    gold_pairs_dir: Path, ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="mpo ref-logps"):
        train(gold_pairs_dir, tiny_model_dir, tmp_path / "a", TrainConfig(max_steps=1, **FAST))
    mismatched = TrainConfig(max_steps=1, **{**FAST, "max_length": 1024})
    with pytest.raises(ValueError, match="max_length"):
        train(ref_pairs_dir, tiny_model_dir, tmp_path / "b", mismatched)


def test_loss_options_reach_the_loss(ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        max_steps=1, loss=MPOLossConfig(dpo_weight=0.0, bco_weight=0.0, sft_weight=1.0), **FAST
    )
    result = train(ref_pairs_dir, tiny_model_dir, tmp_path / "run", config)
    assert result.first["loss"] == pytest.approx(result.first["sft"], abs=1e-5)


def test_cli_ref_logps_and_train(gold_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mpo.cli import app

    pairs = tmp_path / "pairs"
    shutil.copytree(gold_pairs_dir, pairs)
    runner = CliRunner()
    done = runner.invoke(
        app, ["ref-logps", "--pairs", str(pairs), "--model", str(tiny_model_dir), "--max-length", "512"]
    )
    assert done.exit_code == 0, done.output
    assert "40 pairs" in done.output
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 0.001\nbatch_size: 4\nloss:\n  delta_mode: ema\n")
    done = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(pairs),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(config),
            "--max-steps",
            "2",
            "--max-length",
            "512",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "trained 2 steps" in done.output
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_gradient_checkpointing_gives_the_same_steps(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = train(ref_pairs_dir, tiny_model_dir, tmp_path / "plain", TrainConfig(max_steps=2, **FAST))
    checkpointed = train(
        ref_pairs_dir,
        tiny_model_dir,
        tmp_path / "ckpt",
        TrainConfig(max_steps=2, gradient_checkpointing=True, **FAST),
    )
    for key in ("loss", "grad_norm", "reward_margin"):
        assert checkpointed.last[key] == pytest.approx(plain.last[key], rel=1e-4, abs=1e-6)
