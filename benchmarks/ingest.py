"""Benchmark: streaming ingest (mpo.ingest) vs the ingest it replaced, on the same data in one run.

    python benchmarks/ingest.py [--rows 1000000] [--images 50000] [--scales 250000] [--workdir DIR]

Generates ``images`` small PNGs and ``rows`` prompt rows naming them (20 rows per image at the
defaults: datasets ask many questions of one image), as InternVL JSONL with paths and as a folder of
Hugging Face style Parquet shards with the image bytes embedded in each row. Each side runs in its own
process; wall time, its peak RSS, and the peak of its and its pool workers' proportional set
sizes together (sampled) are printed as a table; every run but the one marked "again" starts from an
empty output folder. The earlier ingest is read from git (``OLD_COMMIT``) and reads one file per
dataset, so it gets the Parquet shards as a meta.json of one dataset per shard; it cannot read embedded images and
quarantines those rows, which still prices its reading. ``--scales`` adds runs of the new ingest on
the first N rows of the JSONL, to show that its peak memory is flat in the row count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

OLD_COMMIT = "7a57268"  # the last version of mpo/ingest.py before streaming ingest
SHARD_ROWS = 100_000


def generate(work: Path, rows: int, images: int, seed: int = 0) -> None:
    """The image files, ``prompts.jsonl`` (paths) and ``shards/`` (embedded bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = random.Random(seed)
    names, data = [], {}
    for index in range(images):
        name = f"img/{index % 100:02d}/{index:06d}.png"
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(6):
            image.putpixel(
                (rng.randrange(32), rng.randrange(32)), tuple(rng.randrange(256) for _ in range(3))
            )
        image.save(path)
        names.append(name)
        data[name] = path.read_bytes()
    (work / "shards").mkdir(exist_ok=True)
    with open(work / "prompts.jsonl", "w") as jsonl:
        for start in range(0, rows, SHARD_ROWS):
            batch = []
            for index in range(start, min(rows, start + SHARD_ROWS)):
                name = names[index % images]
                row: dict = {"image": name, "question": f"<image>\nQuestion {index}: what colour is it?"}
                if index % 10 == 9:
                    row["chosen"] = f"A small square, mostly one colour ({index})."
                else:
                    row["answer"] = str(index % 7)
                batch.append(row)
                jsonl.write(json.dumps(row) + "\n")
            embedded = [
                {
                    "image": {"bytes": data[row["image"]], "path": row["image"]},
                    "question": row["question"],
                    "answer": row.get("answer"),
                    "chosen": row.get("chosen"),
                }
                for row in batch
            ]
            table = pa.Table.from_pylist(embedded)
            pq.write_table(table, work / "shards" / f"train-{start // SHARD_ROWS:05d}.parquet")
    meta = {
        f"shard{index}": {"annotation": str(path), "root": str(work)}
        for index, path in enumerate(sorted((work / "shards").glob("*.parquet")))
    }
    (work / "shards-meta.json").write_text(json.dumps(meta))


def _first_rows(work: Path, rows: int) -> Path:
    """A JSONL of the first ``rows`` rows, for the scale runs."""
    path = work / f"prompts-{rows}.jsonl"
    if not path.exists():
        with open(work / "prompts.jsonl") as source, open(path, "w") as target:
            for _, line in zip(range(rows), source, strict=False):
                target.write(line)
    return path


def _old_ingest() -> object:
    """The replaced ingest module, from git."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:mpo/ingest.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    path = Path("/tmp") / f"mpo_ingest_{OLD_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"mpo_ingest_{OLD_COMMIT}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tree_pss_mb(pid: int) -> float:
    """Memory of a process and its descendants now, in MB: their proportional set sizes (Linux
    /proc smaps_rollup), which count a page shared by several processes once in all. Resident
    sizes would count a freshly forked worker, before its exec, as a second copy of its parent."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            total += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:")) / 1024
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, StopIteration):
        return total
    return total + sum(_tree_pss_mb(int(child)) for child in children)


def role(side: str, source: Path, out: Path) -> None:
    """One side's ingest, in this process; prints its counts and peak memory as JSON: this process's
    peak RSS, and the peak of its and its pool workers' proportional set sizes (sampled every 50 ms)."""
    import threading

    peak_tree = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_tree[0] = max(peak_tree[0], _tree_pss_mb(os.getpid()))

    threading.Thread(target=sample, daemon=True).start()
    if side == "old":
        report = _old_ingest().ingest(source, out)  # type: ignore[attr-defined]
        counts = {"prompts": sum(report.prompts.values()), "quarantined": sum(report.quarantined.values())}
    else:
        from mpo.ingest import ingest

        result = ingest(source, out)
        counts = {"prompts": result.counts["prompts"], "quarantined": sum(result.drops.values())}
    done.set()
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**counts, "peak_self": peak_self, "peak_tree": peak_tree[0]}))


def run(side: str, source: Path, out: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--role", side, "--source", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{side} ingest of {source} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument(
        "--scales", default="250000", help="comma-separated row counts for extra new-ingest runs"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpo-bench-ingest"))
    parser.add_argument("--role", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role(args.role, args.source, args.out)
        return
    work = args.workdir / f"{args.rows}-{args.images}"
    if not (work / "generated").exists():
        started = time.perf_counter()
        work.mkdir(parents=True, exist_ok=True)
        generate(work, args.rows, args.images)
        (work / "generated").touch()
        print(
            f"generated {args.rows:,} rows over {args.images:,} images in {time.perf_counter() - started:.0f} s"
        )
    cases = [
        ("JSONL, paths", "old", work / "prompts.jsonl", args.rows),
        ("JSONL, paths", "new", work / "prompts.jsonl", args.rows),
        ("Parquet shards, embedded", "old", work / "shards-meta.json", args.rows),
        ("Parquet shards, embedded", "new", work / "shards", args.rows),
        # the same again into the same folder: the image index spares every image's check
        ("Parquet shards, embedded, again", "new", work / "shards", args.rows),
    ]
    cases += [
        (f"JSONL, first {rows:,} rows", "new", _first_rows(work, rows), rows)
        for rows in (int(text) for text in args.scales.split(",") if text)
    ]
    print("| input | code | rows | prompts | quarantined | wall s | peak MB | peak MB with workers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    times: dict[tuple[str, str], float] = {}
    for label, side, source, rows in cases:
        out = args.workdir / "out" / f"{side}-{source.stem}"
        if not label.endswith("again"):
            shutil.rmtree(out, ignore_errors=True)  # a fresh ingest: no image index from a run before
        result = run(side, source, out)
        times[(label, side)] = result["seconds"]
        print(
            f"| {label} | {side} | {rows:,} | {result['prompts']:,} | {result['quarantined']:,} | "
            f"{result['seconds']:.1f} | {result['peak_self']:.0f} | {result['peak_tree']:.0f} |",
            flush=True,
        )
    old = times[("JSONL, paths", "old")]
    print(f"JSONL with paths: new is {old / times[('JSONL, paths', 'new')]:.1f}x faster than old")
    print(
        f"Parquet shards with embedded images: new is {old / times[('Parquet shards, embedded', 'new')]:.1f}x "
        "faster than old on the same prompts as JSONL (old cannot read embedded images: it quarantines them)"
    )
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
