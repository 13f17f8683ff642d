"""Ingestion on synth output and on hand-made edge-case files."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpo.ingest import IngestError, ingest
from mpo.schemas import PROMPTS, read_dir


def _dataset(
    tmp_path: Path, rows: list, repeat_time: float = 1, raw_lines: list[bytes] | None = None
) -> Path:
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(root / "img" / name)
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [json.dumps(r).encode() for r in rows] + (raw_lines or [])
    annotation = tmp_path / "ann.jsonl"
    annotation.write_bytes(b"\n".join(lines) + b"\n")
    meta = {
        "edge": {
            "root": str(root),
            "annotation": str(annotation),
            "data_augment": False,
            "max_dynamic_patch": 6,
            "repeat_time": repeat_time,
            "length": len(lines),
        }
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "meta.json"


GOOD = [
    {"image": "img/a.png", "question": "<image>\nWhat colour?", "answer": "red"},
    {"image": ["img/a.png", "img/b.png"], "question": "<image> vs <image>: same?", "answer": "No"},
    {"question": "What is 2+2?", "answer": 4},
    {"image": "img/b.png", "question": "<image>\nDescribe.", "chosen": "A blue square.", "rejected": None},
]


def test_kinds_multi_image_and_text_only(tmp_path: Path) -> None:
    report = ingest(_dataset(tmp_path, GOOD), tmp_path / "out")
    prompts = read_dir(tmp_path / "out" / "prompts", PROMPTS).to_pylist()
    assert report.prompts_by_dataset == {"edge": 4} and report.kinds == {"closed": 3, "open": 1}
    assert [len(p["images"]) for p in prompts] == [1, 2, 0, 1]
    assert prompts[2]["answer"] == "4" and prompts[3]["chosen"] == "A blue square."
    assert all(Path(i).is_absolute() for p in prompts for i in p["images"])
    assert len({p["prompt_id"] for p in prompts}) == 4


def test_prompt_id_is_stable_and_content_based(tmp_path: Path) -> None:
    ingest(_dataset(tmp_path / "x", GOOD), tmp_path / "o1")
    ingest(_dataset(tmp_path / "y", GOOD[::-1]), tmp_path / "o2")
    ids1 = {p["question"]: p["prompt_id"] for p in read_dir(tmp_path / "o1" / "prompts").to_pylist()}
    ids2 = {p["question"]: p["prompt_id"] for p in read_dir(tmp_path / "o2" / "prompts").to_pylist()}
    assert ids1 == ids2


BAD = [
    ({"image": "../outside.png", "question": "<image>\nq", "answer": "a"}, "image_outside_root"),
    ({"image": "/etc/passwd", "question": "<image>\nq", "answer": "a"}, "image_outside_root"),
    ({"image": "img/missing.png", "question": "<image>\nq", "answer": "a"}, "missing_image"),
    ({"image": "img/broken.png", "question": "<image>\nq", "answer": "a"}, "corrupt_image"),
    ({"image": "img/a.png", "answer": "a"}, "missing_field"),
    ({"image": "img/a.png", "question": "<image>\nq"}, "missing_field"),
    ({"image": "img/a.png", "question": "<image><image>\nq", "answer": "a"}, "placeholder_mismatch"),
    (["not", "an", "object"], "bad_field_type"),
]


def test_bad_rows_are_quarantined_with_file_line_and_reason(tmp_path: Path) -> None:
    rows = GOOD[:1] + [r for r, _ in BAD] + GOOD[:1]
    meta = _dataset(tmp_path, rows, raw_lines=[b"{not json", b"\xff\xfe bad bytes"])
    report = ingest(meta, tmp_path / "out")
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    reasons = [q["reason"] for q in quarantine]
    assert reasons == [r for _, r in BAD] + ["duplicate_prompt", "malformed_json", "non_utf8"]
    assert [q["line"] for q in quarantine] == list(range(2, 2 + len(BAD))) + [10, 11, 12]
    assert all(q["file"].endswith("ann.jsonl") for q in quarantine)
    assert report.prompts_by_dataset == {"edge": 1} and sum(report.drops.values()) == len(quarantine)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(saved["drops"].values()) == 11 and saved["drops"]["image_outside_root"] == 2
    assert saved["counts"] == {"prompts": 1} and len(saved["version"]) == 12


def test_strict_mode_names_file_line_and_field(tmp_path: Path) -> None:
    meta = _dataset(tmp_path, GOOD[:1] + [{"image": "img/a.png", "answer": "a"}])
    with pytest.raises(IngestError, match=r"ann\.jsonl:2: field 'question': missing_field"):
        ingest(meta, tmp_path / "out", strict=True)


@pytest.mark.parametrize("repeat_time,expected", [(1, 4), (3, 12), (2.7, 8), (0.5, 2)])
def test_repeat_time(tmp_path: Path, repeat_time: float, expected: int) -> None:
    report = ingest(_dataset(tmp_path, GOOD, repeat_time=repeat_time), tmp_path / "out")
    prompts = read_dir(tmp_path / "out" / "prompts").to_pylist()
    assert report.prompts_by_dataset["edge"] == len(prompts) == expected
    pairs = {(p["prompt_id"], p["repeat_index"]) for p in prompts}
    assert len(pairs) == expected


def test_plain_jsonl_and_parquet_prompt_files(tmp_path: Path) -> None:
    _dataset(tmp_path, GOOD)
    # A plain file's image paths are relative to the file's own folder.
    plain = [
        dict(r, image=[f"root/{i}" for i in ([r["image"]] if isinstance(r["image"], str) else r["image"])])
        if "image" in r
        else r
        for r in GOOD
    ]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    report = ingest(tmp_path / "ann.jsonl", tmp_path / "out")
    assert report.prompts_by_dataset == {"ann": 4} and not report.drops
    table = read_dir(tmp_path / "out" / "prompts")
    rows = [{"question": q, "answer": a} for q, a in (("1+1?", "2"), ("2+2?", "4"))]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "plain.parquet")
    assert ingest(tmp_path / "plain.parquet", tmp_path / "out2").prompts_by_dataset == {"plain": 2}
    assert table.num_rows == 4


def test_synth_output_ingests_cleanly(synth_dir: Path, tmp_path: Path) -> None:
    report = ingest(synth_dir / "meta.json", tmp_path / "out")
    assert sum(report.drops.values()) == 0
    assert report.kinds == {"closed": 40, "open": 8}


def test_a_corrupt_shard_in_a_table_is_one_line_naming_it(tmp_path: Path) -> None:
    from mpo.errors import InputError

    prompts = ingest(_dataset(tmp_path, GOOD), tmp_path / "out").out_dir
    (Path(prompts) / "part-zzz.parquet").write_bytes(b"PAR1 not a table PAR1")
    with pytest.raises(InputError) as caught:
        read_dir(prompts, PROMPTS)
    message = str(caught.value)
    assert message.startswith(f"{Path(prompts) / 'part-zzz.parquet'}: not a readable Parquet shard (")
    assert "\n" not in message
