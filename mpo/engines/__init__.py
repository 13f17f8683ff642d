"""Sampling engines behind one small interface (``mpo.engines.base.Engine``).

``transformers`` runs anywhere (CPU or CUDA) and is the embedded default; ``vllm`` and
``lmdeploy`` are optional GPU extras, imported only when their engine is built.
"""

from __future__ import annotations

from typing import Any

from mpo.engines.base import Completion, Engine, GenerationRequest, SamplingParams

ENGINES = ("transformers", "vllm", "lmdeploy")


def load_engine(name: str, model: str, **options: Any) -> Engine:
    """Build engine ``name`` for ``model`` (a local checkpoint folder or hub id)."""
    if name == "transformers":
        from mpo.engines.hf import TransformersEngine

        return TransformersEngine(model, **options)
    if name == "vllm":
        from mpo.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    if name == "lmdeploy":
        from mpo.engines.lmdeploy import LMDeployEngine

        return LMDeployEngine(model, **options)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Completion", "Engine", "GenerationRequest", "SamplingParams", "load_engine"]
