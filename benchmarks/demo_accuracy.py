"""The demo's models on a large fresh held-out set: how much of a demo's table is noise.

`mpo demo` scores its three models (start, MPO, SFT baseline) on 360 held-out prompts,
which leaves about 2.6 points of standard error on each mean and more on the difference
of two. This script draws a larger held-out set (new images, another seed) and scores the
models of one or more finished demo work folders on it, so that differences between
MPO and SFT, and between seeds, can be told from noise. The MPO - SFT column gives the
paired standard error (both models answer the same prompts).

    python benchmarks/demo_accuracy.py demo-run                      # 3,000 prompts
    python benchmarks/demo_accuracy.py run-seed0 run-seed1 run-seed2 --count 1000 --out /tmp/demo-accuracy
    python benchmarks/demo_accuracy.py demo-run --answers synth_colour   # accuracy per gold answer

Per work folder it takes the models its last run scored (``summary.json``). Evaluations
are cached under ``--out``. A second table splits accuracy by dataset, where MPO and SFT
part ways; ``--answers DATASET`` splits one dataset by gold answer and counts each model's
wrong answers, which shows where a model falls back to a default answer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from mpo.demo import DemoConfig  # noqa: E402
from mpo.engines.hf import TransformersEngine  # noqa: E402
from mpo.evaluate import correct_per_prompt, greedy_samples, mean_and_error, paired_difference  # noqa: E402
from mpo.ingest import ingest  # noqa: E402
from mpo.pairs import PairingConfig  # noqa: E402
from mpo.results import RunSummary  # noqa: E402
from mpo.sampling import SamplingConfig  # noqa: E402
from mpo.synth import VERIFY_MODES, generate  # noqa: E402


def demo_models(workdir: Path) -> dict[str, Path]:
    """The models a finished demo scored (start, mpo, sft), from its ``summary.json``."""
    summary = workdir / "summary.json"
    if not summary.exists():
        raise SystemExit(f"{summary} not found: run `mpo demo --workdir {workdir}` first")
    models = {name: Path(path) for name, path in RunSummary.read(summary).models.items()}
    if set(models) != {"start", "mpo", "sft"}:
        raise SystemExit(f"{summary}: models {sorted(models)}, expected start, mpo and sft (a demo run)")
    return models


def score_model(model: Path, prompts_dir: Path, out: Path, pairing: PairingConfig) -> pl.DataFrame:
    """``mpo.evaluate.correct_per_prompt`` of one model's greedy answers to the held-out prompts."""
    engine = TransformersEngine(str(model))
    try:
        samples = greedy_samples(engine, prompts_dir, out, SamplingConfig(), max_tokens=48)
    finally:
        engine.close()
    return correct_per_prompt(samples, pairing)


def per_dataset_table(results: dict[Path, pl.DataFrame]) -> None:
    """Accuracy per dataset of each run's three models (start / MPO / SFT) and MPO - SFT."""
    datasets = sorted(next(iter(results.values()))["dataset"].unique())
    print("\nper dataset: start / MPO / SFT (MPO - SFT)")
    print("| work folder | " + " | ".join(datasets) + " |")
    print("| --- |" + " ---: |" * len(datasets))
    for workdir, joined in results.items():
        means = {
            row["dataset"]: row
            for row in joined.group_by("dataset")
            .agg(pl.col("start").mean(), pl.col("mpo").mean(), pl.col("sft").mean())
            .iter_rows(named=True)
        }
        cells = [
            f"{100 * m['start']:.1f} / {100 * m['mpo']:.1f} / {100 * m['sft']:.1f} "
            f"({100 * (m['mpo'] - m['sft']):+.1f})"
            for m in (means[d] for d in datasets)
        ]
        print(f"| {workdir} | " + " | ".join(cells) + " |")


def answers_table(workdir: Path, scores: dict[str, pl.DataFrame], dataset: str) -> None:
    """One dataset split by gold answer: each model's accuracy per answer and its most common
    wrong answers (a model that cannot tell the classes apart says one of them by default)."""
    print(f"\n{workdir}, {dataset}: accuracy per gold answer; most common wrong answers")
    for name, frame in scores.items():
        rows = frame.filter(pl.col("dataset") == dataset)
        per_answer = rows.group_by("answer").agg(pl.col("correct").mean()).sort("answer")
        wrong = (
            rows.filter(pl.col("correct") == 0)["said"]
            .fill_null("(no answer)")
            .value_counts(sort=True)
            .head(4)
        )
        print(
            f"  {name:5} "
            + "  ".join(f"{answer} {100 * acc:.0f}%" for answer, acc in per_answer.iter_rows())
            + "  | wrong: "
            + ", ".join(f"{said} x{n}" for said, n in wrong.iter_rows())
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdirs", type=Path, nargs="+", help="finished `mpo demo` work folders")
    parser.add_argument("--count", type=int, default=1000, help="held-out prompts per dataset")
    parser.add_argument(
        "--seed", type=int, default=100, help="seed of the held-out images (not a demo's seed)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-accuracy"), help="held-out data and evaluations"
    )
    parser.add_argument("--answers", metavar="DATASET", help="also split this dataset by gold answer")
    args = parser.parse_args()

    closed = tuple(d for d in DemoConfig.load().data.datasets if d in VERIFY_MODES)
    if args.answers is not None and args.answers not in closed:  # before any model is scored
        parser.error(f"--answers {args.answers}: not a held-out dataset here ({', '.join(closed)})")
    prompts_dir = args.out / "heldout" / "prompts"
    if not prompts_dir.exists():
        generate(args.out / "data", count=args.count, seed=args.seed, heldout_fraction=0.0, datasets=closed)
        ingest(args.out / "data" / "meta.json", args.out / "heldout")
    pairing = PairingConfig(verify_modes=VERIFY_MODES)

    print(f"{args.count} held-out prompts per dataset ({', '.join(closed)}), greedy; mean ± standard error")
    print("| work folder | start | MPO | SFT | MPO - start | MPO - SFT (paired) | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    results: dict[Path, pl.DataFrame] = {}
    model_scores: dict[Path, dict[str, pl.DataFrame]] = {}
    for workdir in args.workdirs:
        started = time.perf_counter()
        scores = {
            name: score_model(path, prompts_dir, args.out / "eval", pairing)
            for name, path in demo_models(workdir).items()
        }
        joined = (
            scores["start"]
            .select("prompt_id", "dataset", start="correct")
            .join(scores["mpo"].select("prompt_id", mpo="correct"), on="prompt_id")
            .join(scores["sft"].select("prompt_id", sft="correct"), on="prompt_id")
        )
        results[workdir] = joined
        means = [mean_and_error(scores[name], "correct") for name in ("start", "mpo", "sft")]
        differences = [paired_difference(scores["mpo"], scores[other]) for other in ("start", "sft")]
        cells = [f"{100 * mean:.1f} ± {100 * error:.1f}" for mean, error in means] + [
            f"{100 * mean:+.1f} ± {100 * error:.1f}" for mean, error in differences
        ]
        print(f"| {workdir} | " + " | ".join(cells) + f" | {time.perf_counter() - started:.0f} |", flush=True)
        model_scores[workdir] = scores
    per_dataset_table(results)
    if args.answers:
        for workdir, scores in model_scores.items():
            answers_table(workdir, scores, args.answers)


if __name__ == "__main__":
    main()
