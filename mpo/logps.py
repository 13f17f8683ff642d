"""Log-probabilities of chosen and rejected responses under a VLM, for training and the reference.

Two things make this cheaper than the usual DPO forward:

- **One vision pass per pair.** The image features of a pair are computed once and
  scattered into the token embeddings of both its chosen and its rejected sequence
  (InternVL, TRL and ms-swift run the vision tower on duplicated pixel values instead).
  ``vision_pass="repeat"`` keeps that standard path, for models whose forward cannot take
  ``inputs_embeds`` with image features already in place, and for comparison.
- **No full logits.** Only the hidden states at response positions go through the LM
  head, a chunk of tokens at a time; under autograd each chunk is recomputed in the
  backward pass (activation checkpointing), so at most one chunk × vocabulary of logits
  lives at any moment instead of batch × sequence × vocabulary.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpo.pair_data import PairBatch

VISION_PASSES = ("shared", "repeat")


_LOAD_LOCK = threading.Lock()


def load_vlm(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local directory (offline).

    Loads are serialised in a process: transformers initialises weights under global
    patches of torch (meta device), and two threads loading at once (two pipeline stages
    on a thread-pool task runner) were seen to break each other ("Cannot copy out of meta
    tensor").
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with _LOAD_LOCK:
        model: Any = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code
        )
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return model.to(device), processor


def precision(device: torch.device | str, bf16: bool | None) -> dict[str, str | None]:
    """How a log-prob forward computes: float32 weights, under bf16 autocast when ``bf16`` (default: on
    CUDA). The policy and its reference must compute the same way: bf16 weights on one side and fp32
    weights under autocast on the other give different log-probs for the same model, and the step-0
    margin is no longer zero. Recorded with precomputed reference log-probs and checked by the trainer."""
    device = torch.device(device)
    on = bf16 if bf16 is not None else device.type == "cuda"
    return {"device": device.type, "weights": "float32", "autocast": "bfloat16" if on else None}


def autocast(numerics: dict[str, str | None]) -> AbstractContextManager[Any]:
    """The autocast context a ``precision`` record asks for."""
    if numerics["autocast"] is None:
        return nullcontext()
    return torch.autocast(str(numerics["device"]), dtype=getattr(torch, str(numerics["autocast"])))


# Output processing some models apply to their logits in ``forward`` (Gemma 2/3: tanh soft-capping;
# Cohere: a scale). The log-probs here are built from the LM head directly, so such a model would
# train against log-probs it never produces: it is refused rather than trained silently wrong.
LOGIT_PROCESSING = {"final_logit_softcapping": (None, 0, 0.0), "logit_scale": (None, 1, 1.0)}


def refuse_logit_processing(model: Any) -> None:
    """Raise ``ValueError`` for a model whose config declares logit processing (see ``LOGIT_PROCESSING``)."""
    config = unwrap(model).config
    for owner in (config, getattr(config, "text_config", None)):
        for name, neutral in LOGIT_PROCESSING.items():
            value = getattr(owner, name, None) if owner is not None else None
            if value not in neutral:
                raise ValueError(
                    f"{type(unwrap(model)).__name__} declares {name}={value}: its forward processes "
                    "the logits, which the chunked log-probs of training and the reference skip; "
                    "such models are not supported"
                )


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers stay injected).

    DDP wraps ``PairLogps`` itself, never the model it holds, so there is no ``.module`` to peel.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def image_token_id(model: Any) -> int:
    config = unwrap(model).config
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(unwrap(model)).__name__}: config names no image token id")


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features as (image tokens in order, hidden)."""
    out = unwrap(model).get_image_features(pixel_values=pixel_values)
    features = getattr(out, "pooler_output", None)
    if features is None:
        features = (
            torch.cat([f.reshape(-1, f.shape[-1]) for f in out]) if isinstance(out, (list, tuple)) else out
        )
    return features.reshape(-1, features.shape[-1])


def response_logps(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-sequence sum of log π(token) over response tokens, logits built a chunk at a time."""
    target_mask = response_mask[:, 1:]
    states = hidden[:, :-1][target_mask]  # (N, H): the position before each response token
    targets = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[
        target_mask
    ]

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        return logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)

    recompute = torch.is_grad_enabled() and states.requires_grad
    parts = []
    for start in range(0, states.shape[0], chunk_tokens):
        h, t = states[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        parts.append(checkpoint(chunk_logps, h, t, use_reentrant=False) if recompute else chunk_logps(h, t))
    token_logps = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return sums.index_add(0, rows, token_logps)


class PairLogps(nn.Module):
    """Wraps a VLM: ``forward(batch tensors) -> (2B,)`` response log-prob sums.

    An ``nn.Module`` so that DDP/FSDP wrap it whole and see every parameter used.
    """

    def __init__(self, model: nn.Module, vision_pass: str = "shared", chunk_tokens: int = 1024) -> None:
        super().__init__()
        if vision_pass not in VISION_PASSES:
            raise ValueError(f"vision_pass must be one of {VISION_PASSES}, got {vision_pass!r}")
        refuse_logit_processing(model)
        self.model = model
        self.vision_pass = vision_pass
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        rejected_grad: bool = True,
    ) -> torch.Tensor:
        """``rejected_grad=False`` is for a loss that ignores the rejected responses (the SFT
        baseline): the rejected half then runs without autograd, about a third of its cost,
        and its log-probs still feed the reward metrics."""
        hf = unwrap(self.model)
        if rejected_grad or not torch.is_grad_enabled():
            return self._logps(hf, input_ids, attention_mask, response_mask, pixel_values, copies=2)
        half = input_ids.shape[0] // 2
        features = (
            image_features(hf, pixel_values)
            if pixel_values is not None and self.vision_pass == "shared"
            else None
        )
        parts = []
        for rows, grad in ((slice(None, half), True), (slice(half, None), False)):
            width = int(attention_mask[rows].sum(dim=1).max())  # right-padded: drop this half's pad columns
            with torch.set_grad_enabled(grad):
                parts.append(
                    self._logps(
                        hf,
                        input_ids[rows, :width],
                        attention_mask[rows, :width],
                        response_mask[rows, :width],
                        pixel_values,
                        copies=1,
                        features=features if grad or features is None else features.detach(),
                    )
                )
        return torch.cat(parts)

    def _logps(
        self,
        hf: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        copies: int,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-prob sums of sequences that hold ``copies`` times the images of ``pixel_values``."""
        base = hf.base_model
        if pixel_values is not None and self.vision_pass == "repeat":
            hidden = base(
                input_ids=input_ids,
                pixel_values=torch.cat([pixel_values] * copies),
                attention_mask=attention_mask,
                use_cache=False,
            ).last_hidden_state
        else:
            embeds = hf.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                if features is None:
                    features = image_features(hf, pixel_values)
                image_positions = (input_ids == image_token_id(hf)).unsqueeze(-1)
                embeds = embeds.masked_scatter(
                    image_positions, torch.cat([features.to(embeds.dtype)] * copies)
                )
            hidden = base(
                inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        return response_logps(hidden, hf.get_output_embeddings(), input_ids, response_mask, self.chunk_tokens)

    def batch_logps(self, batch: PairBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.attention_mask, batch.response_mask, batch.pixel_values)


def split_pairs(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,)."""
    chosen, rejected = logps.chunk(2)
    return chosen, rejected
