"""torch.distributed set-up for ``torchrun`` (one process per GPU, or CPU processes on gloo).

Without ``WORLD_SIZE`` in the environment everything runs as a single process and
these helpers are no-ops, so the same training code serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_device = torch.device(f"cuda:{local_rank}" if wanted == "cuda" and world > 1 else wanted)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, torch_device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum (float64) of a small tensor over all ranks (identity when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    reduced = values.detach().to(device, torch.float64).clone()
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
