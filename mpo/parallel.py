"""Data parallelism for the trainer: DDP (a full model per process) or FSDP2 (sharded).

FSDP is for models that do not fit one GPU with their optimizer state (full fine-tuning
of an 8B model with AdamW needs ~128 GB before activations): every transformer block
(any ``layers``/``layer``/``blocks`` module list, vision encoder included) becomes its
own shard group, the rest (embeddings, LM head, projector) the root group. Checkpoints
are gathered to full tensors on rank 0, so they stay plain HF folders that load anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

Strategy = Literal["ddp", "fsdp"]
_BLOCK_LISTS = ("layers", "layer", "blocks")


def wrap(
    forward: nn.Module, strategy: Strategy, device: torch.device, find_unused_parameters: bool
) -> nn.Module:
    """Return the module to call for training (``forward`` itself is sharded in place by FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for name, module in list(forward.named_modules()):
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
                for block in module:
                    fully_shard(block)
        fully_shard(forward)
        return forward
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        forward,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


@contextmanager
def gradient_sync(module: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (DDP ``no_sync``, FSDP2 flag)."""
    if sync:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    norm: Any = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_model_state(model: nn.Module) -> dict[str, Any] | None:
    """Full, CPU state dict of a sharded model (a collective: call on every rank); None when not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state to checkpoint (gathered to full tensors when sharded; collective then)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
