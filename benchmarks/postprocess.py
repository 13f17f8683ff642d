"""Benchmark: our pairing (polars, mpo.pairs) vs a plain single-process Python version of
the same rules that works the way the reference script does (JSON lines in, dicts,
JSON lines out).

    python benchmarks/postprocess.py [--rows 1000000] [--workdir /tmp/mpo-bench] [--selection closest]

Generates ``rows`` synthetic correctness samples (32 per prompt, 60-250 word responses,
some wrong, some format failures, truncated or repetitive), writes them both as Parquet
(our input) and as JSONL (the baseline's input), runs each side in its own process
(wall time and peak RSS from ``wait4``) and checks both produce the same pair set.
``--selection closest`` keeps, per prompt, the pairs whose responses share the longest
prefix (both sides), to price that rule.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

SAMPLES_PER_PROMPT = 32
PAIRS_PER_PROMPT = 15
MAX_REPETITION = 0.3
_MINSTD, _PRIME = 48271, 2_147_483_647


# ------------------------------------------------------------------ data


def generate(workdir: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa

    from mpo.schemas import SAMPLES, write_table

    rng = random.Random(seed)
    words = [
        f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('lmnrst')}{i}" for i in range(3000)
    ]
    sentences = [" ".join(rng.choices(words, k=rng.randint(8, 16))) + "." for _ in range(4000)]
    prompts = rows // SAMPLES_PER_PROMPT
    (workdir / "samples").mkdir(parents=True, exist_ok=True)
    with open(workdir / "samples.jsonl", "w") as jsonl:
        for shard in range(0, prompts, 2000):
            batch = []
            for p in range(shard, min(prompts, shard + 2000)):
                gold = str(rng.randint(1, 20))
                skill = rng.random()
                for i in range(SAMPLES_PER_PROMPT):
                    body = " ".join(rng.choices(sentences, k=rng.randint(5, 16)))
                    roll = rng.random()
                    finish = "stop"
                    if roll < 0.03:
                        response, finish = body, "length"  # truncated, no answer
                    elif roll < 0.05:
                        response = body + " " + "so the count is one more " * 12 + "Final answer: " + gold
                    elif roll < 0.10:
                        response = body + " I cannot tell."
                    elif rng.random() < skill:
                        response = f"{body}\nFinal answer: {gold}"
                    else:
                        response = f"{body}\nFinal answer: {int(gold) + rng.choice([1, 2, 3, 10, -1])}"
                    batch.append(
                        {
                            "prompt_id": f"{p:08x}",
                            "dataset": f"set{p % 4}",
                            "images": [f"/data/img/{p}.png"],
                            "question": f"<image>\nHow many objects are in picture {p}?",
                            "answer": gold,
                            "prompt_version": "en",
                            "response": response,
                            "finish_reason": finish,
                            "num_tokens": len(response) // 4,
                            "sample_index": i,
                            "source": "correctness",
                            "model": "bench",
                            "chosen": None,
                            "prefix": None,
                            "seed": 0,
                            "sampling_config": "{}",
                        }
                    )
            write_table(
                pa.Table.from_pylist(batch, schema=SAMPLES),
                workdir / "samples" / f"part-{shard // 2000:05d}.parquet",
            )
            jsonl.writelines(json.dumps(row) + "\n" for row in batch)


# ------------------------------------------------------------------ the plain-Python baseline


def baseline(samples_jsonl: Path, out_jsonl: Path, selection: str) -> None:
    """Same rules as mpo.pairs (correctness + format sources), one row at a time."""
    import zlib

    from mpo.answers import Verdict, extract_answer, is_correct

    groups: dict[str, list[dict]] = defaultdict(list)
    with open(samples_jsonl) as handle:
        for line in handle:
            row = json.loads(line)
            answer = extract_answer(row["response"], row["prompt_version"])
            if answer is None:
                row["verdict"] = Verdict.FORMAT_FAILURE.value
            else:
                row["verdict"] = (
                    Verdict.CORRECT.value
                    if is_correct(answer, row["answer"], "exact")
                    else Verdict.WRONG.value
                )
            row["extracted"] = answer
            groups[row["prompt_id"]].append(row)

    def repetitive(text: str) -> bool:
        words = text.split(" ")
        grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
        return bool(grams) and 1 - len(set(grams)) / len(grams) > MAX_REPETITION

    def tokens(answer: str) -> str:
        return " " + " ".join(re.findall(r"-?\d+(?:[.,]\d+)*|[^\W\d_]+", answer.lower())) + " "

    def key(pseed: int, first: int, second: int) -> int:
        base = (pseed + first * 1031 + second) % _PRIME
        return ((base * _MINSTD) % _PRIME * _MINSTD) % _PRIME

    with open(out_jsonl, "w") as out:
        for prompt_id, rows in groups.items():
            rows.sort(key=lambda r: (r["finish_reason"] == "length", r["sample_index"]))
            seen, usable = set(), []
            for r in rows:
                if r["response"] in seen:
                    continue
                seen.add(r["response"])
                if not repetitive(r["response"]):
                    usable.append(r)
            chosen = [r for r in usable if r["verdict"] == "correct" and r["finish_reason"] != "length"]
            pseed = zlib.crc32(prompt_id.encode()) % _PRIME
            for source, verdict in (("correctness", "wrong"), ("format", "format_failure")):
                candidates = []
                for c in chosen:
                    for r in usable:
                        if r["verdict"] != verdict:
                            continue
                        if source == "correctness" and tokens(c["extracted"]) in tokens(r["extracted"]):
                            continue
                        shared = 0
                        if selection == "closest":
                            shared = len(
                                os.path.commonprefix([c["response"].encode(), r["response"].encode()])
                            )
                        candidates.append(
                            (
                                -shared,
                                key(pseed, c["sample_index"], r["sample_index"]),
                                c["sample_index"],
                                r["sample_index"],
                                c,
                                r,
                            )
                        )
                candidates.sort(key=lambda t: t[:4])
                for _, _, _, _, c, r in candidates[:PAIRS_PER_PROMPT]:
                    out.write(
                        json.dumps(
                            {
                                "prompt_id": prompt_id,
                                "source": source,
                                "chosen": c["response"],
                                "rejected": r["response"],
                            }
                        )
                        + "\n"
                    )


# ------------------------------------------------------------------ the I/O floor


def io_only(work: Path) -> None:
    """What any pairing must do and no rule can avoid: start Python, read the sample
    columns pairing needs and write the pairs Parquet (the pairs ours wrote, re-written the
    same way: zstd, atomic). Its wall time bounds the speed-up on this machine."""
    import polars as pl

    from mpo.pairs import PAIRING_COLUMNS
    from mpo.schemas import PAIRS, shard_files, write_table

    pl.scan_parquet(work / "samples" / "*.parquet").select(PAIRING_COLUMNS).collect()
    rereading = 0.0  # getting the pairs back into memory is not part of the floor: timed and left out
    for index, shard in enumerate(shard_files(work / "pairs" / "data")):
        start = time.perf_counter()
        table = pl.read_parquet(shard).to_arrow()
        rereading += time.perf_counter() - start
        write_table(table, work / "io-floor" / f"part-{index:05d}.parquet", PAIRS)
    (work / "io-floor" / "rereading_seconds").write_text(f"{rereading}\n")


# ------------------------------------------------------------------ harness


def _run(args: list[str]) -> tuple[float, float]:
    """Run a child process; return (wall seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *args])
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpo-bench-postprocess"))
    parser.add_argument(
        "--selection",
        choices=["random", "closest"],
        default="random",
        help="pairs kept under the cap (mpo.pairs.PairSelection)",
    )
    parser.add_argument("--role", choices=["ours", "baseline", "io"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    if args.role == "ours":
        from mpo.pairs import PairingConfig, run_pairing

        run_pairing(
            work / "samples",
            work / "pairs",
            PairingConfig(
                pairs_per_prompt=PAIRS_PER_PROMPT, max_repetition=MAX_REPETITION, selection=args.selection
            ),
        )
        return
    if args.role == "baseline":
        baseline(work / "samples.jsonl", work / "baseline_pairs.jsonl", args.selection)
        return
    if args.role == "io":
        io_only(work)
        return

    marker = work / f"generated-{args.rows}"
    if not marker.exists():
        start = time.perf_counter()
        generate(work, args.rows)
        marker.touch()
        print(f"generated {args.rows:,} sample rows in {time.perf_counter() - start:.1f} s")
    ours = _run(["--role", "ours", "--workdir", str(work), "--selection", args.selection])
    base = _run(["--role", "baseline", "--workdir", str(work), "--selection", args.selection])
    floor_wall, _ = _run(["--role", "io", "--workdir", str(work)])
    floor = floor_wall - float((work / "io-floor" / "rereading_seconds").read_text())

    import polars as pl

    ours_pairs = pl.read_parquet(work / "pairs" / "data" / "*.parquet").select(
        "prompt_id", "source", "chosen", "rejected"
    )
    base_pairs = pl.read_ndjson(work / "baseline_pairs.jsonl").select(
        "prompt_id", "source", "chosen", "rejected"
    )
    identical = set(ours_pairs.iter_rows()) == set(base_pairs.iter_rows())
    print(
        f"\nrows: {args.rows:,}   selection: {args.selection}   pairs: ours {ours_pairs.height:,}, baseline {base_pairs.height:,}   "
        f"identical pair sets: {identical}"
    )
    print(f"{'':<26}{'wall s':>10}{'peak RSS MiB':>15}")
    print(f"{'mpo pairs (polars)':<26}{ours[0]:>10.1f}{ours[1]:>15.0f}")
    print(f"{'plain Python (reference)':<26}{base[0]:>10.1f}{base[1]:>15.0f}")
    print(f"{'ratio baseline / ours':<26}{base[0] / ours[0]:>9.1f}x{base[1] / ours[1]:>14.1f}x")
    print(f"{'I/O alone (see io_only)':<26}{floor:>10.1f}{'-':>15}")
    print(f"{'ratio baseline / I/O':<26}{base[0] / floor:>9.1f}x   (the most any pairing could reach here)")
    if not identical:
        raise SystemExit("pair sets differ")


if __name__ == "__main__":
    main()
