import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from mpo import synth


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("meta")  # meta.json holds absolute paths
    }


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", count=6, seed=3)
    synth.generate(tmp_path / "b", count=6, seed=3)
    synth.generate(tmp_path / "c", count=6, seed=4)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_meta_json_follows_internvl_format(synth_dir: Path) -> None:
    for name, split in (("meta.json", "train"), ("meta_heldout.json", "heldout")):
        meta = json.loads((synth_dir / name).read_text())
        assert set(meta) == set(synth.TASKS)
        for dataset, entry in meta.items():
            assert set(entry) == {
                "root",
                "annotation",
                "data_augment",
                "max_dynamic_patch",
                "repeat_time",
                "length",
            }
            lines = Path(entry["annotation"]).read_text().splitlines()
            assert len(lines) == entry["length"] == (8 if split == "train" else 2)
            assert Path(entry["annotation"]).name == f"{dataset}.jsonl"


def _rows(synth_dir: Path) -> list[tuple[str, dict]]:
    meta = json.loads((synth_dir / "meta.json").read_text())
    return [
        (d, json.loads(line))
        for d, e in meta.items()
        for line in Path(e["annotation"]).read_text().splitlines()
    ]


def test_every_row_is_valid(synth_dir: Path) -> None:
    for dataset, row in _rows(synth_dir):
        with Image.open(synth_dir / row["image"]) as image:
            assert image.size == (synth.IMAGE_SIZE, synth.IMAGE_SIZE) and image.mode == "RGB"
        assert row["question"].count("<image>") == 1
        if dataset in synth.CLOSED_DATASETS:
            assert row["answer"] and row["solution"].endswith(f"Final answer: {row['answer']}")
        else:
            assert row["chosen"] and row["rejected"] is None and "answer" not in row


def test_answers_are_right_by_construction(synth_dir: Path) -> None:
    for dataset, row in _rows(synth_dir):
        if dataset == "synth_arith":
            a, op, b = row["solution"].split(". ")[0].removeprefix("The image shows ").split()
            assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        if dataset == "synth_choice":
            options = dict(line.split(". ") for line in row["question"].splitlines()[2:6])
            total = row["solution"].split("there are ")[1].split(".")[0]
            assert options[row["answer"]] == total


def test_claim_patterns_read_the_gold_answer_from_every_worked_solution(synth_dir: Path) -> None:
    """A gold solution is never self-contradictory: each pattern finds the answer its steps state."""
    import re

    from mpo.answers import is_correct

    seen = set()
    for dataset, row in _rows(synth_dir):
        if dataset in synth.CLAIM_PATTERNS:
            steps = row["solution"].rsplit(synth.FINAL_ANSWER, 1)[0]
            claims = re.findall(synth.CLAIM_PATTERNS[dataset], steps)
            assert claims and is_correct(claims[-1], row["answer"], synth.VERIFY_MODES[dataset]), (
                dataset,
                row,
            )
            seen.add(dataset)
    assert seen == set(synth.CLAIM_PATTERNS)


def test_largest_shape_is_unique() -> None:
    import random

    for index in range(200):
        shapes = synth.random_shapes(random.Random(index), ["circle"] * 7)
        radii = [s.radius for s in shapes]
        assert len(set(radii)) == len(radii) == 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"count": 0}, "--count"),
        ({"count": 5, "heldout_fraction": 1.0}, "heldout_fraction"),
        ({"count": 5, "datasets": ("nope",)}, "unknown synthetic datasets"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.generate(tmp_path, **kwargs)
