"""Deterministic synthetic VQA data in InternVL's annotation format.

No dataset hub is reachable, so tests and the demo draw their own images with pillow.
Every image is a small *scene* (shapes, or a drawn arithmetic expression); every
question's gold answer, worked solution and open-ended description are computed from
the scene, so they are right by construction.

Output layout (what InternVL's ``meta.json`` readers expect)::

    OUT/images/<dataset>/<split>_<index>.png
    OUT/annotations/<split>/<dataset>.jsonl
    OUT/meta.json            # train split
    OUT/meta_heldout.json    # held-out split, for evaluation

Closed rows: ``{"image", "question", "answer", "solution"}``; open rows (the DropoutNTP
input format): ``{"image", "question", "chosen", "rejected": null}``. The same seed gives
byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mpo.io import atomic_write_bytes, atomic_write_text

IMAGE_SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SIZE_WORDS = ((14, "small"), (22, "medium"), (99, "large"))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
YES_NO = "Please answer Yes or No."
FINAL_ANSWER = "Final answer:"  # the last line of every worked solution starts with it


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, centre and half-size in pixels."""

    kind: str
    colour: str
    x: int
    y: int
    radius: int

    @property
    def size_word(self) -> str:
        return next(word for limit, word in SIZE_WORDS if self.radius <= limit)

    @property
    def place(self) -> str:
        vertical = "top" if self.y < IMAGE_SIZE / 3 else "bottom" if self.y > 2 * IMAGE_SIZE / 3 else "middle"
        horizontal = (
            "left" if self.x < IMAGE_SIZE / 3 else "right" if self.x > 2 * IMAGE_SIZE / 3 else "centre"
        )
        return "centre" if vertical == "middle" and horizontal == "centre" else f"{vertical} {horizontal}"


@dataclass(frozen=True)
class Row:
    """One annotation row before it is written: the image and its JSON fields."""

    image: Image.Image
    fields: dict[str, object]


def _overlaps(shape: Shape, others: list[Shape]) -> bool:
    return any(
        (shape.x - o.x) ** 2 + (shape.y - o.y) ** 2 < (shape.radius + o.radius + 6) ** 2 for o in others
    )


def random_shapes(rng: random.Random, kinds: list[str]) -> list[Shape]:
    """Place one shape per entry of ``kinds``: random colours, distinct radii (so "largest"
    is unique), no overlaps. Restarts the layout in the rare case it gets stuck."""
    for _ in range(100):
        radii = rng.sample(range(10, 32, 2), len(kinds))
        shapes: list[Shape] = []
        for kind, radius in zip(kinds, radii, strict=True):
            for _ in range(100):
                candidate = Shape(
                    kind=kind,
                    colour=rng.choice(list(COLOURS)),
                    x=rng.randint(radius + 4, IMAGE_SIZE - radius - 4),
                    y=rng.randint(radius + 4, IMAGE_SIZE - radius - 4),
                    radius=radius,
                )
                if not _overlaps(candidate, shapes):
                    shapes.append(candidate)
                    break
        if len(shapes) == len(kinds):
            return shapes
    raise RuntimeError(f"could not place {len(kinds)} shapes without overlap")  # pragma: no cover


def _any_kinds(rng: random.Random, count: int, kinds: tuple[str, ...] = SHAPES) -> list[str]:
    return [rng.choice(kinds) for _ in range(count)]


def draw_shapes(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLOURS[s.colour]
        box = (s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [(s.x, s.y - s.radius), (s.x - s.radius, s.y + s.radius), (s.x + s.radius, s.y + s.radius)],
                fill=fill,
            )
    return image


def _count(shapes: list[Shape], kind: str) -> int:
    return sum(s.kind == kind for s in shapes)


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else f"{kind}s"


def count_task(rng: random.Random) -> Row:
    kind = rng.choice(SHAPES)
    target = rng.randint(1, 5)
    others = [k for k in SHAPES if k != kind]
    kinds = [kind] * target + _any_kinds(rng, rng.randint(0, 2), tuple(others))
    rng.shuffle(kinds)
    shapes = random_shapes(rng, kinds)
    n = _count(shapes, kind)
    solution = f"I look for every {kind} in the image. I count {n} {_plural(kind, n)}.\n{FINAL_ANSWER} {n}"
    return Row(
        draw_shapes(shapes),
        {
            "question": f"<image>\nHow many {kind}s are there in the image?\n{SHORT_ANSWER}",
            "answer": str(n),
            "solution": solution,
        },
    )


def colour_task(rng: random.Random) -> Row:
    shapes = random_shapes(rng, _any_kinds(rng, rng.randint(2, 4)))
    largest = max(shapes, key=lambda s: s.radius)
    solution = (
        f"The largest shape is the {largest.kind} at the {largest.place}. It is {largest.colour}.\n"
        f"{FINAL_ANSWER} {largest.colour}"
    )
    return Row(
        draw_shapes(shapes),
        {
            "question": f"<image>\nWhat colour is the largest shape?\n{SHORT_ANSWER}",
            "answer": largest.colour,
            "solution": solution,
        },
    )


def compare_task(rng: random.Random) -> Row:
    first, second = rng.sample(SHAPES, 2)
    shapes = random_shapes(rng, _any_kinds(rng, rng.randint(2, 6), (first, second)))
    a, b = _count(shapes, first), _count(shapes, second)
    verdict = "Yes" if a > b else "No"
    solution = (
        f"There {'is' if a == 1 else 'are'} {a} {_plural(first, a)} and {b} {_plural(second, b)}. "
        f"{a} is {'more' if a > b else 'not more'} than {b}.\n{FINAL_ANSWER} {verdict}"
    )
    return Row(
        draw_shapes(shapes),
        {
            "question": f"<image>\nAre there more {first}s than {second}s in the image?\n{YES_NO}",
            "answer": verdict,
            "solution": solution,
        },
    )


def choice_task(rng: random.Random) -> Row:
    shapes = random_shapes(rng, _any_kinds(rng, rng.randint(1, 6)))
    total = len(shapes)
    options = sorted(rng.sample([v for v in range(1, 8) if v != total], 3) + [total])
    letters = "ABCD"
    letter = letters[options.index(total)]
    listing = "\n".join(f"{letters[i]}. {v}" for i, v in enumerate(options))
    solution = (
        f"I count all the shapes: there are {total}. Option {letter} says {total}.\n{FINAL_ANSWER} {letter}"
    )
    return Row(
        draw_shapes(shapes),
        {
            "question": f"<image>\nHow many shapes are in the image?\n{listing}\n{LETTER_ANSWER}",
            "answer": letter,
            "solution": solution,
        },
    )


def arithmetic_task(rng: random.Random) -> Row:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-") if a >= b else "+"
    value = a + b if op == "+" else a - b
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _draw_digit_row(draw, f"{a}{op}{b}", top=rng.randint(70, 120), left=rng.randint(30, 80))
    solution = f"The image shows {a} {op} {b}. {a} {op} {b} = {value}.\n{FINAL_ANSWER} {value}"
    return Row(
        image,
        {
            "question": f"<image>\nWhat is the value of the expression in the image?\n{SHORT_ANSWER}",
            "answer": str(value),
            "solution": solution,
        },
    )


def describe_task(rng: random.Random) -> Row:
    shapes = random_shapes(rng, _any_kinds(rng, rng.randint(1, 4)))
    parts = [
        f"a {s.size_word} {s.colour} {s.kind} at the {s.place}"
        for s in sorted(shapes, key=lambda s: -s.radius)
    ]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    total = len(shapes)
    chosen = (
        f"The image shows {NUMBER_WORDS[total]} {'shape' if total == 1 else 'shapes'} on a white background: "
        f"{listing}. The largest one is {max(shapes, key=lambda s: s.radius).colour}."
    )
    return Row(
        draw_shapes(shapes),
        {
            "question": "<image>\nDescribe the image in detail.",
            "chosen": chosen,
            "rejected": None,
        },
    )


# Seven-segment digits: segments a..g as (x0, y0, x1, y1) in a 20 x 36 cell.
_SEGMENTS = {
    "a": (2, 0, 18, 4),
    "b": (16, 2, 20, 18),
    "c": (16, 18, 20, 34),
    "d": (2, 32, 18, 36),
    "e": (0, 18, 4, 34),
    "f": (0, 2, 4, 18),
    "g": (2, 16, 18, 20),
}
_DIGITS = {
    "0": "abcdef",
    "1": "bc",
    "2": "abged",
    "3": "abgcd",
    "4": "fgbc",
    "5": "afgcd",
    "6": "afgedc",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
}


def _draw_digit_row(draw: ImageDraw.ImageDraw, text: str, top: int, left: int, scale: int = 2) -> None:
    """Draw digits and +/- as thick seven-segment glyphs (no font files needed)."""
    x = left
    for char in text:
        if char in _DIGITS:
            for seg in _DIGITS[char]:
                x0, y0, x1, y1 = _SEGMENTS[seg]
                draw.rectangle(
                    (x + x0 * scale, top + y0 * scale, x + x1 * scale, top + y1 * scale), fill=(0, 0, 0)
                )
        else:
            mid = top + 18 * scale
            draw.rectangle((x + 2 * scale, mid - 2 * scale, x + 18 * scale, mid + 2 * scale), fill=(0, 0, 0))
            if char == "+":
                draw.rectangle(
                    (x + 8 * scale, mid - 8 * scale, x + 12 * scale, mid + 8 * scale), fill=(0, 0, 0)
                )
        x += 26 * scale


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "synth_count": count_task,
    "synth_colour": colour_task,
    "synth_compare": compare_task,
    "synth_choice": choice_task,
    "synth_arith": arithmetic_task,
    "synth_describe": describe_task,
}
CLOSED_DATASETS = tuple(name for name in TASKS if name != "synth_describe")
# How each closed dataset's answers are verified (mpo.answers.VerifyMode values).
VERIFY_MODES = {
    "synth_count": "numeric",
    "synth_arith": "numeric",
    "synth_choice": "choice",
    "synth_colour": "exact",
    "synth_compare": "exact",
}
# The answer each closed dataset's worked steps state (mpo.pairs.PairingConfig.claim_patterns):
# a sampled response whose steps say one thing and whose final answer another is paired on
# neither side. synth_compare's steps state counts, not the Yes/No verdict: no pattern.
CLAIM_PATTERNS = {
    "synth_count": r"I count (\d+)",
    "synth_colour": r"It is (\w+)\.",
    "synth_choice": r"Option ([A-D]) says",
    "synth_arith": r"= (-?\d+)\.",
}
OPEN_DATASETS = ("synth_describe",)


def _rows(dataset: str, split: str, count: int, seed: int) -> Iterator[tuple[str, Row]]:
    task = TASKS[dataset]
    for index in range(count):
        # A string seed is hashed deterministically by random.Random (sha512), unlike hash().
        rng = random.Random(f"{seed}/{dataset}/{split}/{index}")
        yield f"images/{dataset}/{split}_{index:05d}.png", task(rng)


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def generate(
    out: Path,
    count: int,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    datasets: tuple[str, ...] = tuple(TASKS),
) -> dict[str, dict[str, int]]:
    """Write ``count`` prompts per dataset (split into train / held-out) under ``out``.

    Returns ``{split: {dataset: rows}}``. Re-running with the same arguments rewrites
    identical bytes, so the output can be used as a cache key by content.
    """
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    unknown = set(datasets) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown synthetic datasets {sorted(unknown)}; known: {sorted(TASKS)}")
    out = Path(out)
    heldout = int(round(count * heldout_fraction))
    splits = {"train": count - heldout, "heldout": heldout}
    summary: dict[str, dict[str, int]] = {}
    for split, n in splits.items():
        meta: dict[str, dict[str, object]] = {}
        for dataset in datasets:
            lines = []
            for rel_path, row in _rows(dataset, split, n, seed):
                atomic_write_bytes(out / rel_path, _png_bytes(row.image))
                lines.append(json.dumps({"image": rel_path, **row.fields}, ensure_ascii=False))
            annotation = out / "annotations" / split / f"{dataset}.jsonl"
            atomic_write_text(annotation, "".join(line + "\n" for line in lines))
            meta[dataset] = {
                "root": str(out.resolve()),
                "annotation": str(annotation.resolve()),
                "data_augment": False,
                "max_dynamic_patch": 1,
                "repeat_time": 1,
                "length": n,
            }
            summary.setdefault(split, {})[dataset] = n
        name = "meta.json" if split == "train" else f"meta_{split}.json"
        atomic_write_text(out / name, json.dumps(meta, indent=2) + "\n")
    return summary


def with_final_answer(solution: str, answer: str) -> str:
    """The worked solution with its final answer line naming ``answer`` (its steps unchanged)."""
    return f"{solution.rsplit(FINAL_ANSWER, 1)[0]}{FINAL_ANSWER} {answer}"


def as_if_answered(solution: str, gold: str, answer: str) -> str:
    """The worked solution of a model that believed ``answer``: every whole-word mention of
    the gold answer, in the steps and the final line, names ``answer`` instead.

    The steps then agree with the (wrong) final answer ("It is red. Final answer: red"), a
    hallucination from the answer prior rather than a right reading with a wrong last line.
    """
    believed = re.sub(rf"(?<!\w){re.escape(gold)}(?!\w)", lambda _: answer, solution)
    return with_final_answer(believed, answer)


def solution_pairs(
    synth_dir: Path, out: Path, split: str = "train", seed: int = 0, template: str = "en"
) -> Path:
    """Gold preference pairs straight from the synthetic annotations, for tests and benchmarks.

    chosen = the worked solution; rejected = the same solution whose final line names
    another answer of the same dataset (a fluent response with the wrong conclusion, the
    kind of pair correctness sampling yields). Written as a pairs directory
    (``out/data/part-00000.parquet``, the ``PAIRS`` contract), without sampling a model.
    """
    import hashlib

    import pyarrow as pa

    from mpo.schemas import PAIRS, write_table
    from mpo.templates import apply_template

    meta_name = "meta.json" if split == "train" else f"meta_{split}.json"
    meta = json.loads((Path(synth_dir) / meta_name).read_text())
    rows: list[dict[str, object]] = []
    for dataset, entry in meta.items():
        annotated = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()]
        closed = [row for row in annotated if "solution" in row]
        answers = sorted({str(row["answer"]) for row in closed})
        rng = random.Random(f"{seed}/{dataset}/pairs")
        for row in closed:
            wrong = rng.choice([a for a in answers if a != str(row["answer"])] or [str(row["answer"]) + "0"])
            rejected = with_final_answer(str(row["solution"]), wrong)
            prompt = apply_template(str(row["question"]), template)
            prompt_id = hashlib.sha256(f"{dataset}\0{row['image']}\0{row['question']}".encode()).hexdigest()[
                :16
            ]
            rows.append(
                {
                    "pair_id": hashlib.sha256(
                        f"{prompt_id}\0{row['solution']}\0{rejected}".encode()
                    ).hexdigest()[:16],
                    "prompt_id": prompt_id,
                    "dataset": dataset,
                    "source": "correctness",
                    "prompt": prompt,
                    "chosen": row["solution"],
                    "rejected": rejected,
                    "images": [str(Path(entry["root"]) / str(row["image"]))],
                    "answer": str(row["answer"]),
                    "chosen_answer": str(row["answer"]),
                    "rejected_answer": wrong,
                    "model": "synthetic",
                }
            )
    if not rows:
        raise ValueError(f"{synth_dir}: no closed prompts in the {split} split")
    write_table(pa.Table.from_pylist(rows, schema=PAIRS), Path(out) / "data" / "part-00000.parquet", PAIRS)
    return Path(out)
