"""The pairs gallery: a seeded sample per dataset and source, thumbnails that decode, text as text."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
from PIL import Image
from typer.testing import CliRunner

from mpo.cli import app
from mpo.gallery import GallerySpec, gallery_markdown, write_gallery
from mpo.schemas import HARD_PROMPTS, PAIRS, write_table

MARKUP = "A sky is <script>alert('x')</script> & <b>bold</b>"


def pairs_version(gold_pairs_dir: Path, out: Path) -> Path:
    """The gold pairs (8 per dataset, correctness), three DropoutNTP pairs whose rejected continuation
    holds markup, and one hard prompt."""
    shutil.copytree(gold_pairs_dir, out)
    gold = pl.read_parquet(out / "data")
    first = gold.row(0, named=True)
    dropout = [
        {
            **first,
            "pair_id": f"dropout-{i}",
            "source": "dropout_ntp",
            "chosen": f"Shared opening words {i}. The shapes are red and round.",
            "rejected": f"Shared opening words {i}. {MARKUP}",
            "chosen_answer": None,
            "rejected_answer": None,
            "answer": None,
        }
        for i in range(3)
    ]
    write_table(pa.Table.from_pylist(dropout, schema=PAIRS), out / "data" / "part-00009.parquet")
    hard = {
        **{k: first[k] for k in ("prompt_id", "dataset", "answer", "images")},
        "question": "Hard?",
        "samples": 8,
    }
    write_table(pa.Table.from_pylist([hard], schema=HARD_PROMPTS), out / "hard_prompts.parquet")
    return out


def cards(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<article class="pair[^"]*" data-dataset="([^"]+)" data-source="([^"]+)"', page)


def test_the_gallery_shows_a_seeded_sample_per_dataset_and_source(
    gold_pairs_dir: Path, tmp_path: Path
) -> None:
    version = pairs_version(gold_pairs_dir, tmp_path / "v1")
    page = write_gallery(version, tmp_path / "a.html", GallerySpec(per_source=3, seed=1)).read_text()
    shown = cards(page)
    assert pl.DataFrame(shown, schema=["dataset", "source"], orient="row").group_by(
        "dataset", "source"
    ).len().sort("dataset", "source").rows() == [
        ("synth_arith", "correctness", 3),
        ("synth_choice", "correctness", 3),
        ("synth_colour", "correctness", 3),
        ("synth_compare", "correctness", 3),
        ("synth_count", "correctness", 3),
        ("synth_count", "dropout_ntp", 3),
        ("synth_count", "hard", 1),
    ]
    # every thumbnail is an image, downscaled
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbnails) == len(shown)
    for data in thumbnails:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert max(image.size) <= 160 and image.format == "JPEG"
    # text from the data is text, and the DropoutNTP cut is marked
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the filter's own
    assert '<mark title="shared prefix">Shared opening words 0. </mark>' in page
    assert 'title="the rejected continuation starts here"' in page
    assert "verifier auto" in page and "length ratio" in page and "Hard prompts: every sample wrong" in page

    again = write_gallery(version, tmp_path / "b.html", GallerySpec(per_source=3, seed=1)).read_text()
    assert again == page  # the same seed, the same file
    other = write_gallery(version, tmp_path / "c.html", GallerySpec(per_source=3, seed=2)).read_text()
    assert re.findall(r"class='id'>(\w+)<", other) != re.findall(r"class='id'>(\w+)<", page)


def test_filters_and_the_command_line(gold_pairs_dir: Path, tmp_path: Path) -> None:
    version = pairs_version(gold_pairs_dir, tmp_path / "v1")
    only = write_gallery(
        version, tmp_path / "only.html", GallerySpec(dataset="synth_count", source="dropout_ntp")
    )
    assert set(cards(only.read_text())) == {("synth_count", "dropout_ntp")}
    result = CliRunner().invoke(app, ["view", str(version), "--per-source", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert len(cards((version / "pairs.html").read_text())) == 5 * 2 + 2 + 1
    missing = CliRunner().invoke(app, ["view", str(tmp_path)])
    assert missing.exit_code != 0 and "not a pairs version" in str(missing.exception)


def test_a_large_version_gives_a_small_file(gold_pairs_dir: Path, tmp_path: Path) -> None:
    """20,000 pairs with long responses: the sample is capped and responses are cut."""
    gold = pl.read_parquet(gold_pairs_dir / "data")
    long = gold.with_columns(
        chosen=pl.concat_str([pl.col("chosen")] * 60), rejected=pl.concat_str([pl.col("rejected")] * 60)
    )
    big = pl.concat([long.with_columns(pair_id=pl.col("pair_id") + f"-{i}") for i in range(500)])
    write_table(big.to_arrow(), tmp_path / "big" / "data" / "part-00000.parquet", PAIRS)
    page = write_gallery(tmp_path / "big", tmp_path / "big.html", GallerySpec(per_source=50))
    assert page.stat().st_size < 10_000_000
    assert len(cards(page.read_text())) == 5 * 50 and "more characters" in page.read_text()


def test_the_run_summarys_small_gallery(gold_pairs_dir: Path, tmp_path: Path) -> None:
    version = pairs_version(gold_pairs_dir, tmp_path / "v1")
    markdown = gallery_markdown(version, per_source=2)
    rows = [line for line in markdown.splitlines() if line.startswith("| ![")]
    assert len(rows) == 4  # two per source, correctness and DropoutNTP
    assert all("](data:image/jpeg;base64," in row for row in rows)
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
