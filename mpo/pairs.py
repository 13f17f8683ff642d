"""Samples -> preference pairs (polars), with every drop counted by reason.

Rules, per prompt:
- **correctness**: correct x wrong cross product, minus pairs whose chosen answer is
  contained in the rejected answer (whole numbers and words: ``4`` is in ``4 or 5``,
  ``3`` is not in ``3.14``); a truncated response (``finish_reason == length``)
  is never chosen; up to ``pairs_per_prompt`` pairs, drawn with a fixed seed, or with
  ``selection="closest"`` the pairs whose two responses share the longest prefix first
  (hard negatives: they part at the step that went wrong), the draw breaking ties.
- **format**: correct responses x format failures (no parsable answer), same cap.
- **self-contradictory** responses are on neither side: where a dataset has a
  ``claim_patterns`` entry, the answer its steps state (the pattern's last match) must
  pass the dataset's verifier against the response's own final answer. A right answer
  after steps that say otherwise is a lucky guess, and a wrong one after right steps
  would teach the pair to push the right steps down.
- **dropout_ntp**: chosen = the original answer, rejected = prefix + continuation,
  unless the continuation is empty or rejected equals chosen.
- everywhere: a request the engine gave up on (finish reason other than stop/length,
  e.g. abort or error) is no response and is dropped as ``failed_request``;
  exact-duplicate responses and heavy n-gram repetition are dropped;
  optional length balancing caps len(chosen) / len(rejected).

How it stays fast and small: answer extraction is vectorised for the trigger templates
(``en``/``zh``: one capture-free regex) and falls back to ``mpo.answers.extract_answer``
for the rest; verification runs once per distinct (answer, gold, mode); repetition and
content hashes are compiled loops over the UTF-8 bytes (``mpo.text_stats``); duplicates
are found by content hash; cross products carry only indices, answers and hashes, are
capped and sorted before the response texts are joined back for the kept pairs;
``run_pairing`` works through the samples a shard or so at a time (a prompt whose
samples span shards is handled in a final chunk). The draw is a deterministic integer
hash of (prompt, chosen index, rejected index, seed): the same samples always give the
same pairs, in any order and any chunking. ``pair_id`` is the content hash of
(prompt_id, hash of chosen, hash of rejected), 16 hex digits.
"""

from __future__ import annotations

import re
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mpo.answers import TRIGGERS, Verdict, VerifyMode, extract_answer, is_correct
from mpo.engines.base import FINISHED
from mpo.errors import unreadable
from mpo.io import atomic_write_text, publish_dir
from mpo.results import DatasetPairStats, PairingReport
from mpo.sampling import distinct_samples
from mpo.schemas import HARD_PROMPTS, PAIRS, SAMPLES, shard_files, write_table
from mpo.templates import TEMPLATES, apply_template
from mpo.text_stats import common_prefix, content_hash, hex64, repetition

_MINSTD, _PRIME = 48271, 2_147_483_647
_TRIGGER = "(?:" + "|".join(re.escape(t) for t in TRIGGERS) + ")"
FAST_TEMPLATES = ("en", "zh")


class PairSelection(StrEnum):
    """Which correct x wrong pairs a prompt keeps when it has more than the cap."""

    RANDOM = "random"  # a seeded draw (InternVL)
    CLOSEST = "closest"  # the longest shared prefix first: the pair differs where the wrong one went wrong


class PairingConfig(BaseModel):
    """How samples become pairs. Every field is a documented knob; defaults follow InternVL."""

    model_config = ConfigDict(extra="forbid")

    pairs_per_prompt: int = Field(15, ge=1, description="cap on pairs per prompt and source")
    selection: PairSelection = Field(
        PairSelection.RANDOM,
        description=(
            "pairs kept under the cap (correctness and format): random draw, or closest (longest shared prefix first)"
        ),
    )
    seed: int = Field(0, description="seed of the deterministic pair draw")
    verify_modes: dict[str, VerifyMode] = Field(default_factory=dict, description="verifier per dataset")
    default_verify_mode: VerifyMode = Field(
        VerifyMode.AUTO,
        description="verifier for datasets not listed (auto: per prompt, from its gold answer)",
    )
    claim_patterns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "per dataset, a regex whose one capture group is the answer a response's steps state (last match counts); "
            "a response whose stated answer fails the verifier against its own final answer is paired on neither side"
        ),
    )
    repetition_ngram: int = Field(4, ge=1, le=8, description="n of the n-grams checked for repetition")
    max_repetition: float = Field(
        0.3, ge=0, le=1, description="drop a response whose share of repeated n-grams exceeds this"
    )
    max_length_ratio: float | None = Field(
        None, gt=0, description="drop pairs with len(chosen)/len(rejected) above this"
    )
    shard_rows: int = Field(100_000, ge=1, description="rows per output Parquet shard")
    chunk_rows: int = Field(50_000, ge=1, description="sample rows held in memory at once by run_pairing")

    @field_validator("claim_patterns")
    @classmethod
    def _one_group_each(cls, patterns: dict[str, str]) -> dict[str, str]:
        for dataset, pattern in patterns.items():
            try:
                groups = re.compile(pattern).groups
            except re.error as error:
                raise ValueError(f"claim_patterns[{dataset!r}]: not a regex: {error}") from None
            if groups != 1:
                raise ValueError(
                    f"claim_patterns[{dataset!r}] must have exactly one capture group, has {groups}"
                )
        return patterns


@dataclass
class PairingResult:
    pairs: pl.DataFrame
    hard_prompts: pl.DataFrame
    report: PairingReport


# ------------------------------------------------------------------ judging


def extract_answers(df: pl.DataFrame) -> pl.Series:
    """``extract_answer(response, prompt_version)`` for every row, vectorised where possible.

    For the trigger templates (``en``/``zh``) the last match of "trigger, blanks, one line"
    is the answer line (a regex without capture groups: the engine's fast path). That
    match is not the last trigger when its line holds another trigger, and ``\\boxed{}``
    needs brace matching: those rows, and other templates, go to ``extract_answer``.
    """
    match = pl.col("response").str.extract_all(_TRIGGER + r"\s*[^\n]*").list.last()
    line = match.str.replace(f"^{_TRIGGER}", "").str.strip_chars()
    answer = line.str.strip_chars_end(".。").str.strip_chars()
    tricky = line.str.contains(_TRIGGER) | line.str.contains("\\boxed{", literal=True)
    fast = df.select("response", "prompt_version").select(
        answer=pl.when(answer == "").then(None).otherwise(answer),
        slow=~pl.col("prompt_version").is_in(FAST_TEMPLATES) | tricky.fill_null(False),
    )
    answers = fast["answer"]
    slow_rows = fast["slow"].arg_true()
    if slow_rows.len():
        responses, versions = df["response"], df["prompt_version"]
        values = [extract_answer(responses[i], versions[i]) for i in slow_rows.to_list()]
        answers = answers.scatter(slow_rows, pl.Series(values, dtype=pl.String))
    return answers.alias("extracted")


def _verify_mode(config: PairingConfig) -> pl.Expr:
    """Each row's verifier (a ``VerifyMode`` value) by its dataset."""
    modes = {name: mode.value for name, mode in config.verify_modes.items()}
    return pl.col("dataset").replace_strict(
        modes, default=config.default_verify_mode.value, return_dtype=pl.String
    )


def _verify_distinct(frame: pl.DataFrame, prediction: str, gold: str) -> pl.DataFrame:
    """The distinct (prediction, gold, mode) rows of ``frame`` with a prediction, and ``_ok``:
    ``is_correct`` run once per distinct triple, not once per row."""
    distinct = frame.filter(pl.col(prediction).is_not_null()).select(prediction, gold, "mode").unique()
    verdicts = [is_correct(p, g, m) for p, g, m in distinct.iter_rows()]
    return distinct.with_columns(_ok=pl.Series(verdicts, dtype=pl.Boolean))


def judge_samples(df: pl.DataFrame, config: PairingConfig) -> pl.DataFrame:
    """Add ``extracted`` (answer or null) and ``verdict`` to correctness samples."""
    df = df.with_columns(extracted=extract_answers(df), mode=_verify_mode(config))
    distinct = _verify_distinct(df, "extracted", "answer").select(
        "extracted",
        "answer",
        "mode",
        verdict=pl.when("_ok").then(pl.lit(Verdict.CORRECT.value)).otherwise(pl.lit(Verdict.WRONG.value)),
    )
    return (
        df.join(distinct, on=["extracted", "answer", "mode"], how="left", nulls_equal=False)
        .with_columns(verdict=pl.col("verdict").fill_null(Verdict.FORMAT_FAILURE.value))
        .drop("mode")
    )


def claims_consistent(judged: pl.DataFrame, config: PairingConfig) -> pl.Series:
    """Per judged sample: False where the answer its steps state (``claim_patterns``) fails
    the dataset's verifier against its own final answer, True otherwise (no pattern for
    the dataset, no match, or no final answer to compare)."""
    if not config.claim_patterns:
        return pl.repeat(True, judged.height, eager=True, dtype=pl.Boolean).alias("consistent")
    claim = pl.lit(None, pl.String)
    for dataset, pattern in config.claim_patterns.items():  # greedy (?s).* before it: the last match
        claim = (
            pl.when(pl.col("dataset") == dataset)
            .then(pl.col("response").str.extract(f"(?s).*(?:{pattern})", 1))
            .otherwise(claim)
        )
    claims = judged.select(
        "extracted",
        mode=_verify_mode(config),
        claim=pl.when(pl.col("extracted").is_not_null()).then(claim.str.strip_chars()),
    )
    distinct = _verify_distinct(claims, "claim", "extracted")
    joined = claims.join(distinct, on=["claim", "extracted", "mode"], how="left", maintain_order="left")
    return joined["_ok"].fill_null(True).alias("consistent")


# ------------------------------------------------------------------ drawing


def prompt_seeds(prompt_ids: pl.Series, seed: int) -> pl.Expr:
    """A stable per-prompt integer (crc32), shifted by the run seed."""
    mapping = {p: (zlib.crc32(p.encode()) + seed * 7919) % _PRIME for p in prompt_ids.unique().to_list()}
    if not mapping:  # a chunk with no rows (its prompts all span shards): polars would keep the strings
        return pl.lit(0, dtype=pl.Int64)
    return pl.col("prompt_id").replace_strict(mapping, return_dtype=pl.Int64)


def draw_key(first: str, second: str) -> pl.Expr:
    """Deterministic pseudo-random key of (prompt seed, first index, second index): two
    MINSTD rounds in int64, identical on every machine and polars version."""
    base = (pl.col("_pseed") + pl.col(first) * 1031 + pl.col(second)) % _PRIME
    return ((base * _MINSTD) % _PRIME * _MINSTD) % _PRIME


def position_in_run(key: str) -> pl.Expr:
    """0, 1, 2, ... within each run of equal ``key`` values in a sorted frame (the same
    as ``int_range().over(key)`` there, without the cost of a window)."""
    row = pl.int_range(pl.len())
    starts_run = pl.col(key).ne_missing(pl.col(key).shift(1))  # true on the first row too
    return row - pl.when(starts_run).then(row).otherwise(None).fill_null(strategy="forward")


def cap_per_prompt(
    df: pl.DataFrame, first: str, second: str, cap: int, closeness: str | None = None
) -> pl.DataFrame:
    """The first ``cap`` rows of each prompt in the seeded draw's order or, given a
    ``closeness`` column, the largest closeness first and the draw among equals."""
    order = ["_p", *([closeness] if closeness else []), "_key", first, second]
    ranked = df.with_columns(_key=draw_key(first, second)).sort(
        order, descending=[name == closeness for name in order]
    )
    return ranked.filter(position_in_run("_p") < cap).drop("_key")


# ------------------------------------------------------------------ pairing one chunk

Counts = dict[str, dict[str, int]]  # dataset -> reason -> rows


def _add(counter: Counts, dataset: str, reason: str, n: int) -> None:
    reasons = counter.setdefault(dataset, {})
    reasons[reason] = reasons.get(reason, 0) + n


def _count(counter: Counts, frame: pl.DataFrame, reason: str) -> None:
    for dataset, n in frame.group_by("dataset").len().iter_rows():
        _add(counter, dataset, reason, n)


def _split(df: pl.DataFrame, keep: pl.Expr, counter: Counts, reason: str) -> pl.DataFrame:
    """Keep rows where ``keep`` holds; count the rest under ``reason``."""
    flagged = df.with_columns(_keep=keep.fill_null(False))
    _count(counter, flagged.filter(~pl.col("_keep")), reason)
    return flagged.filter(pl.col("_keep")).drop("_keep")


def _dedup(df: pl.DataFrame, text_hash: str, counter: Counts) -> pl.DataFrame:
    """Keep one row per (prompt, text), texts compared by their 64-bit content hash: a
    complete copy before a truncated one, then the first."""
    first = pl.struct("_p", text_hash).is_first_distinct()
    ordered = df.sort(["_p", pl.col("finish_reason") == "length", "sample_index"])
    return _split(ordered, first, counter, "duplicate_response")


def _cap_and_count(
    pairs: pl.DataFrame,
    first: str,
    second: str,
    source: str,
    config: PairingConfig,
    counter: Counts,
    closeness: str | None = None,
) -> pl.DataFrame:
    """Apply the optional length-ratio filter, then the per-prompt cap (largest ``closeness``
    first when given), counting both."""
    if config.max_length_ratio is not None:
        ratio = pl.col("_c_len") / pl.col("_r_len").clip(lower_bound=1)
        pairs = _split(pairs, ratio <= config.max_length_ratio, counter, "length_ratio")
    capped = cap_per_prompt(pairs, first, second, config.pairs_per_prompt, closeness)
    if pairs.height > capped.height:
        kept = dict(capped.group_by("dataset").len().iter_rows())
        for dataset, n in pairs.group_by("dataset").len().iter_rows():
            if n > kept.get(dataset, 0):
                _add(counter, dataset, f"over_cap_{source}", n - kept.get(dataset, 0))
    return capped.with_columns(source=pl.lit(source))


def _answer_tokens(column: str) -> pl.Expr:
    """An answer as space-padded tokens (whole numbers such as ``3.14``, and words), so that containment
    compares whole answers: ``4`` is in ``4 or 5``, but ``3`` is not in ``3.14`` nor ``2`` in ``12``."""
    tokens = pl.col(column).str.to_lowercase().str.extract_all(r"-?\d+(?:[.,]\d+)*|[^\W\d_]+").list.join(" ")
    return pl.lit(" ") + tokens + pl.lit(" ")


def _correctness_pairs(
    samples: pl.DataFrame, config: PairingConfig, counter: Counts
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Index-level pairs (prompt_id, c_idx, r_idx, answers, source) and the judged samples."""
    samples = samples.with_row_index("_row")  # a response's position in `samples`, for common_prefix
    judged = judge_samples(samples, config)
    judged = judged.with_columns(_consistent=claims_consistent(judged, config))
    lean = judged.select(
        "_consistent",
        "prompt_id",
        "_p",
        "dataset",
        "prompt_version",
        "sample_index",
        "finish_reason",
        "_hash",
        "extracted",
        "verdict",
        "_rep",
        "_pseed",
        "_row",
        _len=pl.col("response").str.len_chars(),
    )
    usable = _dedup(lean, "_hash", counter)
    usable = _split(usable, pl.col("_rep") <= config.max_repetition, counter, "repetitive")
    usable = _split(usable, pl.col("_consistent"), counter, "self_contradictory")
    correct = usable.filter(pl.col("verdict") == Verdict.CORRECT.value)
    chosen = _split(correct, pl.col("finish_reason") != "length", counter, "truncated_chosen").select(
        "prompt_id",
        "_p",
        "prompt_version",
        "dataset",
        "_pseed",
        c_idx="sample_index",
        chosen_answer="extracted",
        _c_len="_len",
        _c_hash="_hash",
        _c_row="_row",
    )
    frames = []
    for source, verdict in (("correctness", Verdict.WRONG), ("format", Verdict.FORMAT_FAILURE)):
        rejected = usable.filter(pl.col("verdict") == verdict.value).select(
            "_p",
            "prompt_version",
            r_idx="sample_index",
            rejected_answer="extracted",
            _r_len="_len",
            _r_hash="_hash",
            _r_row="_row",
        )
        pairs = chosen.join(rejected, on=["_p", "prompt_version"], how="inner")
        if source == "correctness":
            contained = _answer_tokens("rejected_answer").str.contains(
                _answer_tokens("chosen_answer"), literal=True
            )
            pairs = _split(pairs, ~contained, counter, "answer_contained")
        closeness = None
        if config.selection is PairSelection.CLOSEST:  # texts stay in `samples`; pairs carry their rows
            closeness = "_shared"
            pairs = pairs.with_columns(
                _shared=common_prefix(samples["response"], pairs["_c_row"], pairs["_r_row"])
            )
        frames.append(_cap_and_count(pairs, "c_idx", "r_idx", source, config, counter, closeness))
    return pl.concat(frames, how="diagonal_relaxed"), judged


def _dropout_pairs(samples: pl.DataFrame, config: PairingConfig, counter: Counts) -> pl.DataFrame:
    rows = samples.with_columns(rejected=pl.col("prefix").fill_null("") + pl.col("response"))
    rows = _split(rows, pl.col("response").str.strip_chars() != "", counter, "empty_continuation")
    rows = _split(
        rows,
        pl.col("rejected").str.strip_chars() != pl.col("chosen").str.strip_chars(),
        counter,
        "identical_to_chosen",
    )
    rows = rows.with_columns(_c_hash=content_hash(rows["chosen"]), _r_hash=content_hash(rows["rejected"]))
    rows = _dedup(rows, "_r_hash", counter)
    rows = _split(rows, pl.col("_rep") <= config.max_repetition, counter, "repetitive")
    rows = rows.with_columns(
        _zero=pl.lit(0, dtype=pl.Int64),
        _c_len=pl.col("chosen").str.len_chars(),
        _r_len=pl.col("rejected").str.len_chars(),
    )
    capped = _cap_and_count(rows, "sample_index", "_zero", "dropout_ntp", config, counter)
    return capped.select(
        "prompt_id",
        "_p",
        "prompt_version",
        "chosen",
        "rejected",
        "source",
        "_c_hash",
        "_r_hash",
        c_idx="sample_index",
        chosen_answer=pl.lit(None, pl.String),
        rejected_answer=pl.lit(None, pl.String),
    )


def _with_texts(pairs: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Join response texts onto the index-level correctness pairs, keeping the row order
    (pairs are sorted before the texts join them: sorting moves indices, not texts)."""
    texts = samples.select("_p", "sample_index", "response")
    return (
        pairs.join(
            texts.select("_p", c_idx="sample_index", _chosen="response"),
            on=["_p", "c_idx"],
            how="left",
            maintain_order="left",
        )
        .join(
            texts.select("_p", r_idx="sample_index", _rejected="response"),
            on=["_p", "r_idx"],
            how="left",
            maintain_order="left",
        )
        .with_columns(chosen=pl.coalesce("chosen", "_chosen"), rejected=pl.coalesce("rejected", "_rejected"))
    )


def _prompt_column(pairs: pl.DataFrame) -> pl.DataFrame:
    """The question as the model saw it: templated for CoT samples, as is for DropoutNTP
    (templates applied once per distinct question, the row order kept)."""
    keyed = pairs.with_columns(
        _templated=(pl.col("source") != "dropout_ntp") & pl.col("prompt_version").is_in(list(TEMPLATES))
    )
    keys = keyed.select("question", "prompt_version", "_templated").unique()
    prompts = [apply_template(q, v) if t else q for q, v, t in keys.iter_rows()]
    return keyed.join(
        keys.with_columns(prompt=pl.Series(prompts, dtype=pl.String)),
        on=["question", "prompt_version", "_templated"],
        how="left",
        nulls_equal=True,
        maintain_order="left",
    )


def _pair_ids(pairs: pl.DataFrame) -> pl.Series:
    """Stable content id: the hash of (prompt_id, hash of chosen, hash of rejected)."""
    key = pairs["prompt_id"] + "\x00" + hex64(pairs["_c_hash"]) + "\x00" + hex64(pairs["_r_hash"])
    return hex64(content_hash(key)).alias("pair_id")


@dataclass
class ChunkResult:
    """What one chunk of samples yields; chunks combine by concatenation and addition."""

    pairs: pl.DataFrame
    prompt_stats: pl.DataFrame  # per prompt: samples, correct, format failures (null for open prompts)
    filtered: Counts


def pair_chunk(samples: pl.DataFrame, config: PairingConfig) -> ChunkResult:
    """Pairs of every prompt in ``samples`` (which must hold all samples of its prompts)."""
    counter: Counts = {}
    samples = samples.with_columns(
        _p=pl.col("prompt_id").rank("dense"),  # an integer key for joins and sorts
        _pseed=prompt_seeds(samples["prompt_id"], config.seed),
        _rep=repetition(samples["response"], config.repetition_ngram),
        _hash=content_hash(samples["response"]),
    )
    _count(counter, samples.filter(~pl.col("source").is_in(["correctness", "dropout_ntp"])), "unknown_source")
    samples = _split(samples, pl.col("finish_reason").is_in(list(FINISHED)), counter, "failed_request")
    correctness = samples.filter(pl.col("source") == "correctness")
    dropout = samples.filter(pl.col("source") == "dropout_ntp")

    index_pairs, judged = _correctness_pairs(correctness, config, counter)
    models = correctness.select("_p", c_idx="sample_index", model="model")
    index_pairs = index_pairs.join(models, on=["_p", "c_idx"], how="left")
    pairs = pl.concat([index_pairs, _dropout_pairs(dropout, config, counter)], how="diagonal_relaxed")
    info = samples.group_by("prompt_id").agg(
        pl.col("dataset", "question", "images", "answer").first(), pl.col("model").first().alias("_model")
    )
    pairs = (
        pairs.drop("dataset", strict=False)
        .join(info, on="prompt_id", how="left")
        .with_columns(model=pl.coalesce("model", "_model"))
    )
    pairs = pairs.with_columns(_pair_ids(pairs)).sort(["dataset", "prompt_id", "source", "pair_id"])
    pairs = _with_texts(pairs, correctness)
    pairs = _prompt_column(pairs) if pairs.height else pairs.with_columns(prompt=pl.lit(None, pl.String))
    pairs = pairs.select(PAIRS.names)

    correct, failure = Verdict.CORRECT.value, Verdict.FORMAT_FAILURE.value
    stats = pl.concat(
        [
            judged.group_by("prompt_id", "dataset").agg(
                samples=pl.len(),
                correct=(pl.col("verdict") == correct).sum().cast(pl.Int64),
                format_failures=(pl.col("verdict") == failure).sum().cast(pl.Int64),
            ),
            dropout.group_by("prompt_id", "dataset").agg(
                samples=pl.len(), correct=pl.lit(None, pl.Int64), format_failures=pl.lit(None, pl.Int64)
            ),
        ],
        how="vertical_relaxed",
    ).join(info.drop("_model"), on=["prompt_id", "dataset"], how="left")
    return ChunkResult(pairs, stats, counter)


# ------------------------------------------------------------------ combining chunks


def _merge_counts(parts: list[Counts]) -> Counts:
    merged: Counts = {}
    for part in parts:
        for dataset, reasons in part.items():
            for reason, n in reasons.items():
                _add(merged, dataset, reason, n)
    return merged


def summarize(
    prompt_stats: pl.DataFrame, pair_counts: pl.DataFrame, filtered: Counts
) -> tuple[pl.DataFrame, PairingReport]:
    """Hard prompts and the report, from per-prompt statistics, pair counts per
    (dataset, source) and drop counts (all additive over chunks)."""
    closed = prompt_stats.filter(pl.col("correct").is_not_null())
    hard = closed.filter(pl.col("correct") == 0).sort("prompt_id").select(HARD_PROMPTS.names)
    datasets: dict[str, DatasetPairStats] = {}
    summary = prompt_stats.group_by("dataset").agg(
        prompts=pl.len(),
        samples=pl.col("samples").sum(),
        correct=pl.col("correct").sum(),
        format_failures=pl.col("format_failures").sum(),
        closed=pl.col("correct").is_not_null().sum(),
        all_correct_prompts=(pl.col("correct") == pl.col("samples")).sum(),
        all_wrong_prompts=(pl.col("correct") == 0).sum(),
    )
    for row in summary.sort("dataset").iter_rows(named=True):
        entry = DatasetPairStats(prompts=row["prompts"], samples=row["samples"])
        if row["closed"]:
            entry.accuracy = row["correct"] / row["samples"]
            entry.format_failures = row["format_failures"]
            entry.all_correct_prompts = row["all_correct_prompts"]
            entry.all_wrong_prompts = row["all_wrong_prompts"]
        datasets[row["dataset"]] = entry
    totals = pair_counts.group_by("dataset", "source").agg(pl.col("len").sum()).sort("dataset", "source")
    for dataset, source, n in totals.iter_rows():
        datasets.setdefault(dataset, DatasetPairStats()).pairs[source] = n
    for dataset, reasons in filtered.items():
        datasets.setdefault(dataset, DatasetPairStats()).filtered = dict(sorted(reasons.items()))
    by_source = totals.group_by("source").agg(pl.col("len").sum()).sort("source")
    report = PairingReport(
        datasets=dict(sorted(datasets.items())),
        pairs=int(totals["len"].sum()),
        pairs_by_source=dict(by_source.iter_rows()),
    )
    return hard, report


def _pair_counts(pairs: pl.DataFrame) -> pl.DataFrame:
    return pairs.group_by("dataset", "source").len().with_columns(pl.col("len").cast(pl.Int64))


def make_pairs(samples: pl.DataFrame, config: PairingConfig) -> PairingResult:
    """Pure function: samples table in, pairs + hard prompts + report out."""
    chunk = pair_chunk(samples, config)
    hard, report = summarize(chunk.prompt_stats, _pair_counts(chunk.pairs), chunk.filtered)
    return PairingResult(chunk.pairs, hard, report)


# ------------------------------------------------------------------ the stage


# What pairing reads of a sample shard (the rest, e.g. sampling_config, is lineage only).
PAIRING_COLUMNS = (
    "prompt_id",
    "dataset",
    "images",
    "question",
    "answer",
    "prompt_version",
    "response",
    "finish_reason",
    "sample_index",
    "source",
    "model",
    "chosen",
    "prefix",
)


def _read(files: list[Path], prompt_filter: pl.Expr | None = None) -> pl.DataFrame:
    """Read the pairing columns of sample shards in one polars scan (far leaner than going
    through Arrow), each sample once (``distinct_samples``: a prompt sampled twice into a store
    spans several shards, so ``sample_chunks`` reads all its rows in one group); a nullable
    contract column a shard lacks reads as nulls."""
    schema = pl.from_arrow(SAMPLES.empty_table()).schema  # type: ignore[union-attr]
    if not files:
        return pl.DataFrame(schema=schema).select(PAIRING_COLUMNS)
    scan = pl.scan_parquet(files, schema=schema, missing_columns="insert").select(PAIRING_COLUMNS)
    return distinct_samples((scan.filter(prompt_filter) if prompt_filter is not None else scan).collect())


SamplesDirs = Path | str | list[Path] | list[str]


def sample_chunks(
    samples_dirs: SamplesDirs, chunk_rows: int, prompt_ids: pl.Series | None = None
) -> list[tuple[list[Path], pl.Expr | None]]:
    """Groups of shard files (from one or several sample folders) to pair together, each
    holding whole prompts; only ``prompt_ids`` when given (a sample store outlives a prompt set).

    A prompt whose samples lie in several shards (a refresh, a re-sharded run) is left out
    of the per-file groups and handled in one last group read from every shard."""
    folders = samples_dirs if isinstance(samples_dirs, list) else [samples_dirs]
    missing = [str(folder) for folder in folders if not Path(folder).is_dir()]
    if missing:  # a deleted store must not pass as one with no samples
        raise FileNotFoundError(f"samples folder not found: {', '.join(missing)}")
    files = [f for folder in folders for f in shard_files(folder)]
    if not files:
        raise FileNotFoundError(f"no sample shards (*.parquet) in {', '.join(map(str, folders))}")
    ids = [_prompt_ids(f) for f in files]
    selected = pl.col("prompt_id").is_in(prompt_ids.unique().implode()) if prompt_ids is not None else None
    if selected is not None:
        kept = [(f, frame.filter(selected)) for f, frame in zip(files, ids, strict=True)]
        kept = [(f, frame) for f, frame in kept if frame.height]
        if not kept:
            raise ValueError(f"no samples of the given prompts in {', '.join(map(str, folders))}")
        files, ids = [f for f, _ in kept], [frame for _, frame in kept]
    owners = pl.concat([frame.unique() for frame in ids])
    spanning = owners.group_by("prompt_id").len().filter(pl.col("len") > 1)["prompt_id"]
    keep = ~pl.col("prompt_id").is_in(spanning.implode()) if spanning.len() else None
    if selected is not None:
        keep = selected if keep is None else keep & selected
    groups: list[tuple[list[Path], pl.Expr | None]] = []
    current: list[Path] = []
    rows = 0
    for file, table in zip(files, ids, strict=True):
        current.append(file)
        rows += table.height
        if rows >= chunk_rows:
            groups.append((current, keep))
            current, rows = [], 0
    if current:
        groups.append((current, keep))
    if spanning.len():
        groups.append((files, pl.col("prompt_id").is_in(spanning.implode())))
    return groups


def _prompt_ids(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path, columns=["prompt_id"])
    except (pl.exceptions.PolarsError, OSError) as error:
        raise unreadable(path, "sample shard", error) from None


def _write_pairs(shards: dict[Path, pa.Table]) -> None:
    """Write each table as one pairs shard, letting go of each once it is written."""
    for path in list(shards):
        write_table(shards.pop(path), path, PAIRS)


def run_pairing(
    samples_dir: SamplesDirs,
    out: Path | str,
    config: PairingConfig | None = None,
    prompt_ids: pl.Series | None = None,
) -> PairingReport:
    """``mpo pairs``: read one or several samples directories, write ``out/data/*.parquet`` (the pairs),
    ``out/hard_prompts.parquet`` and ``out/report.json``; return the report. With ``prompt_ids``,
    only those prompts' samples are paired (one data version per prompt set).

    Chunks are paired one after the other and their pairs written as they come, so
    memory holds one chunk, never the whole output."""
    config = config or PairingConfig()
    stats, counts, filtered = [], [], []

    def write_shards(folder: Path) -> None:
        index = 0
        # One writer thread: compressing a chunk's pairs (pyarrow, GIL released) overlaps
        # pairing the next chunk. The next chunk is converted to Arrow (a copy) only once the
        # previous write has ended, so memory holds at most two copies of pairs: the chunk
        # being written beside the one being paired, or one chunk in polars and in Arrow.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            for files, keep in sample_chunks(samples_dir, config.chunk_rows, prompt_ids):
                chunk = pair_chunk(_read(files, keep), config)
                stats.append(chunk.prompt_stats)
                counts.append(_pair_counts(chunk.pairs))
                filtered.append(chunk.filtered)
                if pending is not None:
                    pending.result()
                shards = {
                    folder / f"part-{index + n:05d}.parquet": chunk.pairs.slice(
                        start, config.shard_rows
                    ).to_arrow()
                    for n, start in enumerate(range(0, chunk.pairs.height, config.shard_rows))
                }
                index += len(shards)
                pending = writer.submit(_write_pairs, shards)
                del chunk, shards  # the writer holds the only copy (Arrow), freed shard by shard once written
            if pending is not None:
                pending.result()
        if index == 0:  # an empty but valid pairs table
            write_table(PAIRS.empty_table(), folder / "part-00000.parquet")

    out = Path(out)
    publish_dir(out / "data", write_shards)
    hard, report = summarize(
        pl.concat(stats, how="vertical_relaxed"), pl.concat(counts), _merge_counts(filtered)
    )
    write_table(hard.to_arrow(), out / "hard_prompts.parquet", HARD_PROMPTS)
    report.config = config.model_dump(mode="json")
    atomic_write_text(out / "report.json", report.model_dump_json(indent=2) + "\n")
    return report
