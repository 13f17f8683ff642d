"""The engine interface: requests in, ``n`` completions per request out.

A request is a user question in InternVL's format (``<image>`` placeholders) with its
image paths, an optional assistant prefix to continue (DropoutNTP), sampling parameters
and a seed. An engine is built once per worker process, reused across shards, then
closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs shared by every engine. ``top_k <= 0`` disables top-k."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    question: str  # user text with one <image> placeholder per image (already templated)
    images: tuple[str, ...] = ()
    assistant_prefix: str | None = None  # continue this assistant text instead of starting fresh
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # vLLM seeds child i with seed + i: space the seeds of requests >= n apart


# Chat stop tokens of InternVL2.x / Qwen-style templates (a turn can end on any of them).
STOP_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>")
FINISHED = ("stop", "length")  # a response the model ended, or one cut at max_tokens


@dataclass(frozen=True)
class Completion:
    text: str  # only the newly generated text (without the prefix)
    num_tokens: int
    finish_reason: str  # "stop" or "length" when finished; else the engine's own word (see ``finish_reason``)


def finish_reason(reason: object) -> str:
    """An engine's finish reason as stored with a sample.

    "stop" and "length" pass through; any other (vLLM's abort, error or repetition,
    lmdeploy's abort or error) is kept under its own name, and a missing one becomes
    "error". Only ``FINISHED`` samples are ever paired: a request the engine gave up on
    is a failed request, not a response.
    """
    if reason is None:
        return "error"
    return str(getattr(reason, "value", reason)).lower() or "error"  # .value: an engine's enum


class Engine(Protocol):
    """What every engine offers. ``generate`` returns, per request, ``params.n`` completions."""

    name: str
    model_id: str
    tokenizer: Any  # the model's Hugging Face tokenizer (DropoutNTP cuts answers by its tokens)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The model's own Hugging Face tokenizer, for engines whose tokenizer object has another API
    (lmdeploy's takes no ``add_special_tokens``): DropoutNTP cuts by the same tokens on every engine."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the chat stop tokens this tokenizer has (InternVL2.x ends turns with several)."""
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in STOP_TOKENS if t in vocab} | ({tokenizer.eos_token_id} - {None}))
