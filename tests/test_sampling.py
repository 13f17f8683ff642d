"""Sampling stages on the tiny model: the transformers engine, both stages, resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from mpo.engines.base import GenerationRequest, SamplingParams
from mpo.engines.hf import batches, sampling_processors
from mpo.sampling import (
    SamplingConfig,
    in_partition,
    parse_variant,
    prefix_by_tokens,
    request_seed,
    run_stage,
    stage_fingerprint,
    strided_shards,
)
from mpo.schemas import SAMPLES, read_dir, write_table


def test_engine_returns_n_reproducible_completions(hf_engine, synth_dir: Path) -> None:
    image = str(next((synth_dir / "images" / "synth_count").glob("*.png")))
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12)
    request = GenerationRequest("r", "<image>\nHow many circles?", (image,), params=params, seed=7)
    first, again = hf_engine.generate([request, request])
    other = hf_engine.generate(
        [GenerationRequest("r", "<image>\nHow many circles?", (image,), params=params, seed=8)]
    )[0]
    assert len(first) == 3 and first == again and first != other
    for completion in first:
        assert completion.finish_reason in ("stop", "length") and 1 <= completion.num_tokens <= 12
        assert "<IMG_CONTEXT>" not in completion.text and "<|im_end|>" not in completion.text
    assert any(c.finish_reason == "length" and c.num_tokens == 12 for c in first + other)


def test_a_request_samples_the_same_alone_or_in_a_batch(hf_engine, synth_dir: Path, monkeypatch) -> None:
    images = sorted((synth_dir / "images" / "synth_colour").glob("*.png"))[:5]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10)
    requests = [
        GenerationRequest(
            f"r{i}", "<image>\nWhat colour is the largest shape?", (str(image),), params=params, seed=100 * i
        )
        for i, image in enumerate(images)
    ]
    batched = hf_engine.generate(requests)
    monkeypatch.setattr(hf_engine, "max_batch_sequences", 2)  # one request per generate call
    alone = hf_engine.generate(requests)
    assert batched == alone and len({c.text for row in alone for c in row}) > 2


def test_greedy_answers_do_not_depend_on_batching(hf_engine, synth_dir: Path, monkeypatch) -> None:
    images = sorted((synth_dir / "images" / "synth_count").glob("*.png"))[:6]
    params = SamplingParams(n=1, temperature=0, max_tokens=10)
    questions = ["<image>\nHow many circles are there?", "Describe a square.", "<image>\nWhat is shown?"]
    requests = [
        GenerationRequest(
            f"r{i}", questions[i % 3], (str(image),) if "<image>" in questions[i % 3] else (), params=params
        )
        for i, image in enumerate(images)
    ]
    batched = hf_engine.generate(requests)
    monkeypatch.setattr(hf_engine, "max_batch_sequences", 1)
    assert batched == hf_engine.generate(requests)


def test_gumbel_sampling_draws_from_the_tempered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    params = SamplingParams(n=1, temperature=0.5, top_k=0)
    draws = 4000
    processors = sampling_processors(params, list(range(draws)), "cpu")
    picks = processors(torch.zeros((draws, 1), dtype=torch.long), logits.repeat(draws, 1)).argmax(-1)
    observed = torch.bincount(picks, minlength=5).double() / draws
    expected = torch.softmax(logits[0].double() / 0.5, -1)
    assert torch.allclose(observed, expected, atol=0.025), (observed, expected)
    top_k = sampling_processors(SamplingParams(temperature=1.0, top_k=2), list(range(500)), "cpu")
    assert set(top_k(torch.zeros((500, 1), dtype=torch.long), logits.repeat(500, 1)).argmax(-1).tolist()) == {
        0,
        1,
    }
    assert len(sampling_processors(SamplingParams(temperature=0), [0], "cpu")) == 0


def test_batches_keep_order_params_and_the_sequence_cap() -> None:
    a, b = SamplingParams(n=4, max_tokens=8), SamplingParams(n=1, max_tokens=8)
    requests = [GenerationRequest(str(i), "q", params=a if i < 5 else b) for i in range(8)]
    grouped = [[r.request_id for r in batch] for batch in batches(requests, max_sequences=8)]
    assert grouped == [["0", "1"], ["2", "3"], ["4"], ["5", "6", "7"]]


def test_engine_continues_an_assistant_prefix(hf_engine) -> None:
    request = GenerationRequest(
        "r",
        "Describe a square.",
        assistant_prefix="The image shows",
        params=SamplingParams(n=1, temperature=0, max_tokens=6),
    )
    prompt = hf_engine.processor.tokenizer.decode(hf_engine.encode_prompts([request])["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\nThe image shows")
    assert len(hf_engine.generate([request])[0]) == 1


def test_greedy_with_n_above_one_is_refused(hf_engine) -> None:
    with pytest.raises(ValueError, match="greedy"):
        hf_engine.generate(
            [GenerationRequest("r", "q", params=SamplingParams(n=2, temperature=0, max_tokens=2))]
        )


def test_variants_and_token_prefixes(hf_engine) -> None:
    assert parse_variant("sr0.5_wo_image") == (0.5, False)
    assert parse_variant("sr0.0_with_image") == (0.0, True)
    with pytest.raises(ValueError, match="variant"):
        parse_variant("sr2_wo_image")
    tokenizer = hf_engine.tokenizer
    text = "The image shows two red circles and one blue square."
    prefix = prefix_by_tokens(text, 0.5, tokenizer)
    assert text.startswith(prefix) and 0 < len(prefix) < len(text)
    assert prefix_by_tokens("图中有两个红色的圆形", 0.5, tokenizer)  # space-splitting would give ""
    assert prefix_by_tokens(text, 0.0, tokenizer) == ""


def test_request_seeds_are_spaced_by_n() -> None:
    config = SamplingConfig()
    seeds = sorted(request_seed(config, f"p{i}", 32) for i in range(2000))
    assert min(b - a for a, b in zip(seeds, seeds[1:], strict=False)) >= 32


def test_strided_shards_cover_every_prompt_once(prompts_dir: Path) -> None:
    prompts = pl.from_arrow(read_dir(prompts_dir))
    shards = strided_shards(prompts, 7)
    assert len(shards) == 7 and sum(s.height for s in shards) == prompts.height
    assert pl.concat(shards)["prompt_id"].n_unique() == prompts.height
    assert all(s["dataset"].n_unique() > 1 for s in shards)


def test_correctness_stage_writes_samples_and_resumes(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    config = SamplingConfig(n=2, max_tokens=8, prompts_per_shard=16, temperature=1.0)
    report = run_stage("correctness", prompts_dir, hf_engine, tmp_path, config)
    assert report.counts == {"shards": 3, "skipped_shards": 0, "samples_written": 80}
    samples = pl.from_arrow(read_dir(report.out_dir, SAMPLES))
    assert samples.height == 80 and samples.select("prompt_id", "sample_index").n_unique() == 80
    assert set(samples["source"]) == {"correctness"} and set(samples["prompt_version"]) == {"en"}
    assert samples["answer"].null_count() == 0 and samples["model"][0] == hf_engine.model_id
    mtimes = {p: p.stat().st_mtime_ns for p in Path(report.out_dir).glob("*.parquet")}
    again = run_stage("correctness", prompts_dir, hf_engine, tmp_path, config)
    assert again.counts["skipped_shards"] == 3 and again.counts["samples_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in Path(report.out_dir).glob("*.parquet")} == mtimes
    changed = run_stage("correctness", prompts_dir, hf_engine, tmp_path, config.model_copy(update={"n": 1}))
    assert changed.out_dir != report.out_dir and changed.counts["samples_written"] == 40


def test_dropout_stage_rows(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    config = SamplingConfig(dropout_max_tokens=6, dropout_variants=["sr0.5_wo_image", "sr0.0_with_image"])
    report = run_stage("dropout_ntp", prompts_dir, hf_engine, tmp_path, config)
    samples = pl.from_arrow(read_dir(report.out_dir, SAMPLES))
    assert samples.height == 16 and samples.select("prompt_id", "sample_index").n_unique() == 16
    half = samples.filter(pl.col("prompt_version") == "sr0.5_wo_image")
    assert all(c.startswith(p) and p for c, p in zip(half["chosen"], half["prefix"], strict=True))
    assert set(samples.filter(pl.col("prompt_version") == "sr0.0_with_image")["prefix"]) == {""}
    assert samples["answer"].null_count() == 16 and all(len(i) == 1 for i in samples["images"])


def test_killed_stage_resumes_exactly(tiny_model_dir: Path, prompts_dir: Path, tmp_path: Path) -> None:
    """Kill `mpo sample` after its first shard lands; the re-run keeps finished shards and
    ends with every (prompt, sample_index) exactly once."""
    command = [
        sys.executable,
        "-m",
        "mpo.cli",
        "sample",
        "--prompts",
        str(prompts_dir),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path),
        "--stage",
        "correctness",
        "--n",
        "2",
        "--max-tokens",
        "24",
        "--prompts-per-shard",
        "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("correctness-*/shard-*.parquet")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in tmp_path.glob("correctness-*/shard-*.parquet")}
    assert 1 <= len(finished) < 20, "the kill should land mid-stage"
    assert not list(tmp_path.glob("correctness-*/shard-*.parquet.tmp"))

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.glob("correctness-*/shard-*.parquet")}
    assert len(after) == 20 and all(after[p] == t for p, t in finished.items())
    samples = pl.from_arrow(read_dir(next(tmp_path.glob("correctness-*")), SAMPLES))
    assert samples.height == 80 and samples.select("prompt_id", "sample_index").n_unique() == 80
    assert not [p for p in next(tmp_path.glob("correctness-*")).iterdir() if p.name.startswith(".")]


def test_a_foreign_shard_in_a_store_is_named(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    config = SamplingConfig(n=1, max_tokens=4)
    store = tmp_path / f"correctness-{stage_fingerprint('correctness', config, hf_engine.model_id)}"
    write_table(SAMPLES.empty_table(), store / "shard-foreign.parquet")
    with pytest.raises(ValueError, match="shard-foreign.parquet: sample shard without 'mpo.prompt_keys'"):
        run_stage("correctness", prompts_dir, hf_engine, tmp_path, config)


def test_partitions_cut_the_prompts_by_key_alone(prompts_dir: Path) -> None:
    """Every prompt in exactly one part; a prompt's part depends on its key and the count, not on
    the rest of the set, so a refresh or a concurrent run cuts the same parts."""
    prompts = pl.from_arrow(read_dir(prompts_dir))
    parts = [in_partition(prompts, (i, 4)) for i in range(4)]
    assert sum(p.height for p in parts) == prompts.height and all(p.height for p in parts)
    assert pl.concat(parts)["prompt_id"].n_unique() == prompts.height
    fewer = prompts.slice(5)  # prompts gone or not yet arrived move no other prompt
    for i, part in enumerate(parts):
        assert set(in_partition(fewer, (i, 4))["prompt_id"]) == set(part["prompt_id"]) - set(
            prompts.head(5)["prompt_id"]
        )
    with pytest.raises(ValueError, match="partition 4 of 4"):
        in_partition(prompts, (4, 4))
    assert stage_fingerprint("correctness", SamplingConfig(partitions=8), "m") == stage_fingerprint(
        "correctness", SamplingConfig(), "m"
    )


def test_partitions_sample_what_one_run_samples(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    config = SamplingConfig(n=2, max_tokens=6, prompts_per_shard=8)
    whole = run_stage("correctness", prompts_dir, hf_engine, tmp_path / "whole", config)
    parts = [
        run_stage("correctness", prompts_dir, hf_engine, tmp_path / "parts", config, partition=(i, 3))
        for i in range(3)
    ]
    assert (
        len({p.out_dir for p in parts}) == 1
        and sum(p.counts["samples_written"] for p in parts) == whole.counts["samples_written"]
    )
    columns = ["prompt_id", "sample_index", "response", "seed"]
    expected = pl.from_arrow(read_dir(whole.out_dir, SAMPLES)).select(columns).sort(columns)
    got = pl.from_arrow(read_dir(parts[0].out_dir, SAMPLES)).select(columns).sort(columns)
    assert got.equals(expected)
    assert all(
        "-p00" in p.name or "-p01" in p.name or "-p02" in p.name
        for p in Path(parts[0].out_dir).glob("shard-*")
    )
    again = run_stage("correctness", prompts_dir, hf_engine, tmp_path / "parts", config, partition=(1, 3))
    assert (
        again.counts["samples_written"] == 0 and again.counts["skipped_shards"] == parts[1].counts["shards"]
    )


def test_two_runs_at_once_on_one_store_are_read_once(
    tiny_model_dir: Path, prompts_dir: Path, tmp_path: Path
) -> None:
    """Two `mpo sample` runs started together on one store, cutting their shards differently (the
    shard size is not part of a store's identity): both sample every prompt, so the store holds
    them twice, yet the stage's reader and `mpo pairs` count every sample once."""
    from mpo.pairs import PairingConfig, run_pairing
    from mpo.sampling import read_prompts, read_stage_samples

    command = [
        sys.executable, "-m", "mpo.cli", "sample", "--prompts", str(prompts_dir), "--model", str(tiny_model_dir),
        "--out", str(tmp_path / "samples"), "--stage", "correctness", "--n", "2", "--max-tokens", "12",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = [
        subprocess.Popen(
            [*command, "--prompts-per-shard", size],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for size in ("4", "5")
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read() if run.stderr else ""
    store = next((tmp_path / "samples").glob("correctness-*"))
    stored = pl.from_arrow(read_dir(store, SAMPLES))
    prompts = read_prompts(prompts_dir).filter(pl.col("kind") == "closed")
    assert stored.height > 2 * prompts.height  # some prompts sampled by both runs
    read = read_stage_samples(store, prompts)
    assert (
        read.height == 2 * prompts.height
        and read.group_by("prompt_id").len()["len"].to_list() == [2] * prompts.height
    )
    report = run_pairing([store], tmp_path / "pairs", PairingConfig(), prompts["prompt_id"])
    assert sum(stats.samples for stats in report.datasets.values()) == 2 * prompts.height


def test_a_store_holding_a_shard_twice_is_read_once(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    """The same samples under two shard names (what two overlapping writers leave): every prompt of
    those shards spans two files, and readers still count each sample once."""
    import shutil

    from mpo.pairs import PairingConfig, run_pairing
    from mpo.sampling import read_prompts, read_stage_samples

    config = SamplingConfig(n=2, max_tokens=6, prompts_per_shard=16)
    report = run_stage("correctness", prompts_dir, hf_engine, tmp_path / "samples", config)
    first = sorted(Path(report.out_dir).glob("shard-*.parquet"))[0]
    shutil.copy(first, first.with_name("shard-another-writer-00000-of-00001.parquet"))
    prompts = read_prompts(prompts_dir).filter(pl.col("kind") == "closed")
    assert pl.from_arrow(read_dir(report.out_dir, SAMPLES)).height > report.counts["samples_written"]
    assert read_stage_samples(report.out_dir, prompts).height == report.counts["samples_written"] == 80
    paired = run_pairing([report.out_dir], tmp_path / "pairs", PairingConfig(), prompts["prompt_id"])
    assert sum(stats.samples for stats in paired.datasets.values()) == 80


def test_a_partition_with_nothing_left_loads_no_engine(hf_engine, prompts_dir: Path, tmp_path: Path) -> None:
    from mpo.jobs import sample_job

    config = SamplingConfig(n=1, max_tokens=4, prompts_per_shard=8)
    kwargs = dict(
        stage="correctness", prompts_dir=str(prompts_dir), model=hf_engine.model_id, sampling=config
    )
    run_stage("correctness", prompts_dir, hf_engine, tmp_path, config, partition=(1, 2))
    done = sample_job(
        **kwargs, engine="no-such-engine", engine_options={}, out=str(tmp_path), emit=print, partition=(1, 2)
    )
    assert done.counts["samples_written"] == 0 and done.counts["skipped_shards"] == done.counts["shards"] > 0
    with pytest.raises(ValueError, match="unknown engine 'no-such-engine'"):  # part 1 of 2 is still to do
        sample_job(
            **kwargs,
            engine="no-such-engine",
            engine_options={},
            out=str(tmp_path),
            emit=print,
            partition=(0, 2),
        )
