"""Pairing rules on hand-made samples, the vectorised extractor's parity, and the output contract."""

import json
import random
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from mpo.answers import extract_answer
from mpo.pairs import PairingConfig, extract_answers, make_pairs, run_pairing
from mpo.schemas import SAMPLES, write_table


def sample(
    prompt_id: str,
    index: int,
    response: str,
    answer: str | None = "2",
    *,
    dataset: str = "count",
    finish: str = "stop",
    source: str = "correctness",
    chosen: str | None = None,
    prefix: str | None = None,
    version: str = "en",
) -> dict:
    return {
        "prompt_id": prompt_id,
        "dataset": dataset,
        "images": ["/img/a.png"],
        "question": "<image>\nHow many?",
        "answer": answer,
        "prompt_version": version,
        "response": response,
        "finish_reason": finish,
        "num_tokens": len(response.split()),
        "sample_index": index,
        "source": source,
        "model": "tiny",
        "chosen": chosen,
        "prefix": prefix,
        "seed": 0,
        "sampling_config": "{}",
    }


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=SAMPLES))


def test_cross_product_of_correct_and_wrong() -> None:
    rows = [sample("p1", i, f"Reasoning {i}. Final answer: 2") for i in range(3)]
    rows += [sample("p1", 3 + i, f"Reasoning {i}. Final answer: {v}") for i, v in enumerate(["3", "4"])]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs.height == 6
    assert set(result.pairs["source"]) == {"correctness"}
    assert set(result.pairs["chosen_answer"]) == {"2"} and set(result.pairs["rejected_answer"]) == {"3", "4"}
    assert result.pairs["prompt"][0].startswith("<image>\nYour task is to answer the question below.")
    assert result.pairs["pair_id"].n_unique() == 6


def test_failed_requests_are_never_paired() -> None:
    """An aborted or errored request (its text may look like an answer) is counted, not paired."""
    rows = [
        sample("p1", 0, "Final answer: 2"),
        sample("p1", 1, "Final answer: 2", finish="abort"),
        sample("p1", 2, "Final answer: 3", finish="error"),
        sample("p1", 3, "Final answer: 4", finish="length"),
    ]
    rows += [
        sample(
            "p2",
            0,
            "a cat on",
            source="dropout_ntp",
            chosen="a cat on a mat",
            prefix="a cat ",
            finish="error",
            answer=None,
        )
    ]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs.select("chosen", "rejected").rows() == [("Final answer: 2", "Final answer: 4")]
    assert result.report.datasets["count"].filtered["failed_request"] == 3
    assert result.report.datasets["count"].samples == 2  # accuracy is over finished samples only


def test_chosen_answer_contained_in_rejected_is_skipped_as_a_whole_answer() -> None:
    """ "2 or 5" hedges with the right answer: skipped. "12" and "2.5" are other numbers: paired."""
    rows = [
        sample("p1", 0, "Final answer: 2"),
        sample("p1", 1, "Final answer: 12"),
        sample("p1", 2, "Final answer: 5"),
        sample("p1", 3, "Final answer: 2 or 5"),
        sample("p1", 4, "Final answer: 2.5"),
    ]
    result = make_pairs(frame(rows), PairingConfig(verify_modes={"count": "numeric"}))
    assert sorted(result.pairs["rejected_answer"].to_list()) == ["12", "2.5", "5"]
    assert result.report.datasets["count"].filtered["answer_contained"] == 1
    pi = [
        sample("p2", 0, "Final answer: 3", "3"),
        sample("p2", 1, "Final answer: 3.14", "3"),
        sample("p2", 2, "Final answer: about 3 or 4", "3"),
    ]
    kept = (
        make_pairs(frame(pi), PairingConfig(verify_modes={"count": "numeric"}))
        .pairs["rejected_answer"]
        .to_list()
    )
    assert kept == ["3.14"]


def test_auto_verifier_reads_numbers_and_letters_by_the_gold_answers_shape() -> None:
    """The default verifier: 12.0 is 12, 0.3 is 3/10, 45 is "45 degrees", (b) is B; text stays exact."""
    cases = [("12", "12.0"), ("3/10", "0.3"), ("45 degrees", "45"), ("B", "(b)"), ("red", "Red")]
    rows = []
    for index, (gold, said) in enumerate(cases):
        rows += [
            sample(f"q{index}", 0, f"Final answer: {said}", gold),
            sample(f"q{index}", 1, "Final answer: 7", gold),
        ]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs.height == len(cases)
    assert sorted(result.pairs["chosen_answer"].to_list()) == sorted(said for _, said in cases)


def test_reference_bug_rejected_response_is_never_rewritten() -> None:
    rows = [sample("p1", 0, "Final answer: 2"), sample("p1", 1, "I see twelve.\nFinal answer: 12")]
    config = PairingConfig(verify_modes={"count": "numeric"})
    # Containment would skip 2-in-12; use gold 3 to keep the pair and look at its text.
    rows = [sample("p1", 0, "Final answer: 3", "3"), sample("p1", 1, "I see twelve.\nFinal answer: 12", "3")]
    pairs = make_pairs(frame(rows), config).pairs
    assert pairs["rejected"].to_list() == ["I see twelve.\nFinal answer: 12"]


def test_cap_is_deterministic_and_seeded() -> None:
    rows = [sample("p1", i, f"Reason {i}. Final answer: 2") for i in range(6)]
    rows += [sample("p1", 6 + i, f"Reason {i}. Final answer: 7") for i in range(6)]
    a = make_pairs(frame(rows), PairingConfig(pairs_per_prompt=5)).pairs
    b = make_pairs(frame(rows[::-1]), PairingConfig(pairs_per_prompt=5)).pairs
    c = make_pairs(frame(rows), PairingConfig(pairs_per_prompt=5, seed=1)).pairs
    assert a.height == 5 and a["pair_id"].to_list() == b["pair_id"].to_list()
    assert set(a["pair_id"]) != set(c["pair_id"])
    report = make_pairs(frame(rows), PairingConfig(pairs_per_prompt=5)).report
    assert report.datasets["count"].filtered["over_cap_correctness"] == 31


def test_closest_selection_keeps_the_pairs_that_part_latest() -> None:
    chosen = [
        "The circle is at the left. It is red.\nFinal answer: red",
        "The square is at the top. It is red.\nFinal answer: red",
    ]
    wrong = [
        "The circle is at the left. It is blue.\nFinal answer: blue",
        "The square is at the top. It is green.\nFinal answer: green",
        "Nothing to see. It is blue.\nFinal answer: blue",
    ]
    rows = [sample("p1", i, text, "red", dataset="colour") for i, text in enumerate(chosen + wrong)]
    closest = make_pairs(frame(rows), PairingConfig(pairs_per_prompt=2, selection="closest")).pairs
    assert sorted(zip(closest["chosen"], closest["rejected"], strict=True)) == sorted(
        [(chosen[0], wrong[0]), (chosen[1], wrong[1])]
    )
    drawn = [make_pairs(frame(rows), PairingConfig(pairs_per_prompt=2, seed=seed)).pairs for seed in range(6)]
    assert any(
        set(pairs["pair_id"]) != set(closest["pair_id"]) for pairs in drawn
    )  # the draw ignores closeness
    assert closest.columns == drawn[0].columns  # no helper column leaks out
    report = make_pairs(frame(rows), PairingConfig(pairs_per_prompt=2, selection="closest")).report
    assert report.datasets["colour"].filtered["over_cap_correctness"] == 4


def test_self_contradictory_responses_are_paired_on_neither_side() -> None:
    texts = [
        "The circle is largest. It is red.\nFinal answer: red",  # right, steps agree: chosen
        "The square is largest. It is blue.\nFinal answer: red",  # right by luck: steps say blue
        "The circle is largest. It is red.\nFinal answer: green",  # wrong after right steps
        "The square is largest. It is Blue.\nFinal answer: blue",  # wrong, steps agree (case-blind verifier)
        "No steps at all.\nFinal answer: yellow",
    ]  # no claim to check: stays
    rows = [sample("p1", i, text, "red", dataset="colour") for i, text in enumerate(texts)]
    config = PairingConfig(claim_patterns={"colour": r"It is (\w+)\."})
    result = make_pairs(frame(rows), config)
    assert sorted(zip(result.pairs["chosen"], result.pairs["rejected"], strict=True)) == sorted(
        [(texts[0], texts[3]), (texts[0], texts[4])]
    )
    assert result.report.datasets["colour"].filtered["self_contradictory"] == 2
    assert make_pairs(frame(rows), PairingConfig()).pairs.height == 6  # off unless the dataset has a pattern
    numeric = [
        sample("p2", 0, "I count 3.0 circles.\nFinal answer: 3", "3"),
        sample("p2", 1, "I count 4 circles.\nFinal answer: 3", "3"),
        sample("p2", 2, "Final answer: 5", "3"),
    ]
    result = make_pairs(
        frame(numeric),
        PairingConfig(verify_modes={"count": "numeric"}, claim_patterns={"count": r"I count (\S+) circle"}),
    )
    assert result.pairs["chosen"].to_list() == [
        numeric[0]["response"]
    ]  # 3.0 states 3 under the numeric verifier


@pytest.mark.parametrize("pattern", [r"It is \w+", r"(It) is (\w+)", r"It is (\w+"])
def test_a_claim_pattern_needs_one_capture_group(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"claim_patterns\['colour'\]"):
        PairingConfig(claim_patterns={"colour": pattern})


def test_truncated_response_is_never_chosen() -> None:
    rows = [
        sample("p1", 0, "Counting. Final answer: 2", finish="length"),
        sample("p1", 1, "Final answer: 2"),
        sample("p1", 2, "Final answer: 9"),
    ]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs["chosen"].to_list() == ["Final answer: 2"] and result.pairs.height == 1
    assert result.report.datasets["count"].filtered["truncated_chosen"] == 1


def test_repetitive_and_duplicate_responses_are_dropped() -> None:
    loop = "I count one circle " * 20 + "Final answer: 9"
    rows = [
        sample("p1", 0, "Final answer: 2"),
        sample("p1", 1, "Final answer: 2"),
        sample("p1", 2, loop),
        sample("p1", 3, "Final answer: 8"),
    ]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs["rejected"].to_list() == ["Final answer: 8"]
    filtered = result.report.datasets["count"].filtered
    assert filtered["repetitive"] == 1 and filtered["duplicate_response"] == 1


def test_format_failures_pair_with_correct_responses() -> None:
    rows = [
        sample("p1", 0, "Final answer: 2"),
        sample("p1", 1, "I am not sure"),
        sample("p1", 2, "Final answer: 4"),
    ]
    result = make_pairs(frame(rows), PairingConfig())
    by_source = dict(zip(result.pairs["source"], result.pairs["rejected"], strict=True))
    assert by_source == {"correctness": "Final answer: 4", "format": "I am not sure"}
    assert result.report.datasets["count"].format_failures == 1


def test_length_ratio_cap() -> None:
    long = " ".join(f"step{i} looks at shape {i}." for i in range(12))
    rows = [sample("p1", 0, long + " Final answer: 2"), sample("p1", 1, "Final answer: 3")]
    assert make_pairs(frame(rows), PairingConfig()).pairs.height == 1
    result = make_pairs(frame(rows), PairingConfig(max_length_ratio=2.0))
    assert result.pairs.height == 0 and result.report.datasets["count"].filtered["length_ratio"] == 1


def test_dropout_ntp_rows_become_pairs() -> None:
    chosen = "The image shows two red circles on a white background."
    rows = [
        sample(
            "d1",
            0,
            " a blue square.",
            None,
            dataset="describe",
            source="dropout_ntp",
            chosen=chosen,
            prefix="The image shows",
            version="sr0.5_wo_image",
        ),
        sample(
            "d1",
            1,
            "   ",
            None,
            dataset="describe",
            source="dropout_ntp",
            chosen=chosen,
            prefix="The image shows",
        ),
        sample(
            "d1",
            2,
            " two red circles on a white background.",
            None,
            dataset="describe",
            source="dropout_ntp",
            chosen=chosen,
            prefix="The image shows",
        ),
    ]
    result = make_pairs(frame(rows), PairingConfig())
    assert result.pairs["rejected"].to_list() == ["The image shows a blue square."]
    assert result.pairs["chosen"].to_list() == [chosen] and result.pairs["prompt"].to_list() == [
        "<image>\nHow many?"
    ]
    filtered = result.report.datasets["describe"].filtered
    assert filtered == {"empty_continuation": 1, "identical_to_chosen": 1}


def test_report_and_hard_prompts() -> None:
    rows = [sample("easy", i, "Final answer: 2") for i in range(2)]
    rows += [sample("hard", i, f"Final answer: {5 + i}") for i in range(3)]
    rows += [sample("mixed", 0, "Final answer: 2"), sample("mixed", 1, "Final answer: 3")]
    result = make_pairs(frame(rows), PairingConfig())
    stats = result.report.datasets["count"]
    assert stats.prompts == 3 and stats.samples == 7
    assert stats.accuracy == pytest.approx(3 / 7)
    assert stats.all_correct_prompts == 1 and stats.all_wrong_prompts == 1
    assert result.hard_prompts["prompt_id"].to_list() == ["hard"] and result.hard_prompts["samples"][0] == 3


ALPHABET = [
    "Final answer:",
    "Final Answer:",
    "Answer:",
    "答案:",
    "答案：",
    "\\boxed{",
    "}",
    "{",
    "\n",
    " ",
    ".",
    "。",
    "2",
    "red",
    "\t",
    "<think>",
    "</think>",
    "x",
]


def test_vectorised_extraction_matches_the_reference_function() -> None:
    rng = random.Random(0)
    filler = ["lorem ipsum " * rng.randint(1, 40) for _ in range(5)]  # pushes triggers out of the tail window
    responses = [
        "".join(rng.choice(ALPHABET + filler) for _ in range(rng.randint(0, 12))) for _ in range(3000)
    ]
    versions = [rng.choice(["en", "zh", "en_v2", "r1", "other"]) for _ in responses]
    df = pl.DataFrame({"response": responses, "prompt_version": versions})
    assert extract_answers(df).to_list() == [
        extract_answer(r, v) for r, v in zip(responses, versions, strict=True)
    ]


def test_run_pairing_writes_a_loadable_pairs_directory(tmp_path: Path) -> None:
    rows = [
        sample(f"p{k}", i, f"Step {i}. Final answer: {2 if i % 2 else 3}") for k in range(4) for i in range(4)
    ]
    write_table(pa.Table.from_pylist(rows, schema=SAMPLES), tmp_path / "samples" / "shard-0.parquet")
    report = run_pairing(tmp_path / "samples", tmp_path / "pairs", PairingConfig(shard_rows=5))
    assert report.pairs == 16 and len(list((tmp_path / "pairs" / "data").glob("*.parquet"))) == 4
    assert pl.read_parquet(tmp_path / "pairs" / "data" / "*.parquet")["pair_id"].n_unique() == 16
    assert json.loads((tmp_path / "pairs" / "report.json").read_text())["pairs_by_source"] == {
        "correctness": 16
    }
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pairs" / "data"), split="train")
    assert loaded.num_rows == 16 and {"prompt", "chosen", "rejected", "images"} <= set(loaded.column_names)
    # A second run replaces the data; no stale shard survives.
    run_pairing(tmp_path / "samples", tmp_path / "pairs", PairingConfig())
    assert len(list((tmp_path / "pairs" / "data").glob("*.parquet"))) == 1


def test_a_missing_samples_folder_is_an_error_not_an_empty_stage(tmp_path: Path) -> None:
    rows = [sample("p0", i, f"Final answer: {i}") for i in range(2)]
    write_table(pa.Table.from_pylist(rows, schema=SAMPLES), tmp_path / "samples" / "shard-0.parquet")
    (tmp_path / "empty-store").mkdir()  # a stage with nothing to sample is fine
    run_pairing([tmp_path / "samples", tmp_path / "empty-store"], tmp_path / "pairs")
    with pytest.raises(FileNotFoundError, match="gone-store"):
        run_pairing([tmp_path / "samples", tmp_path / "gone-store"], tmp_path / "pairs")


def test_chunks_and_prompts_spanning_shards_give_the_same_pairs(tmp_path: Path) -> None:
    rows = [
        sample(f"p{k}", i, f"Step {k} {i}. Final answer: {2 if (i + k) % 3 else 5}")
        for k in range(6)
        for i in range(6)
    ]

    # p0..p5 in three shards; p1 and p4 have samples in two shards each.
    def shard_of(r: dict) -> int:
        k, i = int(r["prompt_id"][1]), r["sample_index"]
        return 1 if (k == 1 and i >= 4) else 0 if (k == 4 and i == 0) else k // 2

    shards = [[r for r in rows if shard_of(r) == s] for s in range(3)]
    assert sum(map(len, shards)) == len(rows)
    for index, shard in enumerate(shards):
        write_table(pa.Table.from_pylist(shard, schema=SAMPLES), tmp_path / "s" / f"part-{index}.parquet")
    report = run_pairing(tmp_path / "s", tmp_path / "out", PairingConfig(chunk_rows=1))
    expected = make_pairs(frame(rows), PairingConfig())
    got = pl.read_parquet(tmp_path / "out" / "data" / "*.parquet")
    assert sorted(got["pair_id"].to_list()) == sorted(expected.pairs["pair_id"].to_list())
    assert report.datasets == expected.report.datasets


@pytest.mark.parametrize("failing_write", [1, 2])  # 1: raised while the next chunk is paired; 2: at the end
def test_a_failed_background_write_fails_the_stage_and_keeps_the_old_pairs(
    tmp_path: Path, failing_write: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpo.pairs

    rows = [
        sample(f"p{k}", i, f"Step {i}. Final answer: {2 if i % 2 else 3}") for k in range(4) for i in range(4)
    ]
    for k in range(2):  # two shards, so two chunks and two writes
        part = [r for r in rows if int(r["prompt_id"][1]) // 2 == k]
        write_table(pa.Table.from_pylist(part, schema=SAMPLES), tmp_path / "samples" / f"shard-{k}.parquet")
    run_pairing(tmp_path / "samples", tmp_path / "pairs", PairingConfig(chunk_rows=1))
    before = pl.read_parquet(tmp_path / "pairs" / "data" / "*.parquet")["pair_id"].sort().to_list()
    assert len(before) == 16

    real, calls = mpo.pairs.write_table, []

    def failing(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> Path:
        calls.append(path)
        if len(calls) == failing_write:
            raise OSError("disk full")
        return real(table, path, schema)

    monkeypatch.setattr(mpo.pairs, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        run_pairing(tmp_path / "samples", tmp_path / "pairs", PairingConfig(chunk_rows=1))
    assert len(calls) == failing_write  # a failed write stops the stage: nothing is written after it
    assert pl.read_parquet(tmp_path / "pairs" / "data" / "*.parquet")["pair_id"].sort().to_list() == before
    assert not list(tmp_path.joinpath("pairs").glob(".data.*"))  # the half-filled folder is gone
