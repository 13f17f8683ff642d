"""The transformers engine: ``AutoModelForImageTextToText`` + ``AutoProcessor``, CPU or CUDA.

Requests are decoded in batches (left-padded, up to ``max_batch_sequences`` sequences per
``generate`` call; a one-at-a-time loop was ~10x slower on the tiny model). Sampling stays
reproducible per request whatever else shares its batch: generation runs in greedy mode
over logits that the usual warpers (temperature, top-k, top-p) shape and that get Gumbel
noise from one generator per sequence, seeded ``request.seed + i`` (vLLM's convention);
the arg-max of ``logits / T + Gumbel`` is an exact draw from ``softmax(logits / T)``.
Image special tokens are suppressed (a small model samples them otherwise, and a response
holding them breaks re-encoding later). A trailing assistant prefix is continued
(``continue_final_message``). ``max_dynamic_patch`` caps an image's tiles as on vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mpo.chat import conversation, load_rgb, render_prompt
from mpo.engines.base import Completion, GenerationRequest, SamplingParams

_IMAGE_TOKEN_ATTRS = (
    "image_token_id",
    "start_image_token_id",
    "end_image_token_id",
    "video_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def special_image_token_ids(processor: Any) -> list[int]:
    """Ids of image/video special tokens a processor knows (InternVL, Qwen-VL, ...)."""
    ids = set()
    for owner in (processor, processor.tokenizer):
        for attr in _IMAGE_TOKEN_ATTRS:
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                ids.add(value)
    return sorted(ids)


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel(0, 1) noise to each row from that row's own generator.

    With greedy decoding after it, each row is sampled from the softmax of its (already
    warped) scores, with randomness that depends only on the row's seed.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(uniform.dtype).tiny)))
        return scores.float() + gumbel  # type: ignore[return-value]


def sampling_processors(
    params: SamplingParams, seeds: Sequence[int], device: torch.device | str
) -> LogitsProcessorList:
    """Temperature, top-k, top-p, then per-sequence Gumbel noise (empty for greedy)."""
    if params.greedy:
        return LogitsProcessorList()
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*processors, GumbelNoise(seeds, device)])


def batches(requests: Sequence[GenerationRequest], max_sequences: int) -> Iterator[list[GenerationRequest]]:
    """Runs of consecutive requests with the same params, at most ``max_sequences`` sequences each."""
    batch: list[GenerationRequest] = []
    for request in requests:
        if batch and (
            request.params != batch[0].params or (len(batch) + 1) * request.params.n > max_sequences
        ):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


class TransformersEngine:
    name = "transformers"

    def __init__(
        self,
        model: str,
        device: str | None = None,
        trust_remote_code: bool = False,
        max_batch_sequences: int = 64,
        max_dynamic_patch: int | None = None,
    ) -> None:
        from mpo.engines.tiles import processor_kwargs
        from mpo.logps import load_vlm

        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.model_id = str(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_batch_sequences = max_batch_sequences
        self.image_kwargs = processor_kwargs(self.model_id, max_dynamic_patch)
        loaded, self.processor = load_vlm(self.model_id, self.device, trust_remote_code=trust_remote_code)
        self.model: Any = loaded.eval()
        self.tokenizer = tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = sorted(
            {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id}
            - {None}
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.suppress_ids = special_image_token_ids(self.processor)

    def encode_prompts(
        self, requests: Sequence[GenerationRequest], copies: int = 1
    ) -> dict[str, torch.Tensor]:
        """Left-padded inputs, each request repeated ``copies`` times in a row."""
        prompts: list[str] = []
        images = []
        for request in requests:
            loaded = [load_rgb(p) for p in request.images]
            prompt = render_prompt(
                self.processor, conversation(request.question, len(loaded), request.assistant_prefix)
            )
            prompts += [prompt] * copies
            images += loaded * copies
        inputs = self.processor(
            text=prompts,
            images=images or None,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            **(self.image_kwargs if images else {}),
        )
        return inputs.to(self.device)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        for batch in batches(requests, self.max_batch_sequences):
            out += self._generate_batch(batch)
        return out

    @torch.inference_mode()
    def _generate_batch(self, batch: list[GenerationRequest]) -> list[list[Completion]]:
        params = batch[0].params
        if params.greedy and params.n > 1:
            raise ValueError("greedy decoding (temperature 0) with n > 1 would repeat one answer; use n=1")
        inputs = self.encode_prompts(batch, copies=params.n)
        seeds = [request.seed + i for request in batch for i in range(params.n)]
        output = self.model.generate(
            **inputs,
            max_new_tokens=params.max_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppress_ids or None,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            logits_processor=sampling_processors(params, seeds, self.device),
        )
        rows = [self._completion(row) for row in output[:, inputs["input_ids"].shape[1] :]]
        return [rows[k * params.n : (k + 1) * params.n] for k in range(len(batch))]

    def _completion(self, tokens: torch.Tensor) -> Completion:
        stops = torch.isin(tokens, torch.tensor(self.stop_ids, device=tokens.device)).nonzero()
        if len(stops):
            end = int(stops[0])
            text_ids, count, reason = tokens[:end], end + 1, "stop"
        else:
            text_ids, count, reason = tokens, tokens.numel(), "length"
        text = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True)
        return Completion(text=text, num_tokens=count, finish_reason=reason)

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
