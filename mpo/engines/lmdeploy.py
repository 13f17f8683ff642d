"""lmdeploy adapter (optional extra ``lmdeploy``; needs a GPU).

lmdeploy's ``GenerationConfig`` samples one response per request and is greedy unless
``do_sample=True``; so each request fans out into n requests with per-sample
``random_seed = seed + i`` (the same seeds vLLM would use). A trailing assistant message
is continued. TurboMind is the fast backend; Qwen2.5-VL runs only on the PyTorch one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpo.engines.base import Completion, GenerationRequest, SamplingParams

BACKENDS = ("turbomind", "pytorch")


def backend_kwargs(*, tp: int = 1, session_len: int = 8192, cache_max_entry_count: float = 0.8) -> dict[str, Any]:
    """Keyword arguments of ``TurbomindEngineConfig`` / ``PytorchEngineConfig``."""
    return {"tp": tp, "session_len": session_len, "cache_max_entry_count": cache_max_entry_count,
            "enable_prefix_caching": True}


def generation_kwargs(params: SamplingParams, seed: int) -> list[dict[str, Any]]:
    """One ``GenerationConfig`` keyword set per sample (n = 1 each, seeds seed + i)."""
    return [
        {"n": 1, "do_sample": not params.greedy, "temperature": params.temperature, "top_p": params.top_p,
         "top_k": params.top_k if params.top_k > 0 else 0, "max_new_tokens": params.max_tokens,
         "random_seed": seed + i}
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


class LMDeployEngine:
    name = "lmdeploy"

    def __init__(self, model: str, backend: str = "turbomind", trust_remote_code: bool = False, **options: Any) -> None:
        from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig, pipeline

        if backend not in BACKENDS:
            raise ValueError(f"unknown lmdeploy backend {backend!r}; known: {BACKENDS}")
        config_class = TurbomindEngineConfig if backend == "turbomind" else PytorchEngineConfig
        self.model_id = str(model)
        self.pipe = pipeline(self.model_id, backend_config=config_class(**backend_kwargs(**options)))
        self.tokenizer = self.pipe.tokenizer

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        from lmdeploy import GenerationConfig

        prompts, configs, owners = [], [], []
        for index, request in enumerate(requests):
            for kwargs in generation_kwargs(request.params, request.seed):
                prompts.append(chat_messages(request))
                configs.append(GenerationConfig(**kwargs))
                owners.append(index)
        responses = self.pipe(prompts, gen_config=configs)
        results: list[list[Completion]] = [[] for _ in requests]
        for owner, response in zip(owners, responses, strict=True):
            reason = "length" if response.finish_reason == "length" else "stop"
            results[owner].append(Completion(response.text, response.generate_token_len, reason))
        return results

    def close(self) -> None:
        self.pipe.close()
