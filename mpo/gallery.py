"""A gallery of preference pairs with their images: one self-contained HTML file to read the data by.

Preference data is judged by looking at it. ``write_gallery`` takes a seeded sample of pairs per
dataset and source from a pairs version (reading the full rows of the sampled pairs only, so a
version of a million pairs takes seconds), and renders each with its image(s) as small embedded
JPEG thumbnails, the question, chosen and rejected side by side with their extracted answers and
the gold answer, the source, the verifier mode and the length ratio; for DropoutNTP pairs the
shared prefix is marked and so is the point where the rejected continuation starts. The prompts
every sample got wrong (``hard_prompts.parquet``) get a section of their own. Everything from the
data is escaped; the file needs no server, network, script or font from elsewhere, and a filter
by dataset and source is a few lines of inline script. Responses are cut and pairs capped so that
the file stays small (``MAX_CHARS``, ``MAX_PAIRS``) whatever the input.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from mpo.io import atomic_write_text
from mpo.schemas import shard_files

THUMBNAIL_PX = 160
MAX_CHARS = 3000  # per response: a loop of 4,096 tokens would otherwise fill the page
MAX_PAIRS = 400
MAX_HARD = 24


@dataclass(frozen=True)
class GallerySpec:
    """What to show: how many pairs per (dataset, source), which ones, drawn with which seed."""

    per_source: int = 6
    dataset: str | None = None
    source: str | None = None
    seed: int = 0


def _draw_order(pair_ids: pl.Series, seed: int) -> pl.Series:
    """A seeded order of pairs that does not depend on how the version is sharded or sorted."""
    return pl.Series([zlib.crc32(f"{seed}/{pair_id}".encode()) for pair_id in pair_ids], dtype=pl.UInt32)


def sample_pairs(pairs_dir: Path | str, spec: GallerySpec) -> pl.DataFrame:
    """Up to ``spec.per_source`` pairs per (dataset, source), seeded; reads the small columns of every
    pair and every column of the drawn ones only."""
    files = shard_files(Path(pairs_dir) / "data")
    if not files:
        raise FileNotFoundError(f"{pairs_dir}: no pairs shards in data/ (is it a pairs version?)")
    keys = pl.scan_parquet(files).select("pair_id", "dataset", "source")
    if spec.dataset is not None:
        keys = keys.filter(pl.col("dataset") == spec.dataset)
    if spec.source is not None:
        keys = keys.filter(pl.col("source") == spec.source)
    index = keys.collect()
    index = index.with_columns(_order=_draw_order(index["pair_id"], spec.seed))
    chosen = (
        index.sort("_order")
        .group_by("dataset", "source", maintain_order=True)
        .head(spec.per_source)
        .sort("dataset", "source", "_order")
        .head(MAX_PAIRS)
    )
    wanted = chosen["pair_id"].implode()
    rows = pl.scan_parquet(files).filter(pl.col("pair_id").is_in(wanted)).collect()
    return chosen.select("pair_id", "_order").join(rows, on="pair_id", how="left", maintain_order="left")


def _thumbnail(path: str, cache: dict[str, str | None]) -> str | None:
    """The image at ``path`` downscaled to an embedded JPEG (a data URL), None where it cannot be read."""
    if path not in cache:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "JPEG", quality=80)
            cache[path] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        except (OSError, UnidentifiedImageError):
            cache[path] = None
    return cache[path]


def _images(paths: list[str] | None, cache: dict[str, str | None]) -> str:
    tags = []
    for path in paths or []:
        data = _thumbnail(path, cache)
        name = html.escape(Path(path).name)
        tags.append(
            f'<img alt="{name}" src="{data}">'
            if data
            else f'<span class="missing">image not readable: {html.escape(path)}</span>'
        )
    return "".join(tags)


def _cut(text: str | None) -> str:
    text = text or ""
    if len(text) <= MAX_CHARS:
        return html.escape(text)
    return (
        html.escape(text[:MAX_CHARS])
        + f'<span class="cut"> … {len(text) - MAX_CHARS:,} more characters</span>'
    )


def _responses(chosen: str, rejected: str, dropout: bool) -> tuple[str, str]:
    """Both responses escaped; for DropoutNTP the shared prefix marked and the rejected one's start of
    continuation shown (the pairs keep no cut point: the common prefix, ended at a word boundary)."""
    if not dropout:
        return _cut(chosen), _cut(rejected)
    shared = len(os.path.commonprefix([chosen, rejected]))
    if shared < len(chosen):  # not mid-word: the cut is between tokens, a shared half-word is chance
        shared = max(chosen.rfind(" ", 0, shared) + 1, chosen.rfind("\n", 0, shared) + 1)
    prefix = f'<mark title="shared prefix">{_cut(chosen[:shared])}</mark>'
    marker = '<span class="split" title="the rejected continuation starts here">▶</span>'
    return prefix + _cut(chosen[shared:]), prefix + marker + _cut(rejected[shared:])


def _answer(label: str, value: str | None) -> str:
    return f"<dt>{label}</dt><dd>{html.escape(value) if value else '—'}</dd>"


def _pair_card(row: dict[str, Any], modes: dict[str, str], images: dict[str, str | None]) -> str:
    dropout = row["source"] == "dropout_ntp"
    chosen, rejected = _responses(row["chosen"] or "", row["rejected"] or "", dropout)
    ratio = len(row["rejected"] or "") / max(1, len(row["chosen"] or ""))
    facts = (
        f"<span>{html.escape(row['dataset'])}</span><span>{html.escape(row['source'])}</span>"
        f"<span>verifier {html.escape(modes.get(row['dataset'], modes.get('', 'auto')))}</span>"
        f"<span>length ratio {ratio:.2f}</span><span class='id'>{html.escape(row['pair_id'])}</span>"
    )
    return (
        f'<article class="pair" data-dataset="{html.escape(row["dataset"])}" '
        f'data-source="{html.escape(row["source"])}">'
        f'<div class="facts">{facts}</div>'
        f'<div class="images">{_images(row["images"], images)}</div>'
        f'<pre class="prompt">{_cut(row["prompt"])}</pre>'
        f'<dl class="answers">{_answer("gold", row["answer"])}{_answer("chosen", row["chosen_answer"])}'
        f"{_answer('rejected', row['rejected_answer'])}</dl>"
        f'<div class="sides"><section class="chosen"><h4>chosen</h4><pre>{chosen}</pre></section>'
        f'<section class="rejected"><h4>rejected</h4><pre>{rejected}</pre></section></div>'
        "</article>"
    )


def _hard_card(row: dict[str, Any], images: dict[str, str | None]) -> str:
    return (
        f'<article class="pair hard" data-dataset="{html.escape(row["dataset"])}" data-source="hard">'
        f'<div class="facts"><span>{html.escape(row["dataset"])}</span>'
        f"<span>all {row['samples']} samples wrong</span></div>"
        f'<div class="images">{_images(row["images"], images)}</div>'
        f'<pre class="prompt">{_cut(row["question"])}</pre><dl class="answers">{_answer("gold", row["answer"])}</dl>'
        "</article>"
    )


def _verifier_modes(pairs_dir: Path) -> dict[str, str]:
    """The verifier per dataset the pairing used ('' for the default), from the version's report."""
    report = pairs_dir / "report.json"
    if not report.is_file():
        return {}
    config = json.loads(report.read_text()).get("config", {})
    return {"": str(config.get("default_verify_mode", "auto")), **config.get("verify_modes", {})}


def _hard_prompts(pairs_dir: Path, spec: GallerySpec) -> pl.DataFrame:
    path = pairs_dir / "hard_prompts.parquet"
    if not path.is_file() or spec.source not in (None, "hard"):
        return pl.DataFrame()
    hard = pl.read_parquet(path)
    if spec.dataset is not None:
        hard = hard.filter(pl.col("dataset") == spec.dataset)
    order = _draw_order(hard["prompt_id"], spec.seed)
    return hard.with_columns(_order=order).sort("_order").head(MAX_HARD).sort("dataset", "_order")


def gallery_markdown(pairs_dir: Path | str, per_source: int = 2, seed: int = 0) -> str:
    """A few pairs per source as a markdown table with thumbnails (embedded JPEGs): the small gallery
    of the run summary where the work folder is out of reach (the Prefect UI in a browser)."""
    spec = GallerySpec(per_source=per_source, seed=seed)
    pairs = sample_pairs(pairs_dir, spec).group_by("source", maintain_order=True).head(per_source)
    images: dict[str, str | None] = {}

    def cell(text: str | None, limit: int = 160) -> str:
        text = " ".join((text or "").split())
        text = text if len(text) <= limit else text[:limit] + " …"
        return html.escape(text).replace("|", "\\|")

    def thumbs(paths: list[str] | None) -> str:
        shown = [(Path(path).name, _thumbnail(path, images)) for path in paths or []]
        return " ".join(
            f"![{html.escape(name)}]({data})" if data else "image not readable" for name, data in shown
        )

    lines = ["| image | source | question | chosen | rejected |", "| --- | --- | --- | --- | --- |"]
    for row in pairs.iter_rows(named=True):
        lines.append(
            f"| {thumbs(row['images'])} | {html.escape(row['source'])} | {cell(row['prompt'])} | "
            f"{cell(row['chosen'])} | {cell(row['rejected'])} |"
        )
    return "\n".join(lines) + "\n"


def write_gallery(pairs_dir: Path | str, out: Path | str, spec: GallerySpec | None = None) -> Path:
    """The gallery of ``pairs_dir`` as one HTML file at ``out`` (written atomically)."""
    spec = spec or GallerySpec()
    pairs_dir, out = Path(pairs_dir), Path(out)
    pairs = sample_pairs(pairs_dir, spec)
    hard = _hard_prompts(pairs_dir, spec)
    images: dict[str, str | None] = {}
    modes = _verifier_modes(pairs_dir)
    cards = [_pair_card(row, modes, images) for row in pairs.iter_rows(named=True)]
    hard_cards = [_hard_card(row, images) for row in hard.iter_rows(named=True)]
    datasets = sorted(set(pairs["dataset"]) | set(hard["dataset"] if hard.height else []))
    sources = sorted(set(pairs["source"])) + (["hard"] if hard.height else [])
    counts = pairs.group_by("dataset", "source").len().sort("dataset", "source")
    page = _PAGE.format(
        title=html.escape(f"Preference pairs: {pairs_dir.name}"),
        summary=html.escape(
            f"{pairs.height} pairs drawn (seed {spec.seed}, up to {spec.per_source} per dataset and source) "
            f"from {pairs_dir}"
        ),
        counts="".join(
            f"<tr><td>{html.escape(d)}</td><td>{html.escape(s)}</td><td>{n}</td></tr>"
            for d, s, n in counts.iter_rows()
        ),
        datasets="".join(f'<option value="{html.escape(d)}">{html.escape(d)}</option>' for d in datasets),
        sources="".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in sources),
        cards="\n".join(cards),
        hard=(
            "<h2>Hard prompts: every sample wrong</h2><p>What the model cannot do yet: "
            f"{hard.height} drawn of the version's hard prompts.</p>" + "\n".join(hard_cards)
            if hard_cards
            else ""
        ),
    )
    atomic_write_text(out, page)
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }}
.pair {{ border: 1px solid #ccc; border-radius: 6px; padding: .8em; margin: 1em 0; }}
.facts span {{ background: #eef; border-radius: 3px; padding: 0 .4em; margin-right: .4em; }}
.facts .id {{ background: none; color: #888; font-family: monospace; }}
.images img {{ margin: .4em .4em 0 0; border: 1px solid #ddd; }}
pre {{ white-space: pre-wrap; word-break: break-word; margin: .3em 0; font: 13px/1.4 monospace; }}
.prompt {{ background: #f6f6f6; padding: .4em; }}
.sides {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
.chosen h4 {{ color: #176b2c; margin: .3em 0; }} .rejected h4 {{ color: #a3211b; margin: .3em 0; }}
mark {{ background: #fff3b0; }} .split {{ color: #a3211b; font-weight: bold; }}
.cut, .missing {{ color: #888; }} dl.answers {{ display: flex; gap: .3em 1em; flex-wrap: wrap; margin: .3em 0; }}
dl.answers dt {{ font-weight: bold; }} dl.answers dd {{ margin: 0 1em 0 0; }}
.hidden {{ display: none; }}
</style></head><body>
<h1>{title}</h1><p>{summary}</p>
<table><tr><th>dataset</th><th>source</th><th>pairs shown</th></tr>{counts}</table>
<p><label>dataset <select id="dataset"><option value="">all</option>{datasets}</select></label>
<label>source <select id="source"><option value="">all</option>{sources}</select></label>
<span id="shown"></span></p>
{cards}
{hard}
<script>
function filter() {{
  const d = document.getElementById("dataset").value, s = document.getElementById("source").value;
  let shown = 0;
  for (const card of document.querySelectorAll("article.pair")) {{
    const keep = (!d || card.dataset.dataset === d) && (!s || card.dataset.source === s);
    card.classList.toggle("hidden", !keep);
    shown += keep;
  }}
  document.getElementById("shown").textContent = shown + " shown";
}}
document.getElementById("dataset").onchange = filter;
document.getElementById("source").onchange = filter;
filter();
</script>
</body></html>
"""
