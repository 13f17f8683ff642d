import json
import os
import subprocess
import sys
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
    result = runner.invoke(
        app,
        [
            "tiny-model",
            str(tmp_path / "m"),
            "--warmup-steps",
            "2",
            "--data",
            str(synth_dir),
            "--warmup-vision-lr-scale",
            "5",
            "--image-size",
            "112",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "tiny_model.json").read_text())
    assert summary["warmup_steps"] == 2 and summary["first_loss"] > 0
    assert summary["warmup_vision_lr_scale"] == 5.0
    assert summary["image_size"] == 112 and summary["image_seq_length"] == 16  # (112 / 14 / 2) ** 2
    assert (tmp_path / "m" / "model.safetensors").exists() and (
        tmp_path / "m" / "processor_config.json"
    ).exists()


def test_synth_rejects_bad_count(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--count", "0"])
    assert result.exit_code != 0


def test_ingest_command_reports_quarantine(tmp_path: Path, synth_dir: Path) -> None:
    result = runner.invoke(app, ["ingest", str(synth_dir / "meta.json"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "synth_count" in result.output and "quarantined: none" in result.output


def test_ingest_strict_names_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "1"}\n{"answer": "2"}\n')
    done = mpo_command("ingest", str(bad), "--out", str(tmp_path / "p"), "--strict")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "bad.jsonl:2: field 'question'" in done.stderr


def test_pairs_and_export_commands_on_synth_data(tmp_path: Path, synth_dir: Path) -> None:
    """The whole CPU path: synth -> ingest -> samples (from the worked solutions) -> pairs -> export."""
    import pyarrow as pa

    from mpo.ingest import ingest
    from mpo.schemas import SAMPLES, read_dir, write_table

    ingest(synth_dir / "meta.json", tmp_path / "prompts")
    solutions = {}
    for ann in (synth_dir / "annotations" / "train").glob("*.jsonl"):
        for line in ann.read_text().splitlines():
            row = json.loads(line)
            solutions[row["question"], row.get("answer")] = row.get("solution")
    rows = []
    for prompt in read_dir(tmp_path / "prompts" / "prompts").to_pylist():
        if prompt["kind"] != "closed":
            continue
        good = solutions[prompt["question"], prompt["answer"]]
        wrong = good.rsplit("Final answer:", 1)[0] + "Final answer: X"
        for index, response in enumerate([good, wrong, "I cannot tell."]):
            rows.append(
                {
                    **{k: prompt[k] for k in ("prompt_id", "dataset", "images", "question", "answer")},
                    "prompt_version": "en",
                    "response": response,
                    "finish_reason": "stop",
                    "num_tokens": 9,
                    "sample_index": index,
                    "source": "correctness",
                    "model": "tiny",
                    "seed": 0,
                }
            )
    write_table(pa.Table.from_pylist(rows), tmp_path / "samples" / "part-0.parquet", SAMPLES)

    result = runner.invoke(
        app,
        [
            "pairs",
            str(tmp_path / "samples"),
            "--out",
            str(tmp_path / "pairs"),
            "--verify",
            "synth_choice=choice",
            "--verify",
            "synth_count=numeric",
            "--selection",
            "closest",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pairs" / "report.json").read_text())
    assert report["pairs_by_source"] == {"correctness": 40, "format": 40}
    assert report["datasets"]["synth_count"]["accuracy"] == 1 / 3

    # The wrong responses keep the gold steps: with a claim pattern they contradict themselves.
    claim = ["--claim", r"synth_count=I count (\d+)", "--verify", "synth_count=numeric"]
    result = runner.invoke(
        app, ["pairs", str(tmp_path / "samples"), "--out", str(tmp_path / "pairs-c"), *claim]
    )
    assert result.exit_code == 0, result.output
    count = json.loads((tmp_path / "pairs-c" / "report.json").read_text())["datasets"]["synth_count"]
    assert count["pairs"] == {"format": count["prompts"]}
    assert count["filtered"]["self_contradictory"] == count["prompts"]
    result = runner.invoke(
        app,
        ["pairs", str(tmp_path / "samples"), "--out", str(tmp_path / "pairs-d"), "--claim", "synth_count"],
    )
    assert result.exit_code != 0 and "--claim takes DATASET=REGEX" in result.output

    result = runner.invoke(
        app, ["export", str(tmp_path / "pairs"), "--format", "internvl", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "x" / "meta.json").read_text())
    assert set(meta) == {"synth_count", "synth_colour", "synth_compare", "synth_choice", "synth_arith"}
    first = json.loads(Path(meta["synth_count"]["annotation"]).read_text().splitlines()[0])
    assert set(first) == {"image", "question", "chosen", "rejected"}
    assert (Path(meta["synth_count"]["root"]) / first["image"]).is_file()
    assert first["question"].startswith("<image>\n")
    assert sum(m["length"] for m in meta.values()) == 80

    result = runner.invoke(
        app, ["export", str(tmp_path / "pairs"), "--format", "llava", "--out", str(tmp_path / "y")]
    )
    assert result.exit_code != 0


def test_sample_command_takes_config_fields_and_engine_options(
    tmp_path: Path, prompts_dir: Path, tiny_model_dir: Path
) -> None:
    """`mpo sample`: unset options keep SamplingConfig's defaults, --set reaches any field,
    --engine-option reaches the engine (a bad one is the engine's error, not ignored)."""
    args = [
        "sample",
        "--prompts",
        str(prompts_dir),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "s"),
        "--stage",
        "dropout_ntp",
        "--set",
        "dropout_max_tokens=4",
        "--set",
        "top_k=5",
        "--engine-option",
        "max_batch_sequences=8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (store,) = (tmp_path / "s").glob("dropout_ntp-*")
    config = json.loads((store / "_stage.json").read_text())["config"]
    assert (config["dropout_max_tokens"], config["top_k"], config["n"], config["temperature"]) == (
        4,
        5,
        32,
        0.7,
    )
    # a fresh store: a finished one has nothing to sample and loads no engine at all
    fresh = [*args[:6], str(tmp_path / "fresh"), *args[7:-2]]
    bad = CliRunner().invoke(app, [*fresh, "--engine-option", "no_such_option=1"])
    assert bad.exit_code != 0 and "no_such_option" in str(bad.exception)


def test_a_config_that_does_not_validate_names_every_wrong_field(tmp_path: Path) -> None:
    """A typo in a nested section is an error, not a silently ignored key; every wrong field is
    named by its dotted path, with the file, as a usage error (exit 2) rather than a traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "workdir: run\ntrain_data: data/meta.json\nmodel: /models/x\n"
        "sampling:\n  n: 0\n  temprature: 0.7\ntraining:\n  max_step: 3\n"
    )
    result = CliRunner().invoke(app, ["run", str(config), "--runner", "local"])
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())
    for field in ("sampling.n", "sampling.temprature", "training.max_step", "bad.yaml"):
        assert field in message, message
    assert "Traceback" not in result.output


def mpo_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed entry point's code path (``mpo.cli.main``), as a user's shell runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mpo.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_bad_input_is_one_line_naming_the_field_or_file(
    synth_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The three bad inputs a new user meets first: each one line on stderr, exit 2, no traceback."""
    import yaml

    good = {
        "workdir": str(tmp_path / "run"),
        "train_data": str(synth_dir / "meta.json"),
        "model": str(tiny_model_dir),
    }
    cases = {
        "model.yaml": (
            {**good, "model": "/nonexistent/model"},
            "model: /nonexistent/model is not a model folder",
        ),
        "data.yaml": ({**good, "train_data": str(tmp_path / "missing.json")}, "train_data: "),
    }
    for name, (fields, expected) in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(fields))
        done = mpo_command("run", str(tmp_path / name), "--runner", "local")
        assert done.returncode == 2, done.stderr[-2000:]
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert len(lines) <= 5 and "Traceback" not in done.stderr, lines
        assert expected in done.stderr and str(tmp_path / name) in done.stderr
    assert not (tmp_path / "run").exists()  # nothing started

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "shard-bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    done = mpo_command("pairs", str(samples), "--out", str(tmp_path / "pairs"))
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) <= 5, lines
    assert f"{samples / 'shard-bad.parquet'}: not a readable sample shard" in done.stderr

    debug = mpo_command("pairs", str(samples), "--out", str(tmp_path / "pairs"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr + debug.stdout


def test_the_demos_earlier_options_are_one_mapping_onto_its_config() -> None:
    import pytest
    import typer

    from mpo.cli import DEMO_OPTIONS, demo_options
    from mpo.demo import DEFAULT_CONFIG, DemoConfig

    args = ["--sample-n", "8", "--datasets=synth_count,synth_colour", "--no-claim-check", "--lr", "0.0005"]
    assert demo_options([*args, "--warmup-prior-in-reasoning"]) == {
        "pipeline.sampling.n": 8,
        "data.datasets": ["synth_count", "synth_colour"],
        "pipeline.pairing.claim_patterns": {},
        "pipeline.training.learning_rate": 5e-4,
        "tiny_model.warmup.prior_in_reasoning": True,
    }
    loaded = DemoConfig.load(DEFAULT_CONFIG, demo_options(args))
    assert loaded.pipeline["sampling"]["n"] == 8 and loaded.data.datasets == ["synth_count", "synth_colour"]
    # every earlier option names a field the config has (a typo there would be refused here)
    values = {"--workdir": "x", "--datasets": "synth_count", "--pair-selection": "closest", "--count": "10"}
    values |= {
        "--heldout-fraction": "0.5",
        "--warmup-prior-bias": "0.5",
        "--temperature": "0.5",
        "--image-size": "112",
    }
    every = [item for flag in DEMO_OPTIONS for item in (flag, values.get(flag, "1"))]
    DemoConfig.load(DEFAULT_CONFIG, demo_options(every))
    with pytest.raises(typer.BadParameter, match="no such option: --sample-m"):
        demo_options(["--sample-m", "8"])
    with pytest.raises(typer.BadParameter, match="--seed needs a value"):
        demo_options(["--seed"])
