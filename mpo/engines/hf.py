"""The transformers engine: ``AutoModelForImageTextToText`` + ``AutoProcessor``, CPU or CUDA.

Each request is one batched ``generate`` call with ``num_return_sequences = n``, seeded
with the request's seed, so a request's samples are reproducible whatever else runs.
Image special tokens are suppressed (a small model samples them otherwise, and a
response holding them breaks re-encoding later). A trailing assistant prefix is
continued (``continue_final_message``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mpo.chat import conversation, load_rgb, render_prompt
from mpo.engines.base import Completion, GenerationRequest

_IMAGE_TOKEN_ATTRS = ("image_token_id", "start_image_token_id", "end_image_token_id", "video_token_id",
                      "image_start_token_id", "image_end_token_id", "vision_start_token_id", "vision_end_token_id")


def special_image_token_ids(processor: Any) -> list[int]:
    """Ids of image/video special tokens a processor knows (InternVL, Qwen-VL, ...)."""
    ids = set()
    for owner in (processor, processor.tokenizer):
        for attr in _IMAGE_TOKEN_ATTRS:
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                ids.add(value)
    return sorted(ids)


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: str, device: str | None = None, trust_remote_code: bool = False) -> None:
        from mpo.logps import load_vlm

        self.model_id = str(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded, self.processor = load_vlm(self.model_id, self.device, trust_remote_code=trust_remote_code)
        self.model: Any = loaded.eval()
        self.tokenizer = tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                                tokenizer.eos_token_id} - {None})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.suppress_ids = special_image_token_ids(self.processor)

    def encode_prompt(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        images = [load_rgb(p) for p in request.images]
        prompt = render_prompt(self.processor, conversation(request.question, len(images), request.assistant_prefix))
        return self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.device)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return [self._generate_one(r) for r in requests]

    @torch.inference_mode()
    def _generate_one(self, request: GenerationRequest) -> list[Completion]:
        params = request.params
        inputs = self.encode_prompt(request)
        options: dict[str, Any] = {
            "max_new_tokens": params.max_tokens, "num_return_sequences": params.n, "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id, "suppress_tokens": self.suppress_ids or None,
        }
        if params.greedy:
            if params.n > 1:
                raise ValueError("greedy decoding (temperature 0) with n > 1 would repeat one answer; use n=1")
            options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k if params.top_k > 0 else None)
        torch.manual_seed(request.seed)
        output = self.model.generate(**inputs, **options)
        return [self._completion(row) for row in output[:, inputs["input_ids"].shape[1]:]]

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
