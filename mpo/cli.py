"""The ``mpo`` command line: one sub-command per pipeline stage, plus the demo."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Nothing in this project may reach a model hub; fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MPO data engine: preference data and MPO training for VLMs.")
console = Console()


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
    warmup_steps: Annotated[int, typer.Option(help="Supervised warm-up steps on synthetic data (0: random weights)")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for tokenizer corpus, init and warm-up")] = 0,
    data: Annotated[Path | None, typer.Option(help="`mpo synth` output for the warm-up; generated if omitted")] = None,
) -> None:
    """Build the tiny offline InternVL model (tokenizer, processor, weights)."""
    summary = _build_tiny_model(out, warmup_steps, seed, data)
    console.print(f"[green]tiny model[/green] written to {out}: {summary['parameters']:,} parameters, "
                  f"vocab {summary['vocab_size']}, {summary['image_seq_length']} image tokens per image")
    if warmup_steps:
        console.print(f"warm-up: {warmup_steps} steps, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")


def _build_tiny_model(out: Path, warmup_steps: int, seed: int, data: Path | None) -> dict:
    from mpo.synth import generate
    from mpo.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        if warmup_steps and data is None:
            data = Path(scratch) / "synth"
            generate(data, count=200, seed=seed + 1)
        with Progress(TextColumn("warm-up"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console,
                      disable=not warmup_steps) as progress:
            task = progress.add_task("warm-up", total=warmup_steps, loss=float("nan"))
            return build_tiny_model(out, seed=seed, warmup_steps=warmup_steps, synth_dir=data,
                                    on_step=lambda step, loss: progress.update(task, completed=step + 1, loss=loss))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes data, model and outputs")] = Path("demo-run"),
    count: Annotated[int, typer.Option(help="Prompts per synthetic dataset")] = 60,
    warmup_steps: Annotated[int, typer.Option(help="Warm-up steps of the tiny model")] = 300,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The main job, end to end on the tiny offline model."""
    from mpo.synth import generate

    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = workdir / "data"
    summary = generate(data, count=count, seed=seed)
    timings["synthetic data"] = time.perf_counter() - start
    console.print(f"[bold]1. synthetic data[/bold] in {data}: "
                  + ", ".join(f"{split} {sum(counts.values())} prompts" for split, counts in summary.items()))

    start = time.perf_counter()
    model_dir = workdir / "model-start"
    model = _build_tiny_model(model_dir, warmup_steps, seed, data)
    timings["tiny model + warm-up"] = time.perf_counter() - start
    console.print(f"[bold]2. tiny model[/bold] in {model_dir}: {model['parameters']:,} parameters, "
                  f"warm-up {warmup_steps} steps, loss {model['first_loss'] or float('nan'):.3f} -> "
                  f"{model['last_loss'] or float('nan'):.3f}")

    table = Table(title="time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.1f}")
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
