"""lmdeploy adapter (optional extra ``lmdeploy``; needs CUDA or Ascend).

Request shaping lives in plain functions that tests check against the real package's
classes (``pip install --no-deps lmdeploy`` imports without a GPU). What shaped them,
for lmdeploy >= 0.12:

- ``pipeline()`` returns a ``Pipeline`` with no tokenizer attribute, and lmdeploy's own
  ``Tokenizer`` takes no ``add_special_tokens``: DropoutNTP cuts answers with the model's
  Hugging Face tokenizer, loaded on its own (``load_tokenizer``), as on every engine.
- ``GenerationConfig`` samples one response per request and is greedy unless
  ``do_sample=True``: each request fans out into n requests with per-sample
  ``random_seed = seed + i`` (the seeds vLLM would use). It asserts ``temperature <= 2``
  with a bare ``AssertionError``; we refuse such a temperature first, by name.
- ``trust_remote_code`` is a ``pipeline()`` argument (original InternVL checkpoints).
- A trailing assistant message is continued (its end-of-turn marker is cut off).
- Finish reasons are stop, length, abort or error; the last two are failed requests,
  stored as such and never paired.

TurboMind is the fast backend; Qwen2.5-VL runs only on the PyTorch one. lmdeploy pins
its own torch (0.18: torch <= 2.12.1), so it lives in an environment of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpo.engines.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    finish_reason,
    load_tokenizer,
    stop_token_ids,
)

BACKENDS = ("turbomind", "pytorch")
MAX_TEMPERATURE = 2.0  # GenerationConfig's own bound


def backend_kwargs(
    *, tp: int = 1, session_len: int = 8192, cache_max_entry_count: float = 0.8, **backend_options: Any
) -> dict[str, Any]:
    """Keyword arguments of ``TurbomindEngineConfig`` / ``PytorchEngineConfig``; any other field of
    the chosen config class (``max_batch_size``, ``device_type``, ...) passes through as given."""
    return {
        "tp": tp,
        "session_len": session_len,
        "cache_max_entry_count": cache_max_entry_count,
        "enable_prefix_caching": True,
        **backend_options,
    }


def generation_kwargs(
    params: SamplingParams, seed: int, stop_token_ids: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One ``GenerationConfig`` keyword set per sample (n = 1 each, seeds seed + i)."""
    if params.temperature > MAX_TEMPERATURE:
        raise ValueError(
            f"lmdeploy samples at temperature <= {MAX_TEMPERATURE:g}, got {params.temperature:g}; "
            "lower sampling.temperature or use another engine"
        )
    return [
        {
            "n": 1,
            "do_sample": not params.greedy,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else 0,
            "max_new_tokens": params.max_tokens,
            "random_seed": seed + i,
            "stop_token_ids": list(stop_token_ids) or None,
        }
        for i in range(params.n)
    ]


def chat_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """OpenAI-style messages; lmdeploy loads ``image_url`` items from local paths."""
    from mpo.chat import conversation

    paths = iter(request.images)
    messages = conversation(request.question, len(request.images), request.assistant_prefix)
    for message in messages:
        message["content"] = [
            {"type": "image_url", "image_url": {"url": next(paths)}} if item["type"] == "image" else item
            for item in message["content"]
        ]
    return messages


def pipeline_kwargs(model: str, backend: str, trust_remote_code: bool, **options: Any) -> dict[str, Any]:
    """Keyword arguments of ``lmdeploy.pipeline`` (the backend config built from ``options``)."""
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    if backend not in BACKENDS:
        raise ValueError(f"unknown lmdeploy backend {backend!r}; known: {BACKENDS}")
    config_class = TurbomindEngineConfig if backend == "turbomind" else PytorchEngineConfig
    return {
        "model_path": model,
        "backend_config": config_class(**backend_kwargs(**options)),
        "trust_remote_code": trust_remote_code,
    }


class LMDeployEngine:
    name = "lmdeploy"

    def __init__(
        self, model: str, backend: str = "turbomind", trust_remote_code: bool = False, **options: Any
    ) -> None:
        from lmdeploy import pipeline

        self.model_id = str(model)
        self.tokenizer = load_tokenizer(self.model_id, trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.pipe = pipeline(**pipeline_kwargs(self.model_id, backend, trust_remote_code, **options))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        from lmdeploy import GenerationConfig

        prompts, configs, owners = [], [], []
        for index, request in enumerate(requests):
            for kwargs in generation_kwargs(request.params, request.seed, self.stop_ids):
                prompts.append(chat_messages(request))
                configs.append(GenerationConfig(**kwargs))
                owners.append(index)
        responses = self.pipe(prompts, gen_config=configs)
        results: list[list[Completion]] = [[] for _ in requests]
        for owner, response in zip(owners, responses, strict=True):
            results[owner].append(
                Completion(response.text, response.generate_token_len, finish_reason(response.finish_reason))
            )
        return results

    def close(self) -> None:
        self.pipe.close()
