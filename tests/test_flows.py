"""The Prefect DAG on a real (ephemeral test) API: end to end, bad input, resume, retries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from prefect import flow, task

from flows.config import FlowConfig, StagePolicies, StagePolicy
from mpo.evaluate import overall
from mpo.pairs import PairingConfig
from mpo.results import RunSummary
from mpo.sampling import SamplingConfig
from mpo.synth import VERIFY_MODES, generate
from mpo.train import TrainConfig
from tasks.stages import retry_unless_bad_input, run_step, with_stage_policy

pytestmark = pytest.mark.usefixtures("prefect_api")

NO_RETRIES = StagePolicies(**{name: StagePolicy(retries=0) for name in StagePolicies.model_fields})


def tiny_config(data: Path, model: Path, workdir: Path, **overrides) -> FlowConfig:
    fields = dict(
        workdir=workdir,
        train_data=data / "meta.json",
        heldout_data=data / "meta_heldout.json",
        model=str(model),
        sampling=SamplingConfig(n=2, max_tokens=12, dropout_max_tokens=8, prompts_per_shard=8),
        pairing=PairingConfig(verify_modes=VERIFY_MODES),
        training=TrainConfig(max_steps=2, batch_size=4, max_length=512, learning_rate=1e-4),
        eval_max_tokens=12,
        stages=NO_RETRIES,
    )
    return FlowConfig(**{**fields, **overrides})


def data_only_config(data: Path, model: Path, tmp_path: Path) -> FlowConfig:
    """Sampling and pairing only, with cached stage results persisted under ``tmp_path/results``."""
    return tiny_config(
        data, model, tmp_path / "run", train=False, evaluate=False, result_storage=str(tmp_path / "results")
    )


def shard_stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*/shard-*.parquet"))}


def test_data_engine_end_to_end_with_bad_input_quarantined(tiny_model_dir: Path, tmp_path: Path) -> None:
    from prefect.artifacts import Artifact

    from flows.data_engine import data_engine

    data = tmp_path / "data"
    generate(data, count=10, seed=0)
    (data / "images" / "synth_count" / "train_00000.png").write_bytes(b"not a png")  # corrupt image
    with (data / "annotations" / "train" / "synth_colour.jsonl").open("a") as handle:
        handle.write('{"image": "x.png", "question": \n')  # malformed line
    limited = StagePolicy(retries=0, time_limit_seconds=600)  # sampling runs in a child process
    config = tiny_config(
        data,
        tiny_model_dir,
        tmp_path / "run",
        sft_baseline=True,
        stages=NO_RETRIES.model_copy(update={"sampling": limited}),
    )

    summary = data_engine(config)

    assert summary.ingest.drops == {"corrupt_image": 1, "malformed_json": 1}
    assert summary.ingest.counts["prompts"] == 47
    assert [s.stage for s in summary.sampling] == ["correctness", "dropout_ntp"]
    pairs_dir = Path(summary.trainings["mpo"].final_model).parents[1]
    assert summary.pairs.counts["pairs"] > 0 and summary.trainings["mpo"].counts["steps"] == 2
    assert set(summary.evaluation) == {"start", "mpo", "sft"}
    written = RunSummary.read(tmp_path / "run" / "summary.json")
    assert written == summary and set(written.models) == {"start", "mpo", "sft"}
    assert written.models["sft"].endswith("final")
    assert [r.stage for r in summary.stages()] == [
        "ingest:meta.json",
        "ingest:meta_heldout.json",
        "correctness",
        "dropout_ntp",
        "pairs",
        "reference",
        "train:mpo",
        "train:sft",
        "evaluate:start",
        "evaluate:mpo",
        "evaluate:sft",
    ]
    assert all(r.seconds > 0 for r in summary.stages())
    assert set(summary.evaluation["start"].by_dataset) == {
        "synth_arith",
        "synth_choice",
        "synth_colour",
        "synth_compare",
        "synth_count",
    }
    # the paired differences read back the same answers the accuracy tables counted
    assert set(summary.comparison) == {"mpo - start", "sft - start", "mpo - sft"}
    for pair, compared in summary.comparison.items():
        first, second = pair.split(" - ")
        expected = overall(summary.evaluation[first].by_dataset) - overall(
            summary.evaluation[second].by_dataset
        )
        assert compared.difference == pytest.approx(expected) and compared.standard_error >= 0
    assert pairs_dir.is_dir()
    keys = ["mpo-run-summary", "mpo-pairs-per-source", "mpo-training-curves"]
    artifacts = {key: Artifact.get(key) for key in keys}
    assert all(artifacts.values())
    markdown = artifacts["mpo-run-summary"].data
    assert "corrupt_image: 1" in markdown and "malformed_json: 1" in markdown
    assert "Held-out accuracy" in markdown and "- mpo - sft: " in markdown

    # the run's charts, linked from the summary, and `mpo report` draws them again
    from PIL import Image
    from typer.testing import CliRunner

    from mpo.cli import app
    from mpo.report import PLOTS

    charts = tmp_path / "run" / "plots"
    assert sorted(p.name for p in charts.glob("*.png")) == sorted(PLOTS)
    assert all(Image.open(charts / name).size[0] >= 600 for name in PLOTS)
    assert "## Charts" in markdown and str(charts / "pairs.png") in markdown
    assert markdown.count("](data:image/png;base64,") == len(PLOTS)  # shown in the UI, not only named
    for name in PLOTS:
        (charts / name).unlink()
    redrawn = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert redrawn.exit_code == 0, redrawn.output
    assert "3 charts written" in redrawn.output and all((charts / name).is_file() for name in PLOTS)
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no run summary" in missing.output


def test_a_failed_shard_resumes_without_recomputing_or_duplicating(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpo.sampling
    from flows.data_engine import data_engine

    data = tmp_path / "data"
    generate(data, count=10, seed=0)
    config = data_only_config(data, tiny_model_dir, tmp_path)
    real = mpo.sampling._sample_rows
    calls = {"correctness": 0}

    def flaky(stage, planned, engine):
        if stage == "correctness":
            calls["correctness"] += 1
            if calls["correctness"] == 3:
                raise RuntimeError("worker lost (injected)")
        return real(stage, planned, engine)

    monkeypatch.setattr(mpo.sampling, "_sample_rows", flaky)
    state = data_engine(config, return_state=True)
    assert state.is_failed()
    before = shard_stats(tmp_path / "run" / "samples")
    correctness_before = [n for n in before if n.startswith("shard-")]
    assert len(correctness_before) >= 2 + 1  # two correctness shards + the DropoutNTP shard made it

    summary = data_engine(config)
    after = shard_stats(tmp_path / "run" / "samples")
    for name, stat in before.items():
        assert after[name] == stat, f"{name} was recomputed"
    correctness = next(s for s in summary.sampling if s.stage == "correctness")
    assert correctness.counts["skipped_shards"] == 2 and correctness.counts["shards"] == 5
    samples = pl.read_parquet(Path(correctness.out_dir) / "*.parquet")
    assert samples.height == 40 * 2
    assert samples.select("prompt_id", "sample_index").n_unique() == samples.height
    assert len(list((tmp_path / "results").iterdir())) >= 3  # cached results of 2 sampling stages + pairs


def test_a_refresh_samples_only_new_prompts_into_a_new_data_version(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A scheduled refresh: the annotation files grew; only the new prompts are sampled, old
    shards stay untouched, and the pairs land in a new data version covering every prompt."""
    from flows.data_engine import data_engine
    from mpo.sampling import read_prompts

    data = tmp_path / "data"
    generate(data, count=10, seed=0, heldout_fraction=0.0)
    config = tiny_config(data, tiny_model_dir, tmp_path / "run", train=False, evaluate=False)
    first = data_engine(config)
    before = shard_stats(tmp_path / "run" / "samples")

    generate(data, count=13, seed=0, heldout_fraction=0.0)  # the same 10 prompts per dataset + 3 new ones
    second = data_engine(config)

    after = shard_stats(tmp_path / "run" / "samples")
    assert all(after[name] == stat for name, stat in before.items()), "a finished shard was rewritten"
    written = {s.stage: s.counts["samples_written"] for s in second.sampling}
    assert written == {
        "correctness": 5 * 3 * 2,
        "dropout_ntp": 3,
    }  # 3 new prompts per dataset, n=2 / one continuation
    assert second.data_version != first.data_version
    assert (tmp_path / "run" / "pairs" / first.data_version).is_dir()  # the old version is kept as it was
    correctness = next(s for s in second.sampling if s.stage == "correctness")
    samples = pl.read_parquet(Path(correctness.out_dir) / "*.parquet")
    assert (
        samples.height == 5 * 13 * 2
        and samples.select("prompt_id", "sample_index").n_unique() == samples.height
    )
    pairs = pl.read_parquet(tmp_path / "run" / "pairs" / second.data_version / "data" / "*.parquet")
    prompts = read_prompts(tmp_path / "run" / "ingested" / "prompts")
    assert set(pairs["prompt_id"]) <= set(prompts["prompt_id"])
    assert second.pairs.counts["pairs"] > first.pairs.counts["pairs"]

    third = data_engine(config)  # nothing new: same version, nothing sampled
    assert third.data_version == second.data_version
    assert shard_stats(tmp_path / "run" / "samples") == after


def test_a_deleted_work_folder_or_new_weights_are_resampled_not_served_from_the_cache(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Cached stage results name folders: a result whose folder is gone, or whose model was
    rewritten at the same path, must be recomputed, never returned."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    from flows.data_engine import data_engine

    data, model = tmp_path / "data", tmp_path / "model"
    generate(data, count=6, seed=0, heldout_fraction=0.0)
    shutil.copytree(tiny_model_dir, model)
    config = data_only_config(data, model, tmp_path)
    first = data_engine(config)
    assert first.pairs.pairs_by_source.get("dropout_ntp", 0) > 0

    shutil.rmtree(tmp_path / "run")
    second = data_engine(config)
    assert {s.stage: s.counts["samples_written"] for s in second.sampling} == {
        s.stage: s.counts["samples_written"] for s in first.sampling
    }
    assert second.pairs.pairs_by_source == first.pairs.pairs_by_source

    weights = AutoModelForImageTextToText.from_pretrained(model)
    with torch.no_grad():
        for parameter in weights.parameters():
            parameter.add_(0.01)
    weights.save_pretrained(model)  # retrained in place: same path, new weights
    third = data_engine(config)
    assert all(s.counts["samples_written"] > 0 for s in third.sampling)
    assert {Path(s.out_dir).name for s in third.sampling}.isdisjoint(
        Path(s.out_dir).name for s in second.sampling
    )
    assert third.data_version != second.data_version


def test_bad_input_is_not_retried_but_transient_failures_are() -> None:
    attempts = {"bad": 0, "transient": 0}

    @task
    def fails(kind: str) -> None:
        attempts[kind] += 1
        raise ValueError("bad row") if kind == "bad" else RuntimeError("flaky")

    @flow
    def run(kind: str) -> None:
        with_stage_policy(fails, StagePolicy(retries=2, retry_delay_seconds=0, retry_jitter_factor=0))(kind)

    assert run("bad", return_state=True).is_failed()
    assert run("transient", return_state=True).is_failed()
    assert attempts == {"bad": 1, "transient": 3}


def test_a_stage_past_its_hard_limit_fails_as_transient(
    prompts_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from mpo import jobs
    from mpo.step import Step
    from mpo.time_limit import StageTimeout

    step = Step.of(
        jobs.sample_job,
        "sample-correctness",
        "sampling",
        kwargs={
            "stage": "correctness",
            "prompts_dir": str(prompts_dir),
            "model": str(tiny_model_dir),
            "engine": "transformers",
            "engine_options": {},
            "sampling": SamplingConfig(n=1, max_tokens=4),
            "out": str(tmp_path),
        },
        time_limit=0.5,
    )

    @flow
    def run() -> None:
        run_step(step)

    state = run(return_state=True)
    assert state.is_failed()
    with pytest.raises(StageTimeout):
        state.result()
    assert retry_unless_bad_input(None, None, state)  # type: ignore[arg-type]


def test_stage_policy_sets_backoff_and_tags() -> None:
    policy = StagePolicy(retries=3, retry_delay_seconds=5, retry_jitter_factor=0.5, tags=["gpu"])
    configured = with_stage_policy(run_step, policy)
    assert configured.retries == 3
    assert configured.retry_delay_seconds == [5, 10, 20]
    assert configured.retry_jitter_factor == 0.5
    assert configured.tags == {"gpu"}
    assert configured.retry_condition_fn is retry_unless_bad_input


def test_the_one_task_runs_an_ingest_step(synth_dir: Path, tmp_path: Path) -> None:
    from mpo.pipeline import Steps

    config = FlowConfig(workdir=tmp_path, train_data=synth_dir / "meta.json", model="m")
    result = run_step.fn(Steps(config).ingest(synth_dir / "meta.json", tmp_path / "ingested"))
    assert result.counts["prompts"] == 48 and len(result.version) >= 8
    assert json.loads((tmp_path / "ingested" / "report.json").read_text())["counts"]["prompts"] == 48


def test_config_loads_from_yaml_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(
        "workdir: run\ntrain_data: data/meta.json\nmodel: /models/x\nsampling:\n  n: 4\ntraining:\n  max_steps: 3\n"
    )
    config = FlowConfig.from_yaml(tmp_path / "cfg.yaml")
    assert config.workdir == tmp_path / "run" and config.train_data == tmp_path / "data" / "meta.json"
    assert config.sampling.n == 4 and config.training.max_steps == 3
    assert config.stages.sampling.tags == ["gpu"]


@pytest.mark.timeout(600)
def test_dask_task_runner_on_a_two_worker_local_cluster(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    from flows.data_engine import run_flow

    data = tmp_path / "data"
    generate(data, count=10, seed=0)
    config = tiny_config(
        data,
        tiny_model_dir,
        tmp_path / "run",
        train=False,
        evaluate=False,
        task_runner="dask",
        dask_workers=2,
        dask_processes=False,
    )
    assert isinstance(config.task_runner_instance(), DaskTaskRunner)
    summary = run_flow(config)
    assert {s.stage for s in summary.sampling} == {"correctness", "dropout_ntp"}
    assert sum(s.counts["samples_written"] for s in summary.sampling) == 40 * 2 + 8
    assert summary.pairs.counts["pairs"] > 0


def test_demo_command_runs_the_whole_job_and_a_rerun_keeps_its_model(tmp_path: Path) -> None:
    """`mpo demo` on a tiny budget: data, warm-up, the DAG, the three-model table; a re-run
    with the same recipe keeps the starting model (finished stages stay valid)."""
    from typer.testing import CliRunner

    from mpo.cli import app

    args = [
        "demo",
        "--workdir",
        str(tmp_path / "run"),
        "--count",
        "12",
        "--warmup-steps",
        "2",
        "--warmup-count",
        "6",
        "--sample-n",
        "2",
        "--train-steps",
        "2",
        "--image-size",
        "112",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for heading in (
        "Held-out accuracy",
        "start",
        "mpo",
        "sft",
        "± standard error",
        "mpo - sft: ",
        "Time per step",
        "pairs",
    ):
        assert heading in first.output
    # one line per long step, each ended at 100%, not the task runs' log lines
    steps = [line for line in first.output.splitlines() if "100%" in line]
    for label in ("data + tiny model", "sample-correctness", "train-mpo", "train-sft", "evaluate-sft"):
        assert sum(label in line for line in steps) == 1, (label, steps)
    assert "Finished in state Completed()" not in first.output.replace("Flow run", "")
    built = tmp_path / "run" / "model-start" / "tiny_model.json"
    recipe = json.loads(built.read_text())
    assert recipe["warmup_steps"] == 2 and recipe["image_size"] == 112 and recipe["warmup_prior_bias"] == 0.5
    assert recipe["warmup_prior_in_reasoning"] is True
    weights = tmp_path / "run" / "model-start" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.engines
def test_data_engine_samples_with_vllm_in_the_engines_own_environment(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The flow (Prefect's environment) hands sampling to vLLM's environment (``engine_python``):
    the two cannot share one. ``make test-engines`` sets MPO_VLLM_PYTHON."""
    import os

    from flows.data_engine import data_engine
    from mpo.schemas import SAMPLES, read_dir

    python = os.environ.get("MPO_VLLM_PYTHON")
    if not python:
        pytest.skip("needs the vLLM environment's interpreter in MPO_VLLM_PYTHON (make test-engines)")
    data = tmp_path / "data"
    generate(data, count=5, seed=0)
    options = {"max_model_len": 2048, "dtype": "float32", "max_num_seqs": 16}
    config = tiny_config(
        data,
        tiny_model_dir,
        tmp_path / "run",
        engine="vllm",
        engine_options=options,
        engine_python=python,
        train=False,
        evaluate=False,
    )

    summary = data_engine(config)

    assert [s.stage for s in summary.sampling] == ["correctness", "dropout_ntp"]
    for stage in summary.sampling:
        samples = pl.from_arrow(read_dir(stage.out_dir, SAMPLES))
        assert samples.height == stage.counts["samples_written"] > 0
        assert samples["sampling_config"].str.contains('"engine": "vllm"').all()
    assert summary.pairs.counts["pairs"] >= 0 and not summary.trainings


def test_the_local_runner_and_the_prefect_flow_make_the_same_pairs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One pipeline, two runners: ``mpo.pipeline.run_local`` (no orchestrator) and the Prefect flow,
    on the same config in two work folders, sample, pair and train alike."""
    from flows.data_engine import data_engine
    from mpo.pipeline import run_local

    data = tmp_path / "data"
    generate(data, count=6, seed=0)
    summaries = {}
    for name, runner in (("local", run_local), ("prefect", data_engine)):
        config = tiny_config(data, tiny_model_dir, tmp_path / name, evaluate=False, sft_baseline=True)
        summaries[name] = runner(config)
    local, prefect = summaries["local"], summaries["prefect"]
    assert local.data_version == prefect.data_version
    assert local.pairs.model_dump(exclude={"seconds", "out_dir"}) == prefect.pairs.model_dump(
        exclude={"seconds", "out_dir"}
    )
    pairs = {
        name: pl.read_parquet(tmp_path / name / "pairs" / s.data_version / "data" / "*.parquet")
        for name, s in summaries.items()
    }
    assert pairs["local"].height > 0
    assert (
        pairs["local"]
        .select("pair_id", "chosen", "rejected")
        .sort("pair_id")
        .equals(pairs["prefect"].select("pair_id", "chosen", "rejected").sort("pair_id"))
    )
    assert set(local.models) == set(prefect.models) == {"start", "mpo", "sft"}
    assert local.trainings["mpo"].counts == prefect.trainings["mpo"].counts == {"steps": 2}
    assert RunSummary.read(tmp_path / "local" / "summary.json") == local


def test_mpo_run_with_the_local_runner_shows_a_line_per_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``mpo run --runner local``: no orchestrator; each step one line on the terminal, then the summary."""
    import yaml
    from typer.testing import CliRunner

    from mpo.cli import app
    from mpo.config import PipelineConfig

    data = tmp_path / "data"
    generate(data, count=4, seed=0)
    config = tiny_config(data, tiny_model_dir, tmp_path / "run", evaluate=False)
    fields = {k: v for k, v in config.model_dump(mode="json").items() if k in PipelineConfig.model_fields}
    del fields["stages"]  # the Prefect runner's retry policies; the local runner has none
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(fields))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "config.yaml"), "--runner", "local"])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if "100%" in line]
    labels = [
        "ingest-meta.json",
        "sample-correctness",
        "sample-dropout_ntp",
        "pairs",
        "reference-logps",
        "train-mpo",
    ]
    assert [next((label for label in labels if label in line), line) for line in steps] == labels
    assert "MPO data engine run" in result.output and "train:mpo" in result.output
    assert RunSummary.read(tmp_path / "run" / "summary.json").trainings["mpo"].counts["steps"] == 2


def test_cached_stage_results_of_another_shape_are_recomputed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached sampling and pairing results are pickled ``mpo.results`` objects: a run with the same
    inputs gets them back as they were, but once their shape changes (another version of the
    package) they miss the cache and the stages run again, resuming from their stores."""
    import mpo.results
    from flows.data_engine import data_engine

    data = tmp_path / "data"
    generate(data, count=4, seed=0, heldout_fraction=0.0)
    config = data_only_config(data, tiny_model_dir, tmp_path)
    first = data_engine(config)
    assert all(s.counts["samples_written"] > 0 for s in first.sampling)
    assert data_engine(config).sampling == first.sampling  # served from the cache, seconds and all

    monkeypatch.setattr(mpo.results, "shape_version", lambda: "another-shape")
    again = data_engine(config)
    for result in again.sampling:
        assert result.counts["samples_written"] == 0
        assert result.counts["skipped_shards"] == result.counts["shards"] > 0
    assert again.pairs.counts == first.pairs.counts


def test_sampling_stages_wait_for_each_other_where_engines_cannot_share_a_device(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """vLLM and lmdeploy each reserve most of a GPU's memory: their two sampling stages run one
    after the other by default (the transformers engine's run at once), and the field decides."""
    from prefect.client.orchestration import get_client

    from flows.data_engine import data_engine

    def config_for(engine: str, **fields: Any) -> FlowConfig:
        return FlowConfig(workdir=tmp_path, train_data=tmp_path, model="m", engine=engine, **fields)

    assert config_for("transformers").sample_stages_together()
    assert not config_for("vllm").sample_stages_together()
    assert not config_for("lmdeploy").sample_stages_together()
    assert config_for("vllm", sampling_stages_at_once=True).sample_stages_together()

    data = tmp_path / "data"
    generate(data, count=4, seed=0, heldout_fraction=0.0)
    config = tiny_config(
        data, tiny_model_dir, tmp_path / "run", train=False, evaluate=False, sampling_stages_at_once=False
    )
    state = data_engine(config, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = [
            run
            for run in client.read_task_runs()
            if run.flow_run_id == state.state_details.flow_run_id and run.name.startswith("sample-")
        ]
    first, second = sorted(runs, key=lambda run: run.start_time)
    assert [first.name, second.name] == ["sample-correctness", "sample-dropout_ntp"]
    assert second.start_time >= first.end_time
