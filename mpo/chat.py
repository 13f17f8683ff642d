"""Chat messages and token ids for (prompt, response) pairs of a VLM.

InternVL annotations mark images with ``<image>`` placeholders inside the question;
HF processors want chat messages whose content is a list of ``{"type": "image"}`` and
``{"type": "text"}`` items. This module converts between the two and encodes a prompt
with an optional response so that the response mask is computed *after* the processor
has expanded each image into its image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mpo.templates import IMAGE_PLACEHOLDER

Message = dict[str, Any]


def load_rgb(path: str) -> Image.Image:
    """Read an image file fully into memory as RGB (the file is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def user_content(question: str, num_images: int) -> list[dict[str, str]]:
    """Split ``question`` on ``<image>`` placeholders into chat content items.

    A question without placeholders but with images gets them in front (InternVL's
    convention). A count mismatch is an input error and raises ``ValueError``.
    """
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders == 0 and num_images:
        question = IMAGE_PLACEHOLDER * num_images + "\n" + question
        placeholders = num_images
    if placeholders != num_images:
        raise ValueError(f"question has {placeholders} <image> placeholders but {num_images} images")
    items: list[dict[str, str]] = []
    for index, part in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if index:
            items.append({"type": "image"})
        text = part.strip("\n") if index == 0 else part.lstrip("\n")
        if text:
            items.append({"type": "text", "text": text})
    return items


def conversation(question: str, num_images: int, assistant_prefix: str | None = None) -> list[Message]:
    """User turn (and an optional assistant prefix to be continued)."""
    messages: list[Message] = [{"role": "user", "content": user_content(question, num_images)}]
    if assistant_prefix is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant_prefix}]})
    return messages


def render_prompt(processor: Any, messages: list[Message]) -> str:
    """Prompt text: a generation prompt, or the continuation of a trailing assistant turn."""
    continues = messages[-1]["role"] == "assistant"
    return processor.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not continues,
        continue_final_message=continues,
    )


@dataclass
class Encoded:
    """One tokenised example: ids, a mask of response tokens, and the image tensors."""

    input_ids: torch.Tensor  # (seq,)
    response_mask: torch.Tensor  # (seq,) bool, True on response tokens incl. end-of-turn
    pixel_values: torch.Tensor | None  # (num_tiles, 3, H, W) or None


def encode(processor: Any, question: str, images: list[Image.Image], response: str | None = None) -> Encoded:
    """Encode a user question with its images, plus an optional assistant response.

    The prompt goes through the processor (which expands every image into
    ``<img><IMG_CONTEXT>*N</img>``); the response is tokenised separately and appended
    with the end-of-turn token, so the response mask is exact whatever the expansion.
    """
    prompt = render_prompt(processor, conversation(question, len(images)))
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    prompt_ids = inputs["input_ids"][0]
    pixel_values = inputs.get("pixel_values")
    if response is None:
        return Encoded(prompt_ids, torch.zeros_like(prompt_ids, dtype=torch.bool), pixel_values)
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.eos_token
    response_ids = tokenizer(response + end_of_turn, add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ][0]
    input_ids = torch.cat([prompt_ids, response_ids])
    mask = torch.cat(
        [torch.zeros_like(prompt_ids, dtype=torch.bool), torch.ones_like(response_ids, dtype=torch.bool)]
    )
    return Encoded(input_ids, mask, pixel_values)


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for teacher forcing; ``labels`` are -100 outside responses."""
    length = max(e.input_ids.numel() for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = e.input_ids.numel()
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        labels[row, :n] = torch.where(e.response_mask, e.input_ids, torch.full_like(e.input_ids, -100))
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
