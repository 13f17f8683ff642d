"""Preference pairs as token ids: one prompt encoding per pair, chosen and rejected in one batch.

A pair's prompt (with its images expanded into image tokens by the processor) is encoded
once; the chosen and the rejected responses are tokenised separately and appended with
the end-of-turn token, so the response masks are exact whatever the image expansion.
Truncation keeps the start: only response tokens past ``max_length`` are cut, so image
tokens are never cut; a pair whose prompt alone does not fit is refused with
``PairTooLong`` and counted by the caller.

A batch of B pairs is 2B sequences, the B chosen first then the B rejected, with the
pixel values of the B pairs once (the log-prob code reuses the image features for both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from mpo.chat import encode, load_rgb
from mpo.schemas import PAIRS, read_dir

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


class PairTooLong(ValueError):
    """The prompt (with its image tokens) leaves no room for a response within max_length."""


@dataclass
class EncodedPair:
    row: int  # index of the pair in its table
    prompt_ids: torch.Tensor
    chosen_ids: torch.Tensor  # response + end-of-turn
    rejected_ids: torch.Tensor
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W) of this pair's images


@dataclass
class PairBatch:
    """2B sequences (chosen rows 0..B-1, rejected rows B..2B-1), right-padded."""

    rows: list[int]
    input_ids: torch.Tensor  # (2B, L)
    attention_mask: torch.Tensor  # (2B, L)
    response_mask: torch.Tensor  # (2B, L) bool: tokens whose log-prob counts
    pixel_values: torch.Tensor | None  # the B pairs' tiles, once

    @property
    def pairs(self) -> int:
        return len(self.rows)

    def chosen_tokens(self) -> torch.Tensor:
        """(B,) number of response tokens of each chosen sequence."""
        return self.response_mask[: self.pairs].sum(dim=1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PairBatch:
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        return PairBatch(
            self.rows,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            pixels,
        )


def _response_ids(tokenizer: Any, text: str) -> torch.Tensor:
    return tokenizer(text + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][
        0
    ]


def encode_pair(
    processor: Any, row: int, prompt: str, image_paths: list[str], chosen: str, rejected: str, max_length: int
) -> EncodedPair:
    """Encode one pair; responses are cut at the end to fit ``max_length`` with the prompt."""
    images = [load_rgb(p) for p in image_paths]
    prompt_enc = encode(processor, prompt, images)
    prompt_ids = prompt_enc.input_ids
    room = max_length - prompt_ids.numel()
    if room < 1:
        raise PairTooLong(
            f"pair {row}: prompt is {prompt_ids.numel()} tokens with its images, max_length is {max_length}"
        )
    tokenizer = processor.tokenizer
    return EncodedPair(
        row,
        prompt_ids,
        _response_ids(tokenizer, chosen)[:room],
        _response_ids(tokenizer, rejected)[:room],
        prompt_enc.pixel_values,
    )


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> PairBatch:
    """Stack chosen then rejected sequences; right padding; masks on response tokens."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    length = max(a.numel() + b.numel() for a, b in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    response = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, (prompt_ids, response_ids) in enumerate(sequences):
        p, r = prompt_ids.numel(), response_ids.numel()
        input_ids[i, :p] = prompt_ids
        input_ids[i, p : p + r] = response_ids
        attention[i, : p + r] = 1
        response[i, p : p + r] = True
    pixels = [p.pixel_values for p in pairs if p.pixel_values is not None]
    return PairBatch(
        [p.row for p in pairs], input_ids, attention, response, torch.cat(pixels) if pixels else None
    )


def encode_batch(
    pairs: PairTable, processor: Any, rows: list[int], max_length: int
) -> tuple[PairBatch | None, int]:
    """Encode and collate ``rows``, leaving out (and counting) pairs too long to fit."""
    encoded, too_long = [], 0
    for row in rows:
        try:
            encoded.append(pairs.encode(processor, row, max_length))
        except PairTooLong:
            too_long += 1
    if not encoded:
        return None, too_long
    return collate_pairs(encoded, processor.tokenizer.pad_token_id), too_long


def pairs_data_dir(pairs_dir: Path | str) -> Path:
    """The shard folder of a pairs directory: ``PAIRS_DIR/data`` (``mpo pairs``), or the folder itself."""
    path = Path(pairs_dir)
    return path / "data" if (path / "data").is_dir() else path


class PairTable:
    """The columns training needs from a pairs directory, in memory (text and paths only)."""

    def __init__(self, table: pa.Table, source: str = "") -> None:
        self.source = source
        self.table = table
        self.pair_ids: list[str] = table.column("pair_id").to_pylist()
        self.prompts: list[str] = table.column("prompt").to_pylist()
        self.chosen: list[str] = table.column("chosen").to_pylist()
        self.rejected: list[str] = table.column("rejected").to_pylist()
        self.images: list[list[str]] = [list(v or []) for v in table.column("images").to_pylist()]
        # (N, 2) reference log-probs when `mpo ref-logps` has run; NaN where a pair was too long.
        self.ref: torch.Tensor | None = None
        if all(c in table.column_names for c in REF_COLUMNS):
            columns = [
                [float("nan") if v is None else v for v in table.column(c).to_pylist()] for c in REF_COLUMNS
            ]
            self.ref = torch.tensor(columns, dtype=torch.float64).T.contiguous()

    @classmethod
    def read(cls, pairs_dir: Path | str) -> PairTable:
        """Read ``PAIRS_DIR/data`` (or a directory of shards itself)."""
        data = pairs_data_dir(pairs_dir)
        table = read_dir(data)
        missing = [
            c for c in ("pair_id", "prompt", "chosen", "rejected", "images") if c not in table.column_names
        ]
        if missing:
            raise ValueError(f"{data}: not a pairs table, missing columns {missing} (expected {PAIRS.names})")
        return cls(table, str(data))

    def __len__(self) -> int:
        return len(self.pair_ids)

    def encode(self, processor: Any, row: int, max_length: int) -> EncodedPair:
        return encode_pair(
            processor,
            row,
            self.prompts[row],
            self.images[row],
            self.chosen[row],
            self.rejected[row],
            max_length,
        )
