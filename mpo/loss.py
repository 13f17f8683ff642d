"""The MPO loss (arXiv 2411.10442), pure torch: 0.8·DPO + 0.2·BCO + 1.0·SFT by default.

Inputs are per-sequence log-probabilities summed over response tokens, for the policy
and the reference, so the loss never sees logits and can be unit-tested with numbers
worked out by hand. With Δc = log πθ(y_c|x) − log π_ref(y_c|x), Δr likewise:

- DPO (sigmoid): −log σ(β(Δc − Δr));
- BCO (pair):    −log σ(βΔc − δ) − log σ(−(βΔr − δ)), δ a running mean of the rewards
  (``RewardShift``), updated from the current batch *before* use, all-reduced across
  ranks, frozen in evaluation, saved in checkpoints. TRL ≥ 0.29 dropped δ; we keep it;
- SFT: −log π(y_c|x)/|y_c| per sequence, averaged over the batch (the paper), or a token
  mean over the batch (what TRL and ms-swift do).

With the policy equal to the reference, the preference part starts at
0.8·ln 2 + 0.2·2·ln 2 ≈ 0.83; the SFT term comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class SFTReduction(StrEnum):
    SEQUENCE = "sequence"  # mean over sequences of the per-token mean (paper)
    TOKEN = "token"  # mean over every chosen token of the batch (TRL, ms-swift)


class DeltaMode(StrEnum):
    CUMULATIVE = "cumulative"  # mean of every reward seen so far (InternVL, TRL <= 0.28)
    EMA = "ema"  # exponential moving average (NeMo-RL)


class MPOLossConfig(BaseModel):
    """Weights and knobs of the loss; defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, description="KL strength β of DPO and BCO")
    dpo_weight: float = Field(0.8, ge=0, description="weight of the sigmoid DPO term")
    bco_weight: float = Field(0.2, ge=0, description="weight of the pairwise BCO term")
    sft_weight: float = Field(1.0, ge=0, description="weight of the SFT term on chosen responses")
    sft_reduction: SFTReduction = Field(SFTReduction.SEQUENCE, description="sequence (paper) or token (TRL)")
    delta_mode: DeltaMode = Field(
        DeltaMode.CUMULATIVE, description="running mean kind of the BCO reward shift δ"
    )
    delta_momentum: float = Field(0.99, gt=0, lt=1, description="EMA momentum of δ")


class RewardShift:
    """The BCO reward shift δ: a running mean of the rewards βΔc and βΔr.

    ``update`` folds in one batch (all ranks' rewards when torch.distributed is up) and
    returns the new δ, which the batch then uses. Cumulative mode keeps the sum and count
    of every reward seen (count-weighted, so a short last batch weighs what it holds);
    EMA mode starts at the first batch's mean, then δ ← m·δ + (1 − m)·batch mean.
    """

    def __init__(self, mode: DeltaMode = DeltaMode.CUMULATIVE, momentum: float = 0.99) -> None:
        self.mode = DeltaMode(mode)
        self.momentum = momentum
        self.total = 0.0
        self.count = 0
        self.value = 0.0

    def update(self, rewards: torch.Tensor) -> float:
        stats = torch.tensor(
            [rewards.detach().double().sum().item(), float(rewards.numel())], dtype=torch.float64
        )
        if dist.is_available() and dist.is_initialized():
            backend_device = rewards.device if dist.get_backend() == "nccl" else torch.device("cpu")
            stats = stats.to(backend_device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        batch_sum, batch_count = float(stats[0]), int(stats[1])
        if batch_count == 0:
            return self.value
        if self.mode is DeltaMode.CUMULATIVE:
            self.total += batch_sum
            self.count += batch_count
            self.value = self.total / self.count
        else:
            batch_mean = batch_sum / batch_count
            self.value = (
                batch_mean
                if self.count == 0
                else self.momentum * self.value + (1 - self.momentum) * batch_mean
            )
            self.count += batch_count
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "momentum": self.momentum,
            "total": self.total,
            "count": self.count,
            "value": self.value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if DeltaMode(state["mode"]) is not self.mode:
            raise ValueError(
                f"checkpoint δ mode {state['mode']!r} differs from the configured {self.mode.value!r}"
            )
        self.momentum = float(state["momentum"])
        self.total, self.count, self.value = float(state["total"]), int(state["count"]), float(state["value"])


def dpo_sigmoid(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair −log σ(β(Δc − Δr))."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def bco_pair(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """Per-pair −log σ(βΔc − δ) − log σ(−(βΔr − δ))."""
    return -F.logsigmoid(beta * chosen_logratio - delta) - F.logsigmoid(-(beta * rejected_logratio - delta))


def sft(chosen_logp: torch.Tensor, chosen_tokens: torch.Tensor, reduction: SFTReduction) -> torch.Tensor:
    """Negative log-likelihood of the chosen responses, length-normalised."""
    tokens = chosen_tokens.to(chosen_logp.dtype).clamp(min=1)
    if SFTReduction(reduction) is SFTReduction.SEQUENCE:
        return (-chosen_logp / tokens).mean()
    return -chosen_logp.sum() / tokens.sum()


@dataclass
class MPOLossOutput:
    """The total loss (with grad) and its parts, detached, for metrics."""

    loss: torch.Tensor
    dpo: torch.Tensor
    bco: torch.Tensor
    sft: torch.Tensor
    chosen_rewards: torch.Tensor  # βΔc per pair
    rejected_rewards: torch.Tensor  # βΔr per pair
    delta: float

    def metrics(self) -> dict[str, float]:
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": self.loss.item(),
            "dpo": self.dpo.item(),
            "bco": self.bco.item(),
            "sft": self.sft.item(),
            "reward_chosen": self.chosen_rewards.mean().item(),
            "reward_rejected": self.rejected_rewards.mean().item(),
            "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
            "delta": self.delta,
        }


def mpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    chosen_tokens: torch.Tensor,
    config: MPOLossConfig,
    shift: RewardShift,
    update_shift: bool = True,
    counted: bool = True,
) -> MPOLossOutput:
    """0.8·DPO + 0.2·BCO + 1.0·SFT (weights from ``config``) over one batch of pairs.

    ``update_shift=False`` (evaluation) reads δ without folding this batch in.
    ``counted=False`` is a placeholder batch (a rank with nothing to train, kept in step with
    the others): δ's update still runs, with its all-reduce, but folds in none of its rewards.
    """
    chosen_logratio = policy_chosen_logp - ref_chosen_logp.to(policy_chosen_logp.dtype)
    rejected_logratio = policy_rejected_logp - ref_rejected_logp.to(policy_rejected_logp.dtype)
    chosen_rewards = (config.beta * chosen_logratio).detach()
    rejected_rewards = (config.beta * rejected_logratio).detach()
    rewards = torch.cat([chosen_rewards, rejected_rewards])
    delta = shift.update(rewards if counted else rewards[:0]) if update_shift else shift.value
    dpo = dpo_sigmoid(chosen_logratio, rejected_logratio, config.beta).mean()
    bco = bco_pair(chosen_logratio, rejected_logratio, config.beta, delta).mean()
    nll = sft(policy_chosen_logp, chosen_tokens, config.sft_reduction)
    total = config.dpo_weight * dpo + config.bco_weight * bco + config.sft_weight * nll
    return MPOLossOutput(
        total, dpo.detach(), bco.detach(), nll.detach(), chosen_rewards, rejected_rewards, delta
    )
