"""The trainer's guards against silent wrong runs: dropout, a wrong or differently computed
reference, logit processing the log-probs would skip, and ranks that have nothing to train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpo.logps import PairLogps, load_vlm
from mpo.ref_logps import compute_reference_logps, reference_specs
from mpo.train import LoraSettings, TrainConfig, read_metrics, train

FAST = {"learning_rate": 1e-3, "batch_size": 4, "max_length": 512, "warmup_ratio": 0.0}
WORKER = Path(__file__).with_name("ddp_worker.py")


def model_copy(source: Path, target: Path, **text_config: object) -> Path:
    """The tiny model with changed config fields (its weights are the same bytes)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"].update(text_config)
    if "attention_dropout" in text_config:  # dropout everywhere the vision tower has it too
        config["vision_config"].update(attention_dropout=0.1, hidden_dropout_prob=0.1, projection_dropout=0.1)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def dropout_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_copy(tiny_model_dir, tmp_path_factory.mktemp("dropout") / "model", attention_dropout=0.1)


@pytest.fixture(scope="module")
def dropout_ref_pairs(
    gold_pairs_dir: Path, dropout_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("dropout-ref") / "pairs"
    shutil.copytree(gold_pairs_dir, out)
    compute_reference_logps(out, dropout_model, max_length=512)
    return out


@pytest.mark.parametrize("mode", ["precomputed", "online", "lora-online"])
def test_step_0_margin_is_exactly_zero_with_dropout_in_the_config(
    mode: str, dropout_model: Path, dropout_ref_pairs: Path, tmp_path: Path
) -> None:
    options: dict = {"reference": "precomputed" if mode == "precomputed" else "online"}
    if mode == "lora-online":
        options["lora"] = LoraSettings(r=4, alpha=8, dropout=0.1)
    first = train(
        dropout_ref_pairs, dropout_model, tmp_path / "on", TrainConfig(max_steps=1, **options, **FAST)
    ).first
    assert first["reward_margin"] == 0.0 and first["reward_chosen"] == 0.0 and first["reward_rejected"] == 0.0
    noisy = train(
        dropout_ref_pairs,
        dropout_model,
        tmp_path / "kept",
        TrainConfig(max_steps=1, disable_dropout=False, **options, **FAST),
    ).first
    assert noisy["reward_chosen"] != 0.0  # the guard is what makes it zero


def test_a_reference_of_another_model_is_refused_by_name_unless_allowed(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mpo.tiny_model import build_tiny_model

    other = tmp_path / "other-model"
    build_tiny_model(other, seed=1)
    with pytest.raises(
        ValueError,
        match="reference log-probs come from .*tiny-model.*but the reference of this run "
        "is .*other-model.*mpo ref-logps.*allow-other-reference",
    ):
        train(ref_pairs_dir, other, tmp_path / "refused", TrainConfig(max_steps=1, **FAST))
    accepted = train(
        ref_pairs_dir,
        other,
        tmp_path / "allowed",
        TrainConfig(max_steps=1, allow_other_reference=True, **FAST),
    )
    assert accepted.first["reward_margin"] != 0.0  # another model's log-probs: not a neutral start


def test_reference_precision_is_recorded_and_must_match_training(
    gold_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """bf16 autocast emulated on the CPU: references computed as training computes give an exactly
    neutral first step; computed otherwise, they are refused before any step."""
    pairs = tmp_path / "pairs"
    shutil.copytree(gold_pairs_dir, pairs)
    compute_reference_logps(pairs, tiny_model_dir, max_length=512, bf16=True)
    assert all(
        s["precision"] == {"device": "cpu", "weights": "float32", "autocast": "bfloat16"}
        for s in reference_specs(pairs)
    )
    first = train(pairs, tiny_model_dir, tmp_path / "bf16", TrainConfig(max_steps=1, bf16=True, **FAST)).first
    assert first["reward_margin"] == 0.0 and first["reward_chosen"] == 0.0
    online = train(
        pairs,
        tiny_model_dir,
        tmp_path / "online",
        TrainConfig(max_steps=1, bf16=True, reference="online", **FAST),
    ).first
    assert online["reward_margin"] == 0.0 and online["reward_chosen"] == 0.0
    with pytest.raises(
        ValueError, match="computed under.*bfloat16.*training computes under.*'autocast': None"
    ):
        train(pairs, tiny_model_dir, tmp_path / "fp32", TrainConfig(max_steps=1, bf16=False, **FAST))


def test_models_that_process_their_logits_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    capped = model_copy(tiny_model_dir, tmp_path / "capped", final_logit_softcapping=30.0)
    model, _ = load_vlm(capped)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*not supported"):
        PairLogps(model)


def with_an_over_long_pair(ref_pairs_dir: Path, out: Path, keep: int) -> Path:
    """``keep`` pairs of the reference-scored pairs plus one whose prompt cannot fit 512 tokens."""
    (out / "data").mkdir(parents=True)
    table = pq.read_table(next((ref_pairs_dir / "data").glob("*.parquet"))).slice(0, keep)
    long_row = {name: table.column(name)[0].as_py() for name in table.column_names}
    long_row.update(
        pair_id="f" * 16,
        prompt=long_row["prompt"] + " and then" * 600,
        ref_chosen_logp=None,
        ref_rejected_logp=None,
    )
    combined = pa.concat_tables([table, pa.Table.from_pylist([long_row], schema=table.schema)])
    pq.write_table(
        combined.replace_schema_metadata(table.schema.metadata), out / "data" / "part-00000.parquet"
    )
    return out


@pytest.mark.timeout(600)
def test_two_ranks_finish_when_one_has_only_an_over_long_pair(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """2 gloo ranks, one pair per micro-batch, 3 fitting pairs and 1 over-long: each epoch one rank
    draws the long pair. It trains a fitting pair at weight zero instead of leaving the collectives."""
    pairs = with_an_over_long_pair(ref_pairs_dir, tmp_path / "pairs", keep=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(WORKER),
        str(pairs),
        str(tiny_model_dir),
        str(tmp_path / "run"),
        "1",
        "4",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert sum(r["skipped_too_long"] for r in steps) == 2  # once per epoch of 2 steps
    assert sum(r["pairs"] for r in steps) == 6  # 8 micro-batches, 2 of them the long pair
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_one_process_counts_over_long_pairs_it_skips(
    ref_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = with_an_over_long_pair(ref_pairs_dir, tmp_path / "pairs", keep=3)
    result = train(
        pairs, tiny_model_dir, tmp_path / "run", TrainConfig(max_steps=4, **{**FAST, "batch_size": 1})
    )
    steps = read_metrics(result.metrics_file)
    assert result.drops["too_long"] == sum(r["skipped_too_long"] for r in steps) == 1
    assert sum(r["pairs"] for r in steps) == 3
