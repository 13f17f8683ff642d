"""One input row, in whatever shape a dataset keeps it, read into a question, its answer and images.

Two row forms:

- question/answer: a question column and either a gold ``answer`` (a closed prompt) or a good
  ``chosen`` response (an open prompt); optionally ``choices`` with the answer as an index, a
  letter or the choice's text, rendered into the question as InternVL's multiple-choice prompts
  are ("A. ...", one option a line, then the letter instruction).
- conversations (InternVL's and LLaVA's SFT format): a list of ``{"from": "human"|"gpt", "value"}``
  turns (``role``/``content`` and user/assistant also read); the first human turn is the question,
  the reply after it the ``chosen`` response of an open prompt, or the gold answer where the
  dataset says its replies are answers (``reply_as: answer``).

Column names differ by dataset, so each field is looked up under its common names (``DEFAULT_COLUMNS``)
unless a mapping names its column; a mapped column is then the only one read.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mpo.errors import InputError

ReplyAs = Literal["chosen", "answer"]

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "question": ("question", "query", "problem", "prompt"),
    # not "solution": it usually holds a worked solution, not a gold answer (map it where it is one)
    "answer": ("answer", "label", "gt_answer", "ground_truth"),
    "chosen": ("chosen",),
    "image": ("image", "images", "image_path"),
    "conversations": ("conversations", "messages"),
    "choices": ("choices", "options"),
}
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HUMAN, _MODEL = {"human", "user"}, {"gpt", "assistant"}


class Reject(Exception):
    """A row that cannot become a prompt: a stable reason code, the field at fault, and why."""

    def __init__(self, reason: str, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


@dataclass(slots=True)
class ImageRef:
    """An image a row names: a path (relative to the dataset root) or embedded bytes."""

    name: str
    data: bytes | None = None


@dataclass(slots=True)
class RowContent:
    question: str
    answer: str | None  # gold answer: a closed prompt
    chosen: str | None  # good response: an open prompt
    images: tuple[ImageRef, ...]


def check_mapping(columns: Mapping[str, str], dataset: str) -> None:
    """A mapping may only name the fields above."""
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise InputError(
            f"dataset {dataset!r}: column mapping names unknown field(s) {', '.join(unknown)}; "
            f"fields: {', '.join(DEFAULT_COLUMNS)}"
        )


def resolve_columns(keys: Collection[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """Field -> column for a row (or file schema) with these keys: the mapped column, else the first
    common name present."""
    resolved = dict(mapping)
    for name, candidates in DEFAULT_COLUMNS.items():
        if name not in resolved:
            found = next((column for column in candidates if column in keys), None)
            if found is not None:
                resolved[name] = found
    return resolved


def missing_mapped(keys: Collection[str], mapping: Mapping[str, str], dataset: str, where: str) -> None:
    """Raise when a mapped column is absent from ``keys`` (a file's schema or its first row): a wrong
    mapping is one error, not a quarantine of every row."""
    missing = [f"{column!r} (for {name})" for name, column in mapping.items() if column not in keys]
    if missing:
        raise InputError(
            f"dataset {dataset!r}: mapped column {', '.join(missing)} not in {where}; "
            f"its columns: {', '.join(sorted(keys)) or 'none'}"
        )


def read_row(row: Any, columns: Mapping[str, str], reply_as: ReplyAs) -> RowContent:
    """The question, answer or chosen response, and image references of one row."""
    if not isinstance(row, dict):
        raise Reject("bad_field_type", "line", "a row must be a JSON object")
    question = row.get(columns.get("question", "question"))
    answer = row.get(columns["answer"]) if "answer" in columns else None
    chosen = row.get(columns["chosen"]) if "chosen" in columns else None
    if question is None and "conversations" in columns and row.get(columns["conversations"]) is not None:
        question, reply = _first_exchange(row[columns["conversations"]])
        answer, chosen = (reply, None) if reply_as == "answer" else (None, reply)
    if not isinstance(question, str) or not question.strip():
        raise Reject("missing_field", "question", "no question")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise Reject("bad_field_type", "answer", "answer must be a string or number")
    choices = row.get(columns["choices"]) if "choices" in columns else None
    if choices is not None and answer is not None:
        question, answer = _render_choices(question, _choice_list(choices), answer)
    if answer is None and not (isinstance(chosen, str) and chosen.strip()):
        raise Reject("missing_field", "answer", "neither a gold answer nor a chosen response")
    images = _image_refs(row.get(columns["image"])) if "image" in columns else ()
    return RowContent(
        question, None if answer is None else str(answer), chosen if answer is None else None, images
    )


def _first_exchange(turns: Any) -> tuple[str, str]:
    """The first human turn and the model's reply to it."""
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise Reject("bad_field_type", "conversations", "conversations must be a list of turns")
    question = None
    for turn in turns:
        role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if question is None and role in _HUMAN:
            question = text
        elif question is not None and role in _MODEL:
            if isinstance(question, str) and isinstance(text, str) and text.strip():
                return question, text
            break
    raise Reject("missing_field", "conversations", "no human turn followed by a model reply")


def _choice_list(choices: Any) -> list[str]:
    """Choices as a list; a string that spells a list (as some datasets store them) is read as one."""
    if isinstance(choices, str) and choices.lstrip().startswith("["):
        with contextlib.suppress(ValueError, SyntaxError):
            choices = ast.literal_eval(choices)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise Reject("bad_field_type", "choices", f"choices must be a list of 2 to {len(LETTERS)} options")
    return [str(choice) for choice in choices]


def _render_choices(question: str, choices: list[str], answer: str | int | float) -> tuple[str, str]:
    """The question with its options, one "A. ..." line each, and the gold answer as a letter."""
    letters = LETTERS[: len(choices)]
    if isinstance(answer, int) and 0 <= answer < len(choices):
        letter = letters[answer]
    elif isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        letter = answer.strip().upper()
    elif isinstance(answer, str) and answer in choices:
        letter = letters[choices.index(answer)]
    else:
        raise Reject(
            "bad_field_type", "answer", f"answer {answer!r} is not one of the {len(choices)} choices"
        )
    options = "\n".join(f"{letter_}. {choice}" for letter_, choice in zip(letters, choices, strict=True))
    return f"{question.rstrip()}\n{options}\n{CHOICE_INSTRUCTION}", letter


def _image_refs(value: Any) -> tuple[ImageRef, ...]:
    """A path, a ``{bytes, path}`` struct, or a list of either."""
    if value is None:
        return ()
    if isinstance(value, str) and value:  # the common case, first
        return (ImageRef(value),)
    items = value if isinstance(value, list) else [value]
    refs = []
    for item in items:
        if isinstance(item, str) and item:
            refs.append(ImageRef(item))
        elif isinstance(item, dict) and isinstance(item.get("bytes"), bytes) and item["bytes"]:
            refs.append(ImageRef(str(item.get("path") or ""), item["bytes"]))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            refs.append(ImageRef(item["path"]))
        else:
            raise Reject(
                "bad_field_type", "image", "image must be a path, a {bytes, path} struct, or a list of them"
            )
    return tuple(refs)
