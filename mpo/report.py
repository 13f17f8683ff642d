"""Charts of a finished run, from its ``summary.json`` and the trainings' ``metrics.jsonl``.

Three PNGs in ``WORKDIR/plots/``, for what people would rather look at than read:

- ``training_curves.png``: loss terms, reward margin, reward accuracy and the BCO shift δ
  per step, MPO against the SFT baseline;
- ``heldout_accuracy.png``: greedy held-out accuracy per dataset for every model scored,
  with binomial standard errors;
- ``pairs.png``: pairs per dataset and source, and the samples dropped by reason.

Every runner writes them at the end of a run; ``mpo report WORKDIR`` writes them again for
any finished run. matplotlib draws off-screen (Agg), so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mpo.results import DatasetAccuracy, PairsResult, RunSummary

PLOTS = ("training_curves.png", "heldout_accuracy.png", "pairs.png")
MODEL_COLOURS = {"start": "#9e9e9e", "mpo": "#1f77b4", "sft": "#ff7f0e"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out: Path) -> Path:
    """Write the PNG atomically (a temp file renamed over it), then free the figure."""
    temp = out.with_name(f".{out.name}.tmp")
    figure.savefig(temp, dpi=110, format="png")
    temp.replace(out)
    _pyplot().close(figure)
    return out


def training_steps(metrics_file: Path | str) -> list[dict[str, Any]]:
    """The training steps of one ``metrics.jsonl`` (its evaluation lines left out)."""
    from mpo.train import read_metrics

    return [r for r in read_metrics(metrics_file) if r.get("split") != "eval"]


def training_records(summary: RunSummary) -> dict[str, list[dict[str, Any]]]:
    """Per trained model (mpo, sft), its training steps."""
    return {
        name: training_steps(training.metrics_file)
        for name, training in summary.trainings.items()
        if Path(training.metrics_file).is_file()
    }


def smoothed(values: list[float]) -> list[float]:
    """A trailing mean over about 2% of the run (a per-step curve of hundreds of steps is mostly noise)."""
    window = max(1, len(values) // 50)
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


def plot_training(runs: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    # The SFT baseline's DPO and BCO terms are computed but weigh nothing: only its SFT term is drawn.
    panels: tuple[tuple[str, dict[str, tuple[str, ...]]], ...] = (
        ("loss terms", {"mpo": ("dpo", "bco", "sft"), "sft": ("sft",)}),
        ("reward margin", {"mpo": ("reward_margin",), "sft": ("reward_margin",)}),
        ("reward accuracy", {"mpo": ("reward_accuracy",), "sft": ("reward_accuracy",)}),
        ("BCO reward shift δ", {"mpo": ("delta",), "sft": ("delta",)}),
    )
    for axis, (title, keys) in zip(axes.flat, panels, strict=True):
        for name, records in runs.items():
            steps = [r["step"] for r in records]
            for key in keys.get(name, ()):
                values = smoothed([float(r.get(key, math.nan)) for r in records])
                single = len(keys.get("mpo", ())) == 1
                axis.plot(
                    steps,
                    values,
                    label=name if single else f"{name} {key}",
                    linewidth=1.2,
                    linestyle="-" if name == "mpo" else "--",
                    color=MODEL_COLOURS.get(name) if single else None,
                )
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(
        "Training: MPO (solid) and the SFT baseline (dashed), trailing means over 2% of the steps"
    )
    return _save(figure, out)


def plot_accuracy(evaluation: dict[str, dict[str, DatasetAccuracy]], out: Path) -> Path:
    plt = _pyplot()
    names = list(evaluation)
    datasets = sorted({d for table in evaluation.values() for d in table})
    width = 0.8 / max(1, len(names))
    figure, axis = plt.subplots(figsize=(max(6, 1.8 * len(datasets) + 2), 4.5), constrained_layout=True)
    for index, name in enumerate(names):
        rows = [evaluation[name].get(d) for d in datasets]
        values = [100 * r.accuracy if r else 0.0 for r in rows]
        errors = [100 * r.standard_error if r else 0.0 for r in rows]
        positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(datasets))]
        axis.bar(positions, values, width, yerr=errors, capsize=3, label=name, color=MODEL_COLOURS.get(name))
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set_ylabel("greedy accuracy (%) ± standard error")
    axis.set_ylim(0, 100)
    axis.set_title("Held-out accuracy per dataset")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    return _save(figure, out)


def pairs_per_source(pairs: PairsResult) -> dict[str, dict[str, int]]:
    """Pairs per dataset and source, every source that made a pair in any dataset present (0 where
    none), so a chart's stacks and a table's columns line up and a new source is never left out."""
    sources = sorted({s for stats in pairs.datasets.values() for s in stats.pairs})
    return {
        dataset: {source: stats.pairs.get(source, 0) for source in sources}
        for dataset, stats in pairs.datasets.items()
    }


def plot_pairs(pairs: PairsResult, out: Path) -> Path:
    plt = _pyplot()
    per_dataset = pairs_per_source(pairs)
    datasets = list(per_dataset)
    sources = list(next(iter(per_dataset.values()), {}))
    drops = pairs.drops
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    bottom = [0] * len(datasets)
    for source in sources:
        counts = [per_dataset[d][source] for d in datasets]
        left.bar(datasets, counts, bottom=bottom, label=source)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    left.set_title(f"{pairs.counts.get('pairs', 0)} pairs, per dataset and source")
    left.tick_params(axis="x", labelrotation=20)
    left.legend()
    reasons = sorted(drops, key=drops.__getitem__)
    right.barh(reasons, [drops[r] for r in reasons], color="#8c564b")
    if not reasons:
        right.text(0.5, 0.5, "nothing dropped", ha="center", va="center", transform=right.transAxes)
        right.set_xticks([])
        right.set_yticks([])
    right.set_title("dropped, by reason (samples or pairs)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return _save(figure, out)


def write_plots(workdir: Path | str) -> list[Path]:
    """Every chart the run's summary has data for, into ``WORKDIR/plots/``; returns their paths."""
    workdir = Path(workdir)
    summary = RunSummary.read(workdir / "summary.json")
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    runs = training_records(summary)
    if runs:
        written.append(plot_training(runs, plots / PLOTS[0]))
    if summary.evaluation:
        by_model = {name: result.by_dataset for name, result in summary.evaluation.items()}
        written.append(plot_accuracy(by_model, plots / PLOTS[1]))
    if summary.pairs.datasets:
        written.append(plot_pairs(summary.pairs, plots / PLOTS[2]))
    return written


def embedded_charts(workdir: Path | str) -> str:
    """The run's charts as markdown images with the PNG inline (data URLs), for a place that cannot
    read the work folder: a run-summary artifact shown in a browser on another machine."""
    import base64

    lines = []
    for chart in sorted((Path(workdir) / "plots").glob("*.png")):
        data = base64.b64encode(chart.read_bytes()).decode("ascii")
        lines += ["", f"![{chart.stem.replace('_', ' ')}](data:image/png;base64,{data})"]
    return "\n".join(lines) + "\n" if lines else ""


def curve_rows(metrics_file: Path | str, rows: int = 50) -> list[dict[str, Any]]:
    """About ``rows`` evenly spaced training steps with their loss terms and rewards, rounded: a
    table to read (a run-summary artifact), not the whole log."""
    records = training_steps(metrics_file)
    keys = ("step", "loss", "dpo", "bco", "sft", "reward_margin", "reward_accuracy", "delta", "lr")
    return [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in keys}
        for r in records[:: max(1, len(records) // rows)]
    ]
