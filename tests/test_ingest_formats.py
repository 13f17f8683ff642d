"""Ingest from where users keep prompts: every format and mapping gives the ids of InternVL's JSONL."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpo import image_store
from mpo.errors import InputError
from mpo.ingest import ingest
from mpo.prompt_rows import CHOICE_INSTRUCTION
from mpo.sampling import SamplingConfig, plan_stage, read_prompts, run_stage
from mpo.schemas import read_dir


def _rows(synth_dir: Path, dataset: str) -> list[dict]:
    meta = json.loads((synth_dir / "meta.json").read_text())
    with open(meta[dataset]["annotation"]) as handle:
        return [json.loads(line) for line in handle]


def _ids(out: Path) -> list[str]:
    """An ingest's prompt ids, sorted."""
    return sorted(read_dir(out / "prompts").column("prompt_id").to_pylist())


def _internvl_ids(synth_dir: Path, dataset: str, tmp_path: Path) -> list[str]:
    """The ids of one synth dataset ingested from its InternVL JSONL via meta.json."""
    meta = json.loads((synth_dir / "meta.json").read_text())
    (tmp_path / "one.json").write_text(json.dumps({dataset: meta[dataset]}))
    ingest(tmp_path / "one.json", tmp_path / "internvl")
    return _ids(tmp_path / "internvl")


def _embedded(rows: list[dict], root: Path) -> list[dict]:
    """Rows as Hugging Face datasets store them: the image as a {bytes, path} struct."""
    return [
        dict(row, image={"bytes": (root / row["image"]).read_bytes(), "path": Path(row["image"]).name})
        for row in rows
    ]


def test_each_format_gives_the_ids_of_the_internvl_jsonl(synth_dir: Path, tmp_path: Path) -> None:
    rows = _rows(synth_dir, "synth_colour")
    expected = _internvl_ids(synth_dir, "synth_colour", tmp_path)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paths.parquet")
    shards = tmp_path / "hf" / "data"
    shards.mkdir(parents=True)
    embedded = _embedded(rows, synth_dir)
    for index, part in enumerate((embedded[:3], embedded[3:])):
        pq.write_table(pa.Table.from_pylist(part), shards / f"train-{index:05d}-of-00002.parquet")
    for source, root in ((tmp_path / "rows.json", synth_dir), (tmp_path / "paths.parquet", synth_dir)):
        report = ingest(source, tmp_path / source.stem, image_root=root)
        assert _ids(tmp_path / source.stem) == expected and not report.drops
    report = ingest(tmp_path / "hf", tmp_path / "embedded")
    assert _ids(tmp_path / "embedded") == expected and not report.drops
    first = rows[0]
    image_digest = hashlib.sha256((synth_dir / first["image"]).read_bytes()).digest()
    content = b"".join(b"\x00" + part.encode() for part in (first["question"], first["answer"], ""))
    assert hashlib.sha256(image_digest + content).hexdigest()[:24] in expected


def test_embedded_images_are_stored_once_with_their_pixels(synth_dir: Path, tmp_path: Path) -> None:
    rows = _embedded(_rows(synth_dir, "synth_count"), synth_dir)
    twice = rows + [dict(row, question=row["question"] + " (again)") for row in rows]
    pq.write_table(pa.Table.from_pylist(twice), tmp_path / "train.parquet")
    report = ingest(tmp_path / "train.parquet", tmp_path / "out")
    assert not report.drops and report.prompts_by_dataset == {"train": len(twice)}
    stored = sorted((tmp_path / "out" / "images").rglob("*.png"))
    assert len(stored) == len({row["image"]["bytes"] for row in rows})
    for prompt in read_dir(tmp_path / "out" / "prompts").to_pylist():
        source = _rows(synth_dir, "synth_count")[int(prompt["source_line"] - 1) % len(rows)]
        with Image.open(prompt["images"][0]) as mine, Image.open(synth_dir / source["image"]) as theirs:
            assert np.array_equal(np.asarray(mine), np.asarray(theirs))


def test_a_column_mapping_reads_renamed_columns(synth_dir: Path, tmp_path: Path) -> None:
    rows = _rows(synth_dir, "synth_arith")
    expected = _internvl_ids(synth_dir, "synth_arith", tmp_path)
    renamed = [{"picture": row["image"], "query": row["question"], "gt": row["answer"]} for row in rows]
    (tmp_path / "renamed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in renamed))
    meta = {
        "arith": {
            "annotation": "renamed.jsonl",
            "root": str(synth_dir),
            "columns": {"image": "picture", "question": "query", "answer": "gt"},
        }
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ingest(tmp_path / "meta.json", tmp_path / "by-meta")
    assert _ids(tmp_path / "by-meta") == expected
    columns = {"image": "picture", "answer": "gt"}  # question: "query" is a common name
    ingest(tmp_path / "renamed.jsonl", tmp_path / "by-option", columns=columns, image_root=synth_dir)
    assert _ids(tmp_path / "by-option") == expected


def test_choices_render_as_internvl_multiple_choice(synth_dir: Path, tmp_path: Path) -> None:
    rows = _rows(synth_dir, "synth_choice")
    expected = _internvl_ids(synth_dir, "synth_choice", tmp_path)
    forms = []
    for number, row in enumerate(rows):
        stem, *options = row["question"].removesuffix("\n" + CHOICE_INSTRUCTION).split("\n")
        stem = "\n".join([stem] + [line for line in options if line[1:3] != ". "])
        choices = [line[3:] for line in options if line[1:3] == ". "]
        letter_index = "ABCD".index(row["answer"])
        answer = [letter_index, row["answer"], choices[letter_index]][number % 3]  # index, letter or text
        forms.append({"image": row["image"], "question": stem, "options": str(choices), "answer": answer})
    (tmp_path / "choices.jsonl").write_text("".join(json.dumps(row) + "\n" for row in forms))
    ingest(tmp_path / "choices.jsonl", tmp_path / "out", image_root=synth_dir)
    assert _ids(tmp_path / "out") == expected


def test_conversations_become_open_prompts_that_dropout_ntp_samples(
    synth_dir: Path, hf_engine, tmp_path: Path
) -> None:
    rows = _rows(synth_dir, "synth_describe")
    conversations = [
        {
            "image": row["image"],
            "conversations": [
                {"from": "system", "value": "You are a careful describer."},
                {"from": "human", "value": row["question"]},
                {"from": "gpt", "value": row["chosen"]},
                {"from": "human", "value": "And the background?"},
                {"from": "gpt", "value": "White."},
            ],
        }
        for row in rows
    ]
    (tmp_path / "sft.json").write_text(json.dumps(conversations))
    ingest(tmp_path / "sft.json", tmp_path / "sft", image_root=synth_dir)
    prompts = read_prompts(tmp_path / "sft" / "prompts")
    assert set(prompts["kind"]) == {"open"} and prompts["chosen"].to_list() == [r["chosen"] for r in rows]
    config = SamplingConfig(dropout_max_tokens=4, dropout_variants=["sr0.5_wo_image"])
    report = run_stage("dropout_ntp", tmp_path / "sft" / "prompts", hf_engine, tmp_path / "samples", config)
    assert report.counts["samples_written"] == len(rows)
    # The same prompts from InternVL's JSONL are the same prompts: the store has nothing left to do.
    expected = _internvl_ids(synth_dir, "synth_describe", tmp_path)
    assert _ids(tmp_path / "sft") == expected
    plan = plan_stage(
        "dropout_ntp", tmp_path / "internvl" / "prompts", hf_engine.model_id, tmp_path / "samples", config
    )
    assert not plan.shards
    answers = [dict(c, conversations=c["conversations"][1:3]) for c in conversations]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))
    ingest(tmp_path / "qa.jsonl", tmp_path / "qa", image_root=synth_dir, reply_as="answer")
    assert set(read_prompts(tmp_path / "qa" / "prompts")["kind"]) == {"closed"}


def test_a_wrong_mapping_is_one_clear_error(synth_dir: Path, tmp_path: Path) -> None:
    rows = _rows(synth_dir, "synth_count")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for source in ("train.parquet", "train.jsonl"):
        with pytest.raises(
            InputError, match=r"dataset 'train': mapped column 'query' \(for question\) not in"
        ):
            ingest(tmp_path / source, tmp_path / "out", columns={"question": "query"})
    with pytest.raises(InputError, match=r"unknown field\(s\) questoin"):
        ingest(tmp_path / "train.jsonl", tmp_path / "out", columns={"questoin": "question"})
    pq.write_table(pa.table({"text": ["a"], "label": ["b"]}), tmp_path / "bare.parquet")
    with pytest.raises(InputError, match="has no question column"):
        ingest(tmp_path / "bare.parquet", tmp_path / "out")
    assert not (tmp_path / "out" / "prompts").exists()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpo.cli",
            "ingest",
            str(tmp_path / "train.parquet"),
            "--out",
            str(tmp_path / "o"),
        ]
        + ["--columns", "question=query"],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2
        and len(done.stderr.strip().splitlines()) + len(done.stdout.strip().splitlines()) <= 5
    )
    assert "'query' (for question)" in done.stdout + done.stderr


def test_a_reingest_keeps_ids_and_checks_no_image_again(tmp_path: Path, monkeypatch) -> None:
    """80 images: enough for the process pool; the second ingest reads the index, not the images."""
    (tmp_path / "img").mkdir()
    rows = []
    for index in range(80):
        Image.new("RGB", (8, 8), (index, 255 - index, 7)).save(tmp_path / "img" / f"{index}.png")
        for question in ("What colour?", "Is it dark?"):
            rows.append(
                {"image": f"img/{index}.png", "question": f"<image>\n{question}", "answer": str(index)}
            )
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ingest(tmp_path / "rows.jsonl", tmp_path / "out", workers=2, batch_rows=50)
    first = read_dir(tmp_path / "out" / "prompts")
    assert first.num_rows == 160 and len(list((tmp_path / "out" / "prompts").glob("*.parquet"))) == 4

    def no_check(path: str) -> image_store.CheckedImage:
        raise AssertionError(f"{path} was checked again")

    monkeypatch.setattr(image_store, "check_file", no_check)
    ingest(tmp_path / "rows.jsonl", tmp_path / "out", workers=1)
    assert read_dir(tmp_path / "out" / "prompts").to_pylist() == first.to_pylist()
    (tmp_path / "img" / "3.png").write_bytes(b"changed")  # a changed file is checked again
    with pytest.raises(AssertionError, match="3.png was checked again"):
        ingest(tmp_path / "rows.jsonl", tmp_path / "out", workers=1)
    assert (
        read_dir(tmp_path / "out" / "prompts").to_pylist() == first.to_pylist()
    )  # a failed ingest keeps the old


@pytest.mark.parametrize("repeat_time", [0.5, 1, 3])
def test_batches_change_nothing_but_the_shards(synth_dir: Path, tmp_path: Path, repeat_time: float) -> None:
    meta = json.loads((synth_dir / "meta.json").read_text())
    meta = {name: dict(entry, repeat_time=repeat_time) for name, entry in meta.items()}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    whole = ingest(tmp_path / "meta.json", tmp_path / "whole")
    batched = ingest(tmp_path / "meta.json", tmp_path / "batched", batch_rows=3)
    ignored = {"out_dir", "seconds"}
    assert whole.model_dump(exclude=ignored) == batched.model_dump(exclude=ignored)

    def rows(out: Path) -> list[tuple]:
        return sorted(
            (r["prompt_id"], r["repeat_index"], r["source_line"])
            for r in read_dir(out / "prompts").to_pylist()
        )

    assert rows(tmp_path / "whole") == rows(tmp_path / "batched")
    assert len(list((tmp_path / "batched" / "prompts").glob("*.parquet"))) > len(meta)
