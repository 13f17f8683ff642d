"""The ``mpo`` command line: one sub-command per pipeline stage, plus the demo."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from mpo.step import Step

# Nothing in this project may reach a model hub; fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The commands draw their own progress (rich); transformers' bars for every checkpoint saved
# and every model loaded (41 in one demo, child processes included) buried the report.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    help="MPO data engine: preference data and MPO training for VLMs.",
)
console = Console()
ConfigT = TypeVar("ConfigT", bound="BaseModel")
CONFIG_OPTION = typer.Option(
    help="YAML of the stage's config fields; the options below and --set override it"
)
SET_OPTION = typer.Option("--set", help="FIELD=VALUE of the stage's config, value read as YAML; repeatable")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (images/, annotations/, meta.json)")],
    count: Annotated[int, typer.Option(help="Prompts per synthetic dataset (train + held-out)")] = 100,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes identical files")] = 0,
    heldout_fraction: Annotated[float, typer.Option(help="Share of each dataset kept for evaluation")] = 0.2,
) -> None:
    """Draw a deterministic synthetic VQA dataset in InternVL's annotation format."""
    from mpo.synth import generate

    summary = generate(out, count=count, seed=seed, heldout_fraction=heldout_fraction)
    table = Table(title=f"synthetic data in {out}")
    table.add_column("dataset")
    for split in summary:
        table.add_column(split, justify="right")
    for dataset in summary["train"]:
        table.add_row(dataset, *(str(summary[split][dataset]) for split in summary))
    console.print(table)


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Argument(help="Output folder for the HF checkpoint")],
    warmup_steps: Annotated[
        int | None, typer.Option(help="Supervised warm-up steps on synthetic data (none: random weights)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for tokenizer corpus, init and warm-up")] = 0,
    data: Annotated[
        Path | None, typer.Option(help="`mpo synth` output for the warm-up; generated if omitted")
    ] = None,
    warmup_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the warm-up (cosine to 0)")
    ] = None,
    warmup_vision_lr_scale: Annotated[
        float | None,
        typer.Option(help="Learning-rate multiplier of the vision tower and projector during the warm-up"),
    ] = None,
    warmup_prior_bias: Annotated[
        float | None,
        typer.Option(
            help="Share of closed warm-up examples whose final answer is the dataset's most common one"
        ),
    ] = None,
    warmup_prior_in_reasoning: Annotated[
        bool | None,
        typer.Option(
            help="Those examples state the common answer in their steps too, not only in the last line"
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Input resolution of the vision tower (patch 14; 224 -> 64 image tokens, 112 -> 16)"
        ),
    ] = None,
) -> None:
    """Build the tiny offline InternVL model (tokenizer, processor, weights). Unset options keep
    ``mpo.tiny_model.WarmupRecipe``'s and ``TinyModelSpec``'s defaults."""
    from mpo.tiny_model import TinyModelSpec, WarmupRecipe

    given: dict[str, Any] = {
        "steps": warmup_steps,
        "lr": warmup_lr,
        "vision_lr_scale": warmup_vision_lr_scale,
        "prior_bias": warmup_prior_bias,
        "prior_in_reasoning": warmup_prior_in_reasoning,
    }
    recipe = WarmupRecipe(**{name: value for name, value in given.items() if value is not None})
    spec = TinyModelSpec() if image_size is None else TinyModelSpec(image_size)
    summary = _build_tiny_model(out, seed, data, recipe, spec)
    console.print(
        f"[green]tiny model[/green] written to {out}: {summary['parameters']:,} parameters, "
        f"vocab {summary['vocab_size']}, {summary['image_seq_length']} image tokens per image"
    )
    if recipe.steps:
        console.print(
            f"warm-up: {recipe.steps} steps, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
        )


def _build_tiny_model(out: Path, seed: int, data: Path | None, recipe: Any, spec: Any) -> dict:
    from mpo.synth import generate
    from mpo.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        if recipe.steps and data is None:
            data = Path(scratch) / "synth"
            generate(data, count=200, seed=seed + 1)
        with Progress(
            TextColumn("warm-up"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
            disable=not recipe.steps,
        ) as progress:
            task = progress.add_task("warm-up", total=recipe.steps, loss=float("nan"))
            return build_tiny_model(
                out,
                seed=seed,
                synth_dir=data,
                spec=spec,
                recipe=recipe,
                on_step=lambda step, loss: progress.update(task, completed=step + 1, loss=loss),
            )


@app.command()
def ingest(
    source: Annotated[
        Path,
        typer.Argument(
            help="InternVL meta.json, a .jsonl / .json / .parquet prompt file, or a folder of them"
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder: prompts/, quarantine.parquet, report.json, images/")
    ],
    strict: Annotated[
        bool, typer.Option(help="Stop at the first bad row, naming file, line and field")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for repeat_time < 1 subsampling")] = 0,
    columns: Annotated[
        list[str] | None,
        typer.Option(
            help="FIELD=COLUMN: read FIELD (question, answer, chosen, image, conversations, choices) from "
            "COLUMN, for every dataset; repeatable"
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder the image paths start from (default: the prompt file's folder)"),
    ] = None,
    reply_as: Annotated[
        str | None,
        typer.Option(
            help="chosen | answer: a conversation's reply is a good response (default) or a gold answer"
        ),
    ] = None,
) -> None:
    """Normalise prompts into the prompts table; quarantine what cannot be used."""
    from mpo import jobs
    from mpo.progress import StepLines

    if reply_as not in (None, "chosen", "answer"):
        raise typer.BadParameter(f"--reply-as is chosen or answer, not {reply_as!r}")
    mapping = _key_values(columns, "--columns", "FIELD=COLUMN") or None
    step = _job_step(jobs.ingest_job, "ingest", "ingest", {**locals(), "columns": mapping})
    with StepLines(console):
        result = step.run(lambda _event: None)
    table = Table(title=f"ingested into {out}")
    table.add_column("dataset")
    table.add_column("prompts", justify="right")
    for dataset, n in sorted(result.prompts_by_dataset.items()):
        table.add_row(dataset, str(n))
    console.print(table)
    quarantined = ", ".join(f"{reason} {n}" for reason, n in sorted(result.drops.items())) or "none"
    console.print(f"quarantined: {quarantined}")


def _key_values(items: list[str] | None, option: str, form: str) -> dict[str, str]:
    """``KEY=VALUE`` option values as a dict (split at the first ``=``: a regex may hold more); ``form``
    names the expected shape in the error, e.g. ``DATASET=REGEX``."""
    mapping = {}
    for item in items or []:
        key, sep, rest = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} takes {form}, got {item!r}")
        mapping[key] = rest
    return mapping


def _yaml_value(text: str) -> Any:
    """An option value as YAML reads it: 6 -> int, true -> bool, {a: 1} -> dict, float32 -> str."""
    import yaml

    return yaml.safe_load(text) if text else text


@app.command()
def pairs(
    samples_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="samples", help="Samples directories (Parquet shards), e.g. both stages'"),
    ],
    out: Annotated[
        Path, typer.Option(help="Pairs directory: data/*.parquet, hard_prompts.parquet, report.json")
    ],
    prompts_dir: Annotated[
        Path | None,
        typer.Option("--prompts", help="Pair only these prompts' samples (an `mpo ingest` prompts folder)"),
    ] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    set_: Annotated[list[str] | None, SET_OPTION] = None,
    pairs_per_prompt: Annotated[int | None, typer.Option(help="Cap on pairs per prompt and source")] = None,
    selection: Annotated[
        str | None,
        typer.Option(
            help="Pairs kept under the cap: random (seeded draw) or closest "
            "(chosen and rejected sharing the longest prefix first)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the pair draw")] = None,
    verify: Annotated[
        list[str] | None, typer.Option(help="DATASET=MODE (auto|exact|choice|numeric|anls); repeatable")
    ] = None,
    default_verify: Annotated[
        str | None,
        typer.Option(
            help="Verifier for datasets not named by --verify (auto: from the shape of each gold answer)"
        ),
    ] = None,
    max_repetition: Annotated[
        float | None, typer.Option(help="Drop responses with a larger share of repeated 4-grams")
    ] = None,
    max_length_ratio: Annotated[
        float | None, typer.Option(help="Drop pairs with len(chosen)/len(rejected) above this")
    ] = None,
    claim: Annotated[
        list[str] | None,
        typer.Option(
            help="DATASET=REGEX with one capture group: the answer a response's steps state; a response whose stated "
            "answer fails the verifier against its own final answer is paired on neither side; repeatable"
        ),
    ] = None,
) -> None:
    """Turn samples into preference pairs (correctness, format, DropoutNTP). Unset options keep
    ``mpo.pairs.PairingConfig``'s defaults."""
    from mpo import jobs
    from mpo.pairs import PairingConfig
    from mpo.progress import StepLines

    given = {
        **_fields_of(PairingConfig, locals()),
        "verify_modes": _key_values(verify, "--verify", "DATASET=MODE") if verify else None,
        "default_verify_mode": default_verify,
        "claim_patterns": _key_values(claim, "--claim", "DATASET=REGEX") if claim else None,
    }
    pairing = _stage_config(PairingConfig, config, given, set_, "the pairing options")
    step = _job_step(jobs.pairs_job, "pairs", "pairs", locals())
    with StepLines(console):
        result = step.run(lambda _event: None)
    table = Table(title=f"{result.counts['pairs']} pairs in {out}")
    for column in ("dataset", "prompts", "samples", "accuracy", "pairs", "filtered"):
        table.add_column(column)
    for dataset, stats in result.datasets.items():
        table.add_row(
            dataset,
            str(stats.prompts),
            str(stats.samples),
            "-" if stats.accuracy is None else f"{stats.accuracy:.1%}",
            ", ".join(f"{k} {v}" for k, v in stats.pairs.items()),
            ", ".join(f"{k} {v}" for k, v in stats.filtered.items()),
        )
    console.print(table)


@app.command()
def sample(
    prompts: Annotated[Path, typer.Option(help="`mpo ingest` output folder (or its prompts/ table)")],
    model: Annotated[str, typer.Option(help="Model folder (or hub id where a hub is reachable)")],
    out: Annotated[Path, typer.Option(help="Samples root: one <stage>-<config hash>/ folder per stage")],
    engine: Annotated[str, typer.Option(help="transformers | vllm | lmdeploy")] = "transformers",
    stage: Annotated[str, typer.Option(help="correctness | dropout_ntp | both")] = "both",
    n: Annotated[int | None, typer.Option(help="Samples per closed prompt (SamplingConfig.n)")] = None,
    temperature: Annotated[float | None, typer.Option(help="SamplingConfig.temperature")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per response (SamplingConfig.max_tokens)")
    ] = None,
    prompts_per_shard: Annotated[
        int | None, typer.Option(help="Prompts per shard, the unit of resume")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="SamplingConfig.seed")] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="FIELD=VALUE of SamplingConfig (e.g. top_p=0.9, "
            "dropout_variants=[sr0.5_with_image]); repeatable",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Needed by original (non -hf) InternVL checkpoints")
    ] = False,
    engine_option: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE passed to the engine, value read as YAML (e.g. max_dynamic_patch=6, dtype=float32, "
            "max_model_len=4096, or any vllm.LLM / lmdeploy backend-config argument); repeatable"
        ),
    ] = None,
    partition: Annotated[
        str,
        typer.Option(help="I/N: sample only part I of N of the prompts (one per GPU: 1/8 ... 8/8)"),
    ] = "1/1",
) -> None:
    """Sample CoT responses (correctness) and DropoutNTP continuations; resumes finished shards. Unset
    options keep ``mpo.sampling.SamplingConfig``'s defaults."""
    from mpo import jobs
    from mpo.progress import StepLines
    from mpo.sampling import STAGES, SamplingConfig

    stages = STAGES if stage == "both" else (stage,)
    if any(s not in STAGES for s in stages):
        raise typer.BadParameter(f"--stage must be one of {', '.join(STAGES)} or both")
    given = _fields_of(SamplingConfig, locals())
    sampling = _stage_config(SamplingConfig, config, given, set_, "the sampling options")
    prompts_dir = prompts / "prompts" if (prompts / "prompts").is_dir() else prompts
    engine_options = {
        k: _yaml_value(v) for k, v in _key_values(engine_option, "--engine-option", "KEY=VALUE").items()
    }
    engine_options.update({"trust_remote_code": True} if trust_remote_code else {})
    options = {**locals(), "partition": _partition(partition)}
    with StepLines(console):
        results = [
            # vLLM and lmdeploy hold their engine for the life of a process: one process per stage
            _job_step(
                jobs.sample_job,
                f"sample-{name}",
                "sampling",
                {**options, "stage": name},
                own_process=engine != "transformers",
            ).run(lambda _event: None)
            for name in stages
        ]
    for result in results:
        console.print(
            f"{result.stage}: {result.counts['shards']} shards ({result.counts['skipped_shards']} already done), "
            f"{result.counts['samples_written']} samples written to {result.out_dir}"
        )


@app.command()
def export(
    pairs_dir: Annotated[Path, typer.Argument(help="Pairs directory written by `mpo pairs`")],
    out: Annotated[Path, typer.Option(help="Output folder")],
    format: Annotated[str, typer.Option(help="Target format")] = "internvl",
) -> None:
    """Export pairs for another trainer (InternVL's MPO JSONL + meta.json)."""
    from mpo.export import FORMATS, export_internvl

    if format not in FORMATS:
        raise typer.BadParameter(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    counts = export_internvl(pairs_dir, out)
    console.print(f"exported {sum(counts.values())} pairs ({len(counts)} datasets) to {out / 'meta.json'}")


@app.command("ref-logps")
def ref_logps(
    pairs_dir: Annotated[
        Path, typer.Option("--pairs", help="Pairs directory (`mpo pairs` output); its shards are rewritten")
    ],
    model: Annotated[Path, typer.Option(help="Reference model folder (usually the starting policy)")],
    max_length: Annotated[int, typer.Option(help="Must equal the trainer's --max-length")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when present)")] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16", help="bf16 autocast, as the trainer's --bf16 (default: on with CUDA)"
        ),
    ] = None,
) -> None:
    """Write the frozen reference's log-probs into the pairs (ref_chosen_logp, ref_rejected_logp),
    computed as training computes (float32 weights, the same autocast)."""
    from mpo import jobs
    from mpo.progress import StepLines

    step = _job_step(jobs.reference_job, "reference", "ref_logps", locals())
    with StepLines(console):
        result = step.run(lambda _event: None)
    counts = result.counts
    console.print(
        f"reference log-probs: {counts['pairs_computed'] + counts['pairs_from_store']} pairs in {counts['shards']} "
        f"shards written, {counts['skipped_shards']} shards already done, {result.drops.get('too_long', 0)} pairs "
        f"too long for max_length {max_length}"
    )


@app.command()
def train(
    pairs_dir: Annotated[
        Path,
        typer.Option("--pairs", help="Pairs directory (with reference log-probs unless --reference online)"),
    ],
    model: Annotated[Path, typer.Option(help="Starting model folder (HF format)")],
    out: Annotated[
        Path, typer.Option(help="Run folder: checkpoints/, final/, metrics.jsonl; re-running resumes")
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML with TrainConfig fields; options below override it")
    ] = None,
    eval_pairs: Annotated[Path | None, typer.Option(help="Held-out pairs for reward accuracy")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Peak learning rate")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: one epoch)")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per micro-batch per process")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per sequence")] = None,
    beta: Annotated[float | None, typer.Option(help="β of DPO and BCO")] = None,
    reference: Annotated[str | None, typer.Option(help="precomputed | online")] = None,
    lora_r: Annotated[
        int | None, typer.Option(help="Train a LoRA adapter of this rank instead of all weights")
    ] = None,
    freeze_vision: Annotated[bool | None, typer.Option("--freeze-vision/--train-vision")] = None,
    freeze_projector: Annotated[bool | None, typer.Option("--freeze-projector/--train-projector")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop (with a checkpoint) after N steps; re-run to go on")
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on with CUDA)")
    ] = None,
    keep_dropout: Annotated[
        bool, typer.Option(help="Keep the model's dropout (default: all dropout off, as TRL)")
    ] = False,
    allow_other_reference: Annotated[
        bool, typer.Option(help="Accept precomputed reference log-probs of another model than --model")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="SECTION.FIELD=VALUE of TrainConfig on top of "
            "--config and the options (e.g. loss.beta=0.2); "
            "repeatable",
        ),
    ] = None,
) -> None:
    """Train with MPO (0.8·DPO + 0.2·BCO + 1.0·SFT). Works under `torchrun` (DDP). Unset options keep
    ``mpo.train.TrainConfig``'s defaults."""
    from mpo import jobs
    from mpo.progress import StepLines
    from mpo.train import TrainConfig

    given = {
        **_fields_of(TrainConfig, locals()),
        "disable_dropout": False if keep_dropout else None,
        "allow_other_reference": True if allow_other_reference else None,
    }
    nested = [f"loss.beta={beta}"] if beta is not None else []
    nested += [f"lora.r={lora_r}", f"lora.alpha={2 * lora_r}"] if lora_r is not None else []
    training = _stage_config(TrainConfig, config, given, nested + (set_ or []), "the training options")
    step = _job_step(jobs.train_job, "mpo", "train", locals())
    if os.environ.get("RANK", "0") != "0":  # another rank of torchrun: rank 0 shows and tells
        step.run(lambda _event: None)
        return
    with StepLines(console):
        result = step.run(lambda _event: None)
    console.print(
        f"trained {result.counts['steps']} steps (resumed at {result.resumed_from}); metrics in "
        f"{result.metrics_file}"
        + (f"; model in {result.final_model}" if Path(result.final_model).exists() else "")
    )
    if result.evaluation:
        console.print("held-out pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in result.evaluation.items()))


@contextmanager
def _config_errors(source: str) -> Iterator[None]:
    """A config that does not validate: every wrong field by its dotted path, as a usage error
    (exit 2), not a traceback."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as error:
        fields = [
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        ]
        raise typer.BadParameter(f"{source}: " + "; ".join(fields)) from None


def _load_yaml(path: Path) -> dict:
    import yaml

    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of config fields")
    return loaded


def _partition(text: str) -> tuple[int, int]:
    """``--partition I/N`` (1-based, as a person counts GPUs) as the (index, count) the jobs take."""
    part, _, count = text.partition("/")
    if not (part.isdigit() and count.isdigit() and 1 <= int(part) <= int(count)):
        raise typer.BadParameter(f"--partition must be I/N with 1 <= I <= N, got {text!r}")
    return int(part) - 1, int(count)


def _job_step(
    job: Callable[..., Any], label: str, stage: str, options: dict[str, Any], **fields: Any
) -> Step:
    """The ``mpo.jobs`` step a command runs: its arguments are the command's options (``locals()``,
    with what the command computed) named after the job's parameters, paths as strings, so that a
    job's parameters are listed once, in its signature."""
    import inspect

    from mpo.step import Step

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        return [plain(v) for v in value] if isinstance(value, list) else value

    wanted = inspect.signature(job).parameters.keys() - {"emit"}
    kwargs = {name: plain(value) for name, value in options.items() if name in wanted}
    return Step.of(job, label, stage, kwargs=kwargs, **fields)


def _fields_of(model: type[BaseModel], options: dict[str, Any]) -> dict[str, Any]:
    """The command's options named after a field of the stage's config model (None: not given), so
    that an option is declared once, in the signature."""
    return {name: value for name, value in options.items() if name in model.model_fields}


def _stage_config(
    model: type[ConfigT], config: Path | None, given: dict[str, Any], sets: list[str] | None, source: str
) -> ConfigT:
    """A stage's config from the YAML file, then the options given (None: not given), then ``--set``,
    validated once: its defaults live in the config model alone."""
    from mpo.config import set_fields

    base = _load_yaml(config) if config else {}
    base.update({name: value for name, value in given.items() if value is not None})
    with _config_errors(str(config) if config else source):
        return model.model_validate(set_fields(base, _assignments(sets)))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config YAML (mpo.config.PipelineConfig fields)")],
    runner: Annotated[
        str,
        typer.Option(
            help="prefect: the flow `mpo-data-engine`, embedded (retries, caching, "
            "artifacts); local: stage after stage in this process, no orchestrator"
        ),
    ] = "prefect",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="SECTION.FIELD=VALUE on top of the YAML, value read "
            "as YAML (e.g. training.max_steps=50); repeatable",
        ),
    ] = None,
) -> None:
    """Run the whole DAG on one config.

    With the Prefect runner, set PREFECT_API_URL to a running server (`prefect server start`)
    to watch the run in the UI.
    """
    from rich.markdown import Markdown

    from mpo.preflight import check_run

    entry = _runner(runner)
    with _config_errors(str(config)):
        settings = entry.config_type.from_yaml(config, _assignments(set_))
    check_run(settings, str(config))
    from mpo.progress import StepLines

    with StepLines(console):
        summary = entry.run(settings)
    console.print(Markdown(summary.render()))


def _runner(name: str) -> Any:
    """The runner named by ``--runner`` (``mpo.pipeline.find_runner``: local, or an entry point)."""
    from mpo.pipeline import find_runner

    # The ephemeral API takes 20-32 s to start on 2 cores; Prefect's default timeout is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return find_runner(name)
    except LookupError as error:
        raise typer.BadParameter(f"--runner: {error}") from None
    except ModuleNotFoundError as error:
        raise typer.BadParameter(
            f"the {name} runner needs its orchestrator ({error}): pip install "
            "'mpo-data-engine[prefect]', or use --runner local"
        ) from None


@app.command()
def view(
    pairs_dir: Annotated[Path, typer.Argument(help="A pairs version (holds data/ and hard_prompts.parquet)")],
    out: Annotated[Path | None, typer.Option(help="The HTML file (default: PAIRS_DIR/pairs.html)")] = None,
    per_source: Annotated[int, typer.Option(help="Pairs per dataset and source")] = 6,
    dataset: Annotated[str | None, typer.Option(help="Only this dataset")] = None,
    source: Annotated[
        str | None, typer.Option(help="Only this source: correctness, dropout_ntp, hard")
    ] = None,
    seed: Annotated[int, typer.Option(help="Which pairs are drawn; the same seed writes the same file")] = 0,
) -> None:
    """Write a gallery of preference pairs with their images: one self-contained HTML file to open in
    a browser (mpo.gallery)."""
    from mpo.errors import InputError
    from mpo.gallery import GallerySpec, write_gallery

    if not (pairs_dir / "data").is_dir():
        raise InputError(f"{pairs_dir}: not a pairs version (no data/ folder)")
    spec = GallerySpec(per_source=per_source, dataset=dataset, source=source, seed=seed)
    written = write_gallery(pairs_dir, out or pairs_dir / "pairs.html", spec)
    console.print(f"gallery: {written} ({written.stat().st_size / 1e6:.1f} MB)")


@app.command()
def report(
    workdir: Annotated[Path, typer.Argument(help="Work folder of a finished run (holds summary.json)")],
) -> None:
    """Draw a finished run's charts again (training curves, held-out accuracy, pairs and drops) into
    WORKDIR/plots/, and print its summary."""
    from rich.markdown import Markdown

    from mpo.report import write_plots
    from mpo.results import RunSummary

    try:
        written = write_plots(workdir)
    except (FileNotFoundError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(Markdown(RunSummary.read(workdir / "summary.json").render()))
    console.print(f"{len(written)} charts written to {workdir / 'plots'}")


# `mpo demo`'s options, kept from before the demo became configs/demo.yaml: each sets one field.
# The demo's earlier options, each one field of configs/demo.yaml: `--sample-n 8` is `--set
# pipeline.sampling.n=8`. One table; the command reads them from its extra arguments.
DEMO_OPTIONS = {
    "--workdir": "workdir",
    "--datasets": "data.datasets",
    "--count": "data.count",
    "--heldout-fraction": "data.heldout_fraction",
    "--warmup-steps": "tiny_model.warmup.steps",
    "--warmup-count": "tiny_model.warmup_count",
    "--warmup-lr": "tiny_model.warmup.lr",
    "--warmup-vision-lr-scale": "tiny_model.warmup.vision_lr_scale",
    "--warmup-prior-bias": "tiny_model.warmup.prior_bias",
    "--image-size": "tiny_model.image_size",
    "--sample-n": "pipeline.sampling.n",
    "--temperature": "pipeline.sampling.temperature",
    "--pairs-per-prompt": "pipeline.pairing.pairs_per_prompt",
    "--pair-selection": "pipeline.pairing.selection",
    "--train-steps": "pipeline.training.max_steps",
    "--lr": "pipeline.training.learning_rate",
    "--max-grad-norm": "pipeline.training.max_grad_norm",
    "--seed": "seed",
}
# Switches: the field and the value each sets.
DEMO_SWITCHES = {
    "--warmup-prior-in-reasoning": ("tiny_model.warmup.prior_in_reasoning", True),
    "--no-warmup-prior-in-reasoning": ("tiny_model.warmup.prior_in_reasoning", False),
    "--no-claim-check": ("pipeline.pairing.claim_patterns", {}),
}


def demo_options(args: list[str]) -> dict[str, Any]:
    """The earlier demo options among ``args`` (``--name value``, ``--name=value`` or a switch) as
    dotted assignments; anything else is a usage error naming it."""
    assignments: dict[str, Any] = {}
    rest = list(args)
    while rest:
        flag, _, inline = rest.pop(0).partition("=")
        if flag in DEMO_SWITCHES and not inline:
            field, value = DEMO_SWITCHES[flag]
            assignments[field] = value
            continue
        if flag not in DEMO_OPTIONS:
            raise typer.BadParameter(f"no such option: {flag} (see mpo demo --help)")
        if not inline and not rest:
            raise typer.BadParameter(f"{flag} needs a value")
        text = inline or rest.pop(0)
        field = DEMO_OPTIONS[flag]
        assignments[field] = (
            [d.strip() for d in text.split(",") if d.strip()] if flag == "--datasets" else _yaml_value(text)
        )
    return assignments


def _assignments(sets: list[str] | None) -> dict[str, Any]:
    """``--set section.field=value`` options (values read as YAML) as dotted assignments."""
    return {
        key: _yaml_value(value) for key, value in _key_values(sets, "--set", "SECTION.FIELD=VALUE").items()
    }


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Earlier options, each one field of the config: "
    + ", ".join(f"{flag} ({field})" for flag, field in DEMO_OPTIONS.items())
    + "; switches: "
    + ", ".join(f"{flag} ({field}={value})" for flag, (field, value) in DEMO_SWITCHES.items())
    + ".",
)
def demo(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option(help="Demo config (default: the repository's configs/demo.yaml)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="SECTION.FIELD=VALUE on top of the config, value read "
            "as YAML (e.g. pipeline.training.max_steps=50); repeatable",
        ),
    ] = None,
    runner: Annotated[str, typer.Option(help="prefect or local (see `mpo run`)")] = "prefect",
) -> None:
    """The main job: synthetic data -> tiny model with a warm-up -> the whole DAG.

    `configs/demo.yaml` says what it runs (`--set` changes one field). Prints held-out accuracy
    of the starting model, the MPO model and an SFT-only baseline trained on the same chosen
    responses, with their paired differences, the pairs made and time per stage. A re-run
    reuses the data, the model and every finished stage.
    """
    from rich.markdown import Markdown

    from mpo.demo import DEFAULT_CONFIG, DemoConfig, prepare

    assignments = demo_options(ctx.args)
    with _config_errors(str(config or DEFAULT_CONFIG)):
        settings = DemoConfig.load(config or DEFAULT_CONFIG, {**assignments, **_assignments(set_)})

    from mpo.progress import StepLines, step

    started = time.perf_counter()
    warmup = settings.tiny_model.warmup
    with StepLines(console):
        with step("data + tiny model") as line:

            def warming(done: int, loss: float) -> None:
                line(
                    {
                        "progress": 100.0 * (done + 1) / max(1, warmup.steps),
                        "status": f"warm-up loss {loss:.3f}",
                    }
                )

            pipeline, model = prepare(settings, on_step=warming)
        console.print(
            f"[bold]tiny model[/bold] in {pipeline.model}: {model['parameters']:,} parameters, warm-up "
            f"{warmup.steps} steps, loss {model['first_loss'] or float('nan'):.3f} -> "
            f"{model['last_loss'] or float('nan'):.3f} ({time.perf_counter() - started:.0f} s with the data)"
        )
        from mpo.preflight import check_run

        check_run(pipeline, str(config or DEFAULT_CONFIG))
        summary = _runner(runner).run(pipeline)
    console.print(Markdown(summary.render()))
    console.print(f"total {time.perf_counter() - started:.0f} s")


def main() -> None:
    """The ``mpo`` command: bad input (``mpo.errors.InputError``) is one line on stderr and exit 2;
    ``--debug`` (or ``MPO_DEBUG=1``) shows its traceback too. Other errors are bugs: tracebacks."""
    import sys

    from mpo.errors import InputError

    debug = "--debug" in sys.argv[1:] or os.environ.get("MPO_DEBUG", "") not in ("", "0")
    sys.argv = [sys.argv[0], *(arg for arg in sys.argv[1:] if arg != "--debug")]
    try:
        app()
    except InputError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
