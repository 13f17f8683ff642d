"""``run_pipeline`` under a recording runner: which steps run, in which order, what runs together.

No models and no orchestrator: the runner records each step and returns a result of the job's
shape, so these tests check the chain's decisions (every runner honours every config field) in
seconds. ``Step`` itself is data: it round-trips through JSON with its arguments typed again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mpo.config import PipelineConfig
from mpo.pairs import PairingConfig
from mpo.pipeline import LocalRunner, RunLayout, run_pipeline
from mpo.results import EvalResult, IngestResult, PairsResult, StageResult, TrainingResult
from mpo.sampling import SamplingConfig
from mpo.step import Step
from mpo.train import TrainConfig


class RecordingRunner:
    """Runs nothing: records each call (a list of step labels: one, or those run together)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.steps: list[Step] = []
        self.published = False

    def run(self, step: Step) -> Any:
        self.calls.append([step.label])
        return self._result(step)

    def run_together(self, steps: list[Step]) -> list[Any]:
        self.calls.append([step.label for step in steps])
        return [self._result(step) for step in steps]

    def publish(self, summary: Any) -> None:
        self.published = True

    def _result(self, step: Step) -> Any:
        self.steps.append(step)
        kwargs = step.kwargs
        name = step.job.split(":")[1]
        if name == "ingest_job":
            kinds = {"closed": 100, "open": 10}
            return IngestResult(stage=step.label, out_dir=kwargs["out"], version="0123456789ab", kinds=kinds)
        if name == "sample_job":
            return StageResult(stage=kwargs["stage"], out_dir=f"{kwargs['out']}/{kwargs['stage']}")
        if name == "pairs_job":
            return PairsResult(stage="pairs", out_dir=kwargs["out"], counts={"pairs": 0})
        if name == "train_job":
            out = kwargs["out"]
            return TrainingResult(
                stage=step.label, out_dir=out, final_model=f"{out}/final", metrics_file=f"{out}/metrics.jsonl"
            )
        if name == "evaluate_job":
            scores = {"d": {"prompts": 10, "correct": 5, "format_failures": 0, "accuracy": 0.5}}
            return EvalResult(
                stage=step.label, out_dir=kwargs["out"], model=kwargs["model"], by_dataset=scores
            )
        if name == "compare_job":
            return {}
        return StageResult(stage=step.label, out_dir=str(kwargs.get("pairs_dir", "")))


def config_for(tmp_path: Path, **fields: Any) -> PipelineConfig:
    values: dict[str, Any] = {
        "workdir": tmp_path / "run",
        "train_data": tmp_path / "meta.json",
        "heldout_data": tmp_path / "meta_heldout.json",
        "model": str(tmp_path / "model"),
        **fields,
    }
    return PipelineConfig(**values)


def record(config: PipelineConfig) -> RecordingRunner:
    runner = RecordingRunner()
    summary = run_pipeline(config, runner)
    assert runner.published
    assert RunLayout(Path(config.workdir)).summary_file.is_file()
    assert summary.workdir == str(config.workdir)
    return runner


def test_the_whole_chain_in_order_with_both_sampling_stages_together(tmp_path: Path) -> None:
    runner = record(config_for(tmp_path))
    assert runner.calls == [
        ["ingest-meta.json"],
        ["ingest-meta_heldout.json"],
        ["sample-correctness", "sample-dropout_ntp"],
        ["pairs"],
        ["reference-logps"],
        ["train-mpo"],
        ["evaluate-start"],
        ["evaluate-mpo"],
        ["compare"],
    ]


@pytest.mark.parametrize(
    ("fields", "shared"),
    [
        ({"engine": "vllm"}, False),  # each engine reserves most of a GPU: never two on one device
        ({"engine": "lmdeploy"}, False),
        ({"engine": "vllm", "sampling_stages_at_once": True}, True),
        ({"engine": "transformers", "sampling_stages_at_once": False}, False),
    ],
)
def test_sampling_steps_share_a_device_only_where_the_config_says(
    tmp_path: Path, fields: dict[str, Any], shared: bool
) -> None:
    runner = record(config_for(tmp_path, train=False, evaluate=False, **fields))
    assert runner.calls == [["ingest-meta.json"], ["sample-correctness", "sample-dropout_ntp"], ["pairs"]]
    assert {s.holds_device for s in runner.steps if s.stage == "sampling"} == {not shared}


def test_sampling_partitions_are_steps_of_one_group_merged_per_stage(tmp_path: Path) -> None:
    """100 closed prompts x 4 samples, 10 open x 1: at least 100 samples a part leaves the small
    DropoutNTP stage whole and cuts correctness into the 3 parts asked for (4 would fit)."""
    sampling = SamplingConfig(n=4, partitions=3, samples_per_partition=100)
    config = config_for(tmp_path, train=False, evaluate=False, sampling=sampling)
    runner = RecordingRunner()
    summary = run_pipeline(config, runner)
    assert runner.calls[1] == [*(f"sample-correctness-{i}of3" for i in (1, 2, 3)), "sample-dropout_ntp"]
    parts = [s for s in runner.steps if s.stage == "sampling"]
    assert [s.kwargs["partition"] for s in parts] == [(0, 3), (1, 3), (2, 3), (0, 1)]
    assert len({s.digest() for s in parts}) == 4  # each partition its own identity
    assert [(s.stage, len(s.partitions)) for s in summary.sampling] == [
        ("correctness", 3),
        ("dropout_ntp", 0),
    ]
    assert "## Partitions" in summary.render()
    assert sampling.partitions_for("correctness", 50) == 2 and sampling.partitions_for("correctness", 0) == 1


def test_the_sft_baseline_trains_beside_mpo_only_when_asked(tmp_path: Path) -> None:
    apart = record(config_for(tmp_path, sft_baseline=True, evaluate=False))
    assert apart.calls[-1] == ["train-mpo", "train-sft"]  # one group; each holds the device
    assert all(
        s.holds_device and not s.own_process and s.kwargs["torch_threads"] is None
        for s in apart.steps
        if s.stage == "train"
    )

    beside = record(config_for(tmp_path, sft_baseline=True, baseline_side_by_side=True, evaluate=False))
    assert beside.calls[-1] == ["train-mpo", "train-sft"]
    trainings = [s for s in beside.steps if s.stage == "train"]
    assert all(s.own_process and not s.holds_device and s.kwargs["torch_threads"] >= 1 for s in trainings)
    sft = trainings[1].kwargs["training"].loss
    assert (sft.dpo_weight, sft.bco_weight, sft.sft_weight) == (0.0, 0.0, 1.0)


def test_a_data_refresh_stops_after_the_pairs(tmp_path: Path) -> None:
    calls = record(config_for(tmp_path, train=False, evaluate=False)).calls
    assert calls[-1] == ["pairs"] and len(calls) == 3
    no_heldout = record(config_for(tmp_path, heldout_data=None)).calls
    assert ["ingest-meta_heldout.json"] not in no_heldout and ["compare"] not in no_heldout


def test_every_stage_limit_and_the_engine_interpreter_reach_their_steps(tmp_path: Path) -> None:
    limits = {
        stage: {"time_limit_seconds": 100.0 + i}
        for i, stage in enumerate(("ingest", "sampling", "pairs", "ref_logps", "train", "evaluate"))
    }
    runner = record(config_for(tmp_path, stages=limits, engine_python="/opt/vllm/bin/python"))
    for step in runner.steps:
        assert step.time_limit == limits[step.stage]["time_limit_seconds"], step.label
    engine_steps = {s.label for s in runner.steps if s.python == "/opt/vllm/bin/python"}
    assert engine_steps == {"sample-correctness", "sample-dropout_ntp", "evaluate-start", "evaluate-mpo"}


def test_a_step_travels_as_json_and_comes_back_typed(tmp_path: Path) -> None:
    runner = record(config_for(tmp_path, sampling=SamplingConfig(n=3), pairing=PairingConfig()))
    for step in runner.steps:
        again = Step.model_validate_json(step.model_dump_json())
        assert again.job_kwargs() == step.job_kwargs(), step.label
        assert again.digest() == step.digest()
    sample = next(s for s in runner.steps if s.stage == "sampling")
    typed = Step.model_validate_json(sample.model_dump_json()).job_kwargs()
    assert isinstance(typed["sampling"], SamplingConfig) and typed["sampling"].n == 3
    train = next(s for s in runner.steps if s.stage == "train")
    assert isinstance(Step.model_validate_json(train.model_dump_json()).job_kwargs()["training"], TrainConfig)


def test_only_steps_whose_result_names_its_data_are_cached(tmp_path: Path) -> None:
    runner = record(config_for(tmp_path))
    cached = {s.label for s in runner.steps if s.cache_key() is not None}
    assert cached == {"sample-correctness", "sample-dropout_ntp", "pairs"}
    sample = next(s for s in runner.steps if s.label == "sample-correctness")
    assert sample.output_missing()  # nothing sampled: a cached result would name a missing store
    other = sample.model_copy(update={"identity": {**(sample.identity or {}), "prompts": "another"}})
    assert other.cache_key() != sample.cache_key()
    assert sample.model_copy(update={"time_limit": 5.0}).cache_key() == sample.cache_key()


def test_a_step_with_an_unknown_argument_or_job_is_refused() -> None:
    from mpo import jobs

    step = Step.of(
        jobs.ingest_job, "ingest-x", "ingest", kwargs={"source": "x", "out": "y", "strict": 1, "typo": 2}
    )
    with pytest.raises(TypeError, match="typo"):
        step.job_kwargs()
    with pytest.raises(ValueError, match="unknown stage"):
        Step.of(jobs.ingest_job, "x", "nowhere", kwargs={})


def wait_job(seconds: float, emit: Any) -> tuple[float, float]:
    """A job that only waits: when it started and ended."""
    import time

    started = time.monotonic()
    time.sleep(seconds)
    emit({"log": "waited"})
    return started, time.monotonic()


def test_the_local_runner_runs_steps_together_at_the_same_time() -> None:
    events: list[Any] = []
    steps = [Step.of(wait_job, f"wait-{i}", "train", kwargs={"seconds": 0.5}) for i in range(2)]
    (first_start, first_end), (second_start, second_end) = LocalRunner(events.append).run_together(steps)
    assert second_start < first_end and first_start < second_end  # they overlapped
    assert events == [{"log": "waited"}] * 2
    assert [end > start for start, end in LocalRunner().run_together(steps[:1])] == [True]


def test_the_local_runner_runs_steps_holding_a_device_one_after_the_other() -> None:
    steps = [
        Step.of(wait_job, f"wait-{i}", "sampling", kwargs={"seconds": 0.3}, holds_device=True)
        for i in range(2)
    ]
    (first_start, first_end), (second_start, second_end) = LocalRunner().run_together(steps)
    assert first_end <= second_start or second_end <= first_start


def test_a_handed_over_step_has_one_key_per_attempt_whichever_run_hands_it(tmp_path: Path) -> None:
    pytest.importorskip("prefect")
    from flows.handoff import idempotency_key

    runner = record(config_for(tmp_path))
    sample = next(s for s in runner.steps if s.stage == "sampling")
    assert idempotency_key(sample, 1, "run-a") == idempotency_key(sample, 1, "run-b")
    assert idempotency_key(sample, 1, "run-a") != idempotency_key(sample, 2, "run-a")
    train = next(s for s in runner.steps if s.stage == "train")  # no output to check: this run's own
    assert idempotency_key(train, 1, "run-a") != idempotency_key(train, 1, "run-b")


def test_reference_log_probs_are_cut_into_parts_kept_in_the_runs_store(tmp_path: Path) -> None:
    runner = RecordingRunner()
    summary = run_pipeline(config_for(tmp_path, reference_partitions=2, evaluate=False), runner)
    assert ["reference-logps-1of2", "reference-logps-2of2"] in runner.calls
    parts = [s for s in runner.steps if s.stage == "ref_logps"]
    assert [s.kwargs["partition"] for s in parts] == [(0, 2), (1, 2)]
    assert {s.kwargs["store"] for s in parts} == {str(tmp_path / "run" / "reference")}
    assert summary.reference is not None and len(summary.reference.partitions) == 2


def test_a_partitioned_stage_adds_up_its_parts_counts_and_drops() -> None:
    from mpo.results import PartitionedResult, ReferenceResult

    parts = [
        ReferenceResult(stage=f"reference:{i}/2", out_dir="p", counts={"shards": 2}, drops=drops, seconds=s)
        for i, drops, s in ((1, {"too_long": 3}, 5.0), (2, {}, 7.0))
    ]
    merged = PartitionedResult.merge("reference", parts)
    assert merged.counts == {"shards": 4} and merged.drops == {"too_long": 3} and merged.seconds == 7.0
