"""Samples -> preference pairs (polars), with every drop counted by reason.

Rules, per prompt:
- **correctness**: correct x wrong cross product, minus pairs whose chosen answer is
  contained in the rejected answer; a truncated response (``finish_reason == length``)
  is never chosen; up to ``pairs_per_prompt`` pairs, drawn with a fixed seed.
- **format**: correct responses x format failures (no parsable answer), same cap.
- **dropout_ntp**: chosen = the original answer, rejected = prefix + continuation,
  unless the continuation is empty or rejected equals chosen.
- everywhere: exact-duplicate responses and heavy n-gram repetition are dropped;
  optional length balancing caps len(chosen) / len(rejected).

Answer extraction is vectorised for the trigger templates (``en``/``zh``) and falls
back to ``mpo.answers.extract_answer`` for the rest; verification runs once per distinct
(answer, gold, mode). The draw is a deterministic integer hash of (prompt, chosen index,
rejected index, seed), so the same samples always give the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, Field

from mpo.answers import TRIGGERS, Verdict, VerifyMode, extract_answer, is_correct
from mpo.io import atomic_write_text, publish_dir
from mpo.schemas import HARD_PROMPTS, PAIRS, SAMPLES, conform, read_dir, write_table
from mpo.templates import TEMPLATES, apply_template

_MINSTD, _PRIME = 48271, 2_147_483_647
_TRIGGER_REST = "(?s).*(?:" + "|".join(re.escape(t) for t in TRIGGERS) + ")(.*)$"
FAST_TEMPLATES = ("en", "zh")


class PairingConfig(BaseModel):
    """How samples become pairs. Every field is a documented knob; defaults follow InternVL."""

    pairs_per_prompt: int = Field(15, ge=1, description="cap on pairs per prompt and source")
    seed: int = Field(0, description="seed of the deterministic pair draw")
    verify_modes: dict[str, VerifyMode] = Field(default_factory=dict, description="verifier per dataset")
    default_verify_mode: VerifyMode = Field(VerifyMode.EXACT, description="verifier for datasets not listed")
    repetition_ngram: int = Field(4, ge=1, description="n of the n-grams checked for repetition")
    max_repetition: float = Field(0.3, ge=0, le=1, description="drop a response whose share of repeated n-grams exceeds this")
    max_length_ratio: float | None = Field(None, gt=0, description="drop pairs with len(chosen)/len(rejected) above this")
    shard_rows: int = Field(100_000, ge=1, description="rows per output Parquet shard")


@dataclass
class PairingResult:
    pairs: pl.DataFrame
    hard_prompts: pl.DataFrame
    report: dict[str, Any]


# ------------------------------------------------------------------ judging


def extract_answers(df: pl.DataFrame) -> pl.Series:
    """``extract_answer(response, prompt_version)`` for every row, vectorised where possible."""
    line = (
        pl.col("response").str.extract(_TRIGGER_REST, 1)
        .str.strip_chars().str.extract(r"^([^\n]*)", 1).str.strip_chars()
    )
    answer = line.str.strip_chars_end(".。").str.strip_chars()
    fast = df.select(
        answer=pl.when(answer == "").then(None).otherwise(answer),
        slow=~pl.col("prompt_version").is_in(FAST_TEMPLATES) | line.str.contains("\\boxed{", literal=True).fill_null(False),
    )
    answers = fast["answer"].to_list()
    slow_rows = fast["slow"].arg_true().to_list()
    if slow_rows:
        responses, versions = df["response"], df["prompt_version"]
        for i in slow_rows:
            answers[i] = extract_answer(responses[i], versions[i])
    return pl.Series("extracted", answers, dtype=pl.String)


def judge_samples(df: pl.DataFrame, config: PairingConfig) -> pl.DataFrame:
    """Add ``extracted`` (answer or null) and ``verdict`` to correctness samples."""
    modes = {name: mode.value for name, mode in config.verify_modes.items()}
    df = df.with_columns(
        extracted=extract_answers(df),
        mode=pl.col("dataset").replace_strict(modes, default=config.default_verify_mode.value, return_dtype=pl.String),
    )
    distinct = df.filter(pl.col("extracted").is_not_null()).select("extracted", "answer", "mode").unique()
    verdicts = [
        Verdict.CORRECT.value if is_correct(e, a, m) else Verdict.WRONG.value
        for e, a, m in distinct.iter_rows()
    ]
    distinct = distinct.with_columns(verdict=pl.Series(verdicts, dtype=pl.String))
    return (
        df.join(distinct, on=["extracted", "answer", "mode"], how="left", nulls_equal=False)
        .with_columns(verdict=pl.col("verdict").fill_null(Verdict.FORMAT_FAILURE.value))
        .drop("mode")
    )


def repetition(column: str, n: int) -> pl.Expr:
    """Share of repeated word n-grams in ``column`` (0 for texts shorter than n words)."""
    words = pl.col(column).str.split(" ")
    grams = words.list.eval(
        pl.concat_str([pl.element().shift(-k) for k in range(n)], separator=" ").drop_nulls()
    )
    total = grams.list.len()
    return pl.when(total > 0).then(1 - grams.list.n_unique() / total).otherwise(0.0)


# ------------------------------------------------------------------ drawing


def prompt_seeds(prompt_ids: pl.Series, seed: int) -> pl.Expr:
    """A stable per-prompt integer (crc32), shifted by the run seed."""
    unique = prompt_ids.unique().to_list()
    mapping = {p: (zlib.crc32(p.encode()) + seed * 7919) % _PRIME for p in unique}
    return pl.col("prompt_id").replace_strict(mapping, return_dtype=pl.Int64)


def draw_key(first: str, second: str) -> pl.Expr:
    """Deterministic pseudo-random key of (prompt seed, first index, second index): two
    MINSTD rounds in int64, identical on every machine and polars version."""
    base = (pl.col("_pseed") + pl.col(first) * 1031 + pl.col(second)) % _PRIME
    return ((base * _MINSTD) % _PRIME * _MINSTD) % _PRIME


def cap_per_prompt(df: pl.DataFrame, first: str, second: str, cap: int) -> pl.DataFrame:
    ranked = df.with_columns(_key=draw_key(first, second)).sort(["prompt_id", "_key", first, second])
    return ranked.filter(pl.int_range(pl.len()).over("prompt_id") < cap).drop("_key")


# ------------------------------------------------------------------ pairing


def _count(counter: dict[str, dict[str, int]], frame: pl.DataFrame, reason: str) -> None:
    for dataset, n in frame.group_by("dataset").len().iter_rows():
        counter.setdefault(dataset, {}).setdefault(reason, 0)
        counter[dataset][reason] += n


def _split(df: pl.DataFrame, keep: pl.Expr, counter: dict[str, dict[str, int]], reason: str) -> pl.DataFrame:
    """Keep rows where ``keep`` holds; count the rest under ``reason``."""
    flagged = df.with_columns(_keep=keep.fill_null(False))
    _count(counter, flagged.filter(~pl.col("_keep")), reason)
    return flagged.filter(pl.col("_keep")).drop("_keep")


def _dedup(df: pl.DataFrame, text: str, counter: dict[str, dict[str, int]]) -> pl.DataFrame:
    """Keep one row per (prompt, text): a complete copy before a truncated one, then the first."""
    first = pl.int_range(pl.len()).over(["prompt_id", text]) == 0
    ordered = df.sort(["prompt_id", pl.col("finish_reason") == "length", "sample_index"])
    return _split(ordered, first, counter, "duplicate_response")


def _cross(chosen: pl.DataFrame, rejected: pl.DataFrame) -> pl.DataFrame:
    left = chosen.select("prompt_id", "dataset", "_pseed", "question", "prompt_version", "images", "answer", "model",
                         c_idx="sample_index", chosen="response", chosen_answer="extracted")
    right = rejected.select("prompt_id", r_idx="sample_index", rejected="response", rejected_answer="extracted")
    return left.join(right, on="prompt_id", how="inner")


def _correctness_pairs(samples: pl.DataFrame, config: PairingConfig, filtered: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    judged = judge_samples(samples, config)
    usable = _dedup(judged, "response", filtered)
    usable = _split(usable, pl.col("_rep") <= config.max_repetition, filtered, "repetitive")
    correct = usable.filter(pl.col("verdict") == Verdict.CORRECT.value)
    chosen = _split(correct, pl.col("finish_reason") != "length", filtered, "truncated_chosen")
    wrong = usable.filter(pl.col("verdict") == Verdict.WRONG.value)
    failures = usable.filter(pl.col("verdict") == Verdict.FORMAT_FAILURE.value)

    frames = []
    for source, rejected, contained_check in (("correctness", wrong, True), ("format", failures, False)):
        pairs = _cross(chosen, rejected)
        if contained_check:
            contained = pl.col("rejected_answer").str.to_lowercase().str.contains(
                pl.col("chosen_answer").str.to_lowercase(), literal=True)
            pairs = _split(pairs, ~contained, filtered, "answer_contained")
        if config.max_length_ratio is not None:
            ratio = pl.col("chosen").str.len_chars() / pl.col("rejected").str.len_chars().clip(lower_bound=1)
            pairs = _split(pairs, ratio <= config.max_length_ratio, filtered, "length_ratio")
        capped = cap_per_prompt(pairs, "c_idx", "r_idx", config.pairs_per_prompt)
        _count(filtered, pairs.join(capped.select("prompt_id", "c_idx", "r_idx"), on=["prompt_id", "c_idx", "r_idx"],
                                    how="anti"), f"over_cap_{source}")
        frames.append(capped.with_columns(source=pl.lit(source)))
    return pl.concat(frames, how="diagonal_relaxed"), judged


def _dropout_pairs(samples: pl.DataFrame, config: PairingConfig, filtered: dict) -> pl.DataFrame:
    rows = samples.with_columns(rejected=pl.col("prefix").fill_null("") + pl.col("response"))
    rows = _split(rows, pl.col("response").str.strip_chars() != "", filtered, "empty_continuation")
    rows = _split(rows, pl.col("rejected").str.strip_chars() != pl.col("chosen").str.strip_chars(), filtered,
                  "identical_to_chosen")
    rows = _dedup(rows, "rejected", filtered)
    rows = _split(rows, pl.col("_rep") <= config.max_repetition, filtered, "repetitive")
    if config.max_length_ratio is not None:
        ratio = pl.col("chosen").str.len_chars() / pl.col("rejected").str.len_chars().clip(lower_bound=1)
        rows = _split(rows, ratio <= config.max_length_ratio, filtered, "length_ratio")
    rows = rows.with_columns(_zero=pl.lit(0, dtype=pl.Int64))
    capped = cap_per_prompt(rows, "sample_index", "_zero", config.pairs_per_prompt)
    _count(filtered, rows.join(capped.select("prompt_id", "sample_index"), on=["prompt_id", "sample_index"], how="anti"),
           "over_cap_dropout_ntp")
    return capped.select(
        "prompt_id", "dataset", "question", "prompt_version", "images", "answer", "model", "chosen", "rejected",
        source=pl.lit("dropout_ntp"), chosen_answer=pl.lit(None, pl.String), rejected_answer=pl.lit(None, pl.String),
    )


def _prompt_texts(pairs: pl.DataFrame) -> pl.DataFrame:
    """The question as the model saw it: templated for CoT samples, as is for DropoutNTP."""
    keys = pairs.select("question", "prompt_version", "source").unique()
    mapping = {}
    for question, version, source in keys.iter_rows():
        templated = source != "dropout_ntp" and version in TEMPLATES
        mapping[(question, version, source)] = apply_template(question, version) if templated else question
    lookup = pl.DataFrame(
        [{"question": q, "prompt_version": v, "source": s, "prompt": p} for (q, v, s), p in mapping.items()],
        schema={"question": pl.String, "prompt_version": pl.String, "source": pl.String, "prompt": pl.String},
    )
    return lookup


def _pair_ids(pairs: pl.DataFrame) -> pl.Series:
    ids = [
        hashlib.sha256(f"{p}\x00{c}\x00{r}".encode()).hexdigest()[:24]
        for p, c, r in pairs.select("prompt_id", "chosen", "rejected").iter_rows()
    ]
    return pl.Series("pair_id", ids, dtype=pl.String)


def make_pairs(samples: pl.DataFrame, config: PairingConfig) -> PairingResult:
    """Pure function: samples table in, pairs + hard prompts + report out."""
    filtered: dict[str, dict[str, int]] = {}
    samples = samples.with_columns(_pseed=prompt_seeds(samples["prompt_id"], config.seed),
                                   _rep=repetition("response", config.repetition_ngram))
    correctness = samples.filter(pl.col("source") == "correctness")
    dropout = samples.filter(pl.col("source") == "dropout_ntp")
    unknown = samples.filter(~pl.col("source").is_in(["correctness", "dropout_ntp"]))
    _count(filtered, unknown, "unknown_source")

    pair_frames, judged = _correctness_pairs(correctness, config, filtered)
    pairs = pl.concat([pair_frames, _dropout_pairs(dropout, config, filtered)], how="diagonal_relaxed")
    if pairs.height:
        pairs = pairs.join(_prompt_texts(pairs), on=["question", "prompt_version", "source"], how="left")
    else:
        pairs = pairs.with_columns(prompt=pl.lit(None, pl.String))
    pairs = pairs.with_columns(_pair_ids(pairs)).sort(["dataset", "prompt_id", "source", "pair_id"])

    per_prompt = judged.group_by("prompt_id", "dataset", "question", "answer").agg(
        samples=pl.len(), correct=(pl.col("verdict") == Verdict.CORRECT.value).sum(), images=pl.col("images").first())
    hard = per_prompt.filter(pl.col("correct") == 0).sort("prompt_id")
    report = _report(judged, dropout, per_prompt, pairs, filtered)
    return PairingResult(pairs.select(PAIRS.names), hard.select(HARD_PROMPTS.names), report)


def _report(judged: pl.DataFrame, dropout: pl.DataFrame, per_prompt: pl.DataFrame, pairs: pl.DataFrame,
            filtered: dict[str, dict[str, int]]) -> dict[str, Any]:
    datasets: dict[str, dict[str, Any]] = {}
    for (dataset,), frame in judged.group_by("dataset"):
        verdicts = dict(frame.group_by("verdict").len().iter_rows())
        datasets[str(dataset)] = {
            "samples": frame.height,
            "accuracy": verdicts.get(Verdict.CORRECT.value, 0) / frame.height,
            "format_failures": verdicts.get(Verdict.FORMAT_FAILURE.value, 0),
        }
    for (dataset,), frame in per_prompt.group_by("dataset"):
        datasets[str(dataset)].update(
            prompts=frame.height,
            all_correct_prompts=frame.filter(pl.col("correct") == pl.col("samples")).height,
            all_wrong_prompts=frame.filter(pl.col("correct") == 0).height,
        )
    for (dataset,), frame in dropout.group_by("dataset"):
        datasets.setdefault(str(dataset), {}).update(samples=frame.height, prompts=frame["prompt_id"].n_unique())
    for dataset, source, n in pairs.group_by("dataset", "source").len().iter_rows():
        datasets.setdefault(dataset, {}).setdefault("pairs", {})[source] = n
    for dataset, reasons in filtered.items():
        datasets.setdefault(dataset, {})["filtered"] = dict(sorted(reasons.items()))
    by_source = dict(pairs.group_by("source").len().sort("source").iter_rows())
    return {"datasets": dict(sorted(datasets.items())), "pairs": pairs.height, "pairs_by_source": by_source}


def read_samples(samples_dir: Path | str) -> pl.DataFrame:
    table = read_dir(samples_dir, SAMPLES)
    return pl.from_arrow(table)  # type: ignore[return-value]


def run_pairing(samples_dir: Path | str, out: Path | str, config: PairingConfig | None = None) -> dict[str, Any]:
    """``mpo pairs``: read a samples directory, write ``out/data/*.parquet`` (the pairs),
    ``out/hard_prompts.parquet`` and ``out/report.json``; return the report."""
    config = config or PairingConfig()
    result = make_pairs(read_samples(samples_dir), config)
    out = Path(out)

    def write_shards(folder: Path) -> None:
        table = conform(result.pairs.to_arrow(), PAIRS)
        for index, start in enumerate(range(0, max(table.num_rows, 1), config.shard_rows)):
            write_table(table.slice(start, config.shard_rows), folder / f"part-{index:05d}.parquet")

    publish_dir(out / "data", write_shards)
    write_table(pa.Table.from_pylist(result.hard_prompts.to_dicts(), schema=HARD_PROMPTS), out / "hard_prompts.parquet")
    report = dict(result.report, config=json.loads(config.model_dump_json()))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
