"""`mpo view` on large pairs versions: seconds and file size against the number of pairs.

A pairs version of N pairs (6 datasets, 3 sources, responses of a few hundred characters, one
synthetic image per pair out of 2,000) is written once per size; the gallery draws 6 pairs per
dataset and source. Only the drawn pairs' rows are read in full, so the time should grow with the
id, dataset and source columns alone and the file should not grow at all.

    .venv/bin/python benchmarks/view_pairs.py --pairs 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl

from mpo.gallery import GallerySpec, write_gallery
from mpo.schemas import PAIRS, write_table

SHARD_ROWS = 100_000


def make_version(folder: Path, pairs: int, images: list[str]) -> None:
    index = pl.int_range(0, pairs, eager=True)
    frame = pl.DataFrame(
        {
            "pair_id": index.cast(pl.String).str.zfill(12),
            "prompt_id": (index // 8).cast(pl.String),
            "dataset": "synth_" + (index % 6).cast(pl.String),
            "source": pl.Series(["correctness", "dropout_ntp", "format"])[(index % 3)],
            "prompt": "<image>\nHow many shapes are there in the image? Think step by step. " * 3,
            "chosen": "I count the shapes one by one, left to right, and find 3 of them.\nFinal answer: 3 "
            * 4,
            "rejected": "I count the shapes one by one, left to right, and find 5 of them.\nFinal answer: 5 "
            * 4,
            "images": pl.Series([[images[i % len(images)]] for i in range(min(pairs, len(images)))])[
                index % min(pairs, len(images))
            ],
            "answer": "3",
            "chosen_answer": "3",
            "rejected_answer": "5",
            "model": "benchmark",
        }
    )
    for number, start in enumerate(range(0, pairs, SHARD_ROWS)):
        shard = frame.slice(start, SHARD_ROWS).to_arrow()
        write_table(shard, folder / "data" / f"part-{number:05d}.parquet", PAIRS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    from mpo.synth import generate

    rows = []
    with tempfile.TemporaryDirectory(prefix="mpo-view-") as tmp:
        root = Path(tmp)
        generate(root / "synth", count=400, seed=0, heldout_fraction=0.0)
        images = sorted(str(p) for p in (root / "synth" / "images").rglob("*.png"))[:2000]
        for count in args.pairs:
            version = root / f"v-{count}"
            make_version(version, count, images)
            started = time.perf_counter()
            page = write_gallery(version, root / f"{count}.html", GallerySpec(per_source=6))
            rows.append((count, time.perf_counter() - started, page.stat().st_size / 1e6))
    print("| pairs | mpo view s | HTML MB |")
    print("| ---: | ---: | ---: |")
    for count, seconds, size in rows:
        print(f"| {count:,} | {seconds:.2f} | {size:.2f} |")


if __name__ == "__main__":
    main()
