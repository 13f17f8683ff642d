"""The run report's tables and charts read every pair source, not a fixed list."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mpo.report import pairs_per_source, plot_pairs
from mpo.results import PairsResult


def _pairs() -> PairsResult:
    return PairsResult(
        stage="pairs",
        out_dir="/w/pairs/abc",
        counts={"pairs": 9},
        drops={"duplicate": 3},
        datasets={
            "count": {"pairs": {"correctness": 4, "dropout_ntp": 1}},
            "colour": {"pairs": {"format": 2, "new_source": 2}},
            "empty": {},
        },
    )


def test_pairs_per_source_fills_every_source_in_every_dataset() -> None:
    table = pairs_per_source(_pairs())
    columns = ["correctness", "dropout_ntp", "format", "new_source"]
    assert {name: list(row) for name, row in table.items()} == {
        d: columns for d in ("count", "colour", "empty")
    }
    assert table["count"] == {"correctness": 4, "dropout_ntp": 1, "format": 0, "new_source": 0}
    assert table["colour"]["new_source"] == 2
    assert sum(table["empty"].values()) == 0
    assert sum(sum(row.values()) for row in table.values()) == 9


def test_pairs_chart_draws_from_the_same_table(tmp_path: Path) -> None:
    out = plot_pairs(_pairs(), tmp_path / "pairs.png")
    with Image.open(out) as image:
        assert image.width > 600 and image.height > 200
