"""A finished run as Prefect artifacts: what the UI's Artifacts tab shows for each run.

The summary as markdown with its charts embedded (inline PNGs, so the artifact needs no file
server), the pairs per dataset and source, and the MPO training curve as tables. The keys are
stable so the UI groups every run's version of an artifact together.
"""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mpo.gallery import gallery_markdown
from mpo.report import curve_rows, embedded_charts, pairs_per_source
from mpo.results import RunSummary


def publish_run(summary: RunSummary) -> None:
    """Create the run's artifacts in the current flow run."""
    create_table_artifact(
        key="mpo-pairs-per-source",
        description="preference pairs per dataset and source",
        table=[{"dataset": dataset, **counts} for dataset, counts in pairs_per_source(summary.pairs).items()],
    )
    if "mpo" in summary.trainings:
        create_table_artifact(
            key="mpo-training-curves",
            table=curve_rows(summary.trainings["mpo"].metrics_file),
            description="MPO training: loss terms and rewards",
        )
    create_markdown_artifact(
        key="mpo-run-summary",
        markdown=summary.render() + embedded_charts(Path(summary.workdir)) + _small_gallery(summary),
        description="MPO data engine run summary",
    )


def _small_gallery(summary: RunSummary) -> str:
    """Two pairs per source with their thumbnails; the whole gallery is the run's pairs.html."""
    if not summary.pairs.counts.get("pairs"):
        return ""
    return (
        "\n## Pairs, a few per source\n\n"
        + gallery_markdown(summary.pairs.out_dir, per_source=2)
        + f"\nMore, with a filter by dataset and source: `{Path(summary.workdir) / 'pairs.html'}`\n"
    )
