"""The MPO loss against numbers worked out by hand, and against TRL's own loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mpo.loss import DeltaMode, MPOLossConfig, RewardShift, SFTReduction, bco_pair, dpo_sigmoid, mpo_loss, sft


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_policy_equal_to_reference_starts_at_0_83_plus_sft() -> None:
    logp = t(-4.0, -9.0)
    out = mpo_loss(logp, t(-5.0, -7.0), logp, t(-5.0, -7.0), t(2, 3), MPOLossConfig(), RewardShift())
    assert out.dpo.item() == pytest.approx(math.log(2))
    assert out.bco.item() == pytest.approx(2 * math.log(2))
    assert out.sft.item() == pytest.approx((4 / 2 + 9 / 3) / 2)
    assert out.loss.item() == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + 2.5)
    assert 0.8 * out.dpo.item() + 0.2 * out.bco.item() == pytest.approx(0.8318, abs=1e-4)


def test_hand_computed_single_pair() -> None:
    # Δc = 2, Δr = -3, β = 0.1: rewards 0.2 and -0.3, δ = their mean = -0.05.
    out = mpo_loss(t(-6.0), t(-8.0), t(-8.0), t(-5.0), t(3), MPOLossConfig(), RewardShift())
    assert out.delta == pytest.approx(-0.05)
    assert out.dpo.item() == pytest.approx(0.47407698, abs=1e-7)  # log(1 + e^-0.5)
    assert out.bco.item() == pytest.approx(2 * 0.57593942, abs=1e-7)  # 2·log(1 + e^-0.25)
    assert out.sft.item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(0.8 * 0.47407698 + 0.2 * 1.15187884 + 2.0, abs=1e-6)
    assert out.metrics()["reward_margin"] == pytest.approx(0.5)
    assert out.metrics()["reward_accuracy"] == 1.0


def test_weights_and_beta_are_configurable() -> None:
    config = MPOLossConfig(beta=0.5, dpo_weight=1.0, bco_weight=0.0, sft_weight=0.0)
    out = mpo_loss(t(-6.0), t(-8.0), t(-8.0), t(-5.0), t(3), config, RewardShift())
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.5)))


def test_sft_reductions_differ_as_documented() -> None:
    logp, tokens = t(-6.0, -4.0), t(3, 1)
    assert sft(logp, tokens, SFTReduction.SEQUENCE).item() == pytest.approx((2 + 4) / 2)
    assert sft(logp, tokens, SFTReduction.TOKEN).item() == pytest.approx(10 / 4)


def test_terms_by_hand() -> None:
    assert dpo_sigmoid(t(1.0), t(1.0), 0.1).item() == pytest.approx(math.log(2))
    assert bco_pair(t(0.0), t(0.0), 0.1, 0.0).item() == pytest.approx(2 * math.log(2))
    # δ shifts both rewards: with δ = βΔc = βΔr the BCO term is its neutral 2·ln 2 again.
    assert bco_pair(t(3.0), t(3.0), 0.1, 0.3).item() == pytest.approx(2 * math.log(2))


def test_cumulative_shift_is_count_weighted_and_updated_before_use() -> None:
    shift = RewardShift(DeltaMode.CUMULATIVE)
    assert shift.update(t(0.2, -0.3)) == pytest.approx(-0.05)
    assert shift.update(t(1.0, 0.0, 0.5, 0.5)) == pytest.approx(1.9 / 6)
    # The loss of a batch sees δ *after* that batch was folded in.
    shift = RewardShift()
    out = mpo_loss(t(-1.0), t(-1.0), t(-2.0), t(-2.0), t(1), MPOLossConfig(), shift)
    assert out.delta == pytest.approx(0.1)


def test_ema_shift_starts_at_first_mean() -> None:
    shift = RewardShift(DeltaMode.EMA, momentum=0.9)
    assert shift.update(t(0.2, -0.3)) == pytest.approx(-0.05)
    assert shift.update(t(0.5, 0.5)) == pytest.approx(0.9 * -0.05 + 0.1 * 0.5)


def test_evaluation_does_not_move_the_shift() -> None:
    shift = RewardShift()
    shift.update(t(1.0, 2.0))
    out = mpo_loss(t(-1.0), t(-9.0), t(-5.0), t(-5.0), t(1), MPOLossConfig(), shift, update_shift=False)
    assert out.delta == pytest.approx(1.5)
    assert shift.state_dict()["count"] == 2


def test_shift_state_round_trips_and_checks_mode() -> None:
    shift = RewardShift(DeltaMode.EMA)
    shift.update(t(0.4, 0.2))
    restored = RewardShift(DeltaMode.EMA)
    restored.load_state_dict(shift.state_dict())
    assert restored.update(t(1.0)) == shift.update(t(1.0))
    with pytest.raises(ValueError, match="mode"):
        RewardShift(DeltaMode.CUMULATIVE).load_state_dict(shift.state_dict())


def test_gradient_flows_only_through_the_policy() -> None:
    policy_c = torch.tensor([-3.0], requires_grad=True)
    policy_r = torch.tensor([-3.0], requires_grad=True)
    out = mpo_loss(
        policy_c,
        policy_r,
        t(-3.0).float(),
        t(-3.0).float(),
        torch.tensor([3]),
        MPOLossConfig(),
        RewardShift(),
    )
    out.loss.backward()
    assert policy_c.grad is not None and policy_c.grad.item() < 0  # raising log π(chosen) lowers the loss
    assert policy_r.grad is not None and policy_r.grad.item() > 0


# --- parity with TRL's DPOTrainer loss code (dev extra) -------------------------------------------


def _trl_loss(
    loss_types: list[str],
    weights: list[float],
    per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> float:
    """Run TRL's own ``DPOTrainer._compute_loss`` on given per-token log-probs.

    The model is replaced by an object returning those log-probs from TRL's fused LM head
    output fields; everything after that (the loss types, weights, reductions) is TRL's code.
    """
    trl = pytest.importorskip("trl")
    seq = mask.shape[1] + 1
    completion_mask = torch.cat([torch.zeros(mask.shape[0], 1, dtype=torch.long), mask.long()], dim=1)
    outputs = SimpleNamespace(
        log_probs=per_token_logps * mask,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(mask).bool(),
    )
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(mask.shape[0], seq, dtype=torch.long),
        "attention_mask": torch.ones(mask.shape[0], seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    return float(loss)


def test_parity_with_trl_sigmoid_bco_without_shift_and_token_mean_sft() -> None:
    generator = torch.Generator().manual_seed(0)
    pairs, length = 3, 7
    per_token = -torch.rand(2 * pairs, length, generator=generator, dtype=torch.float64) * 3
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row, n in enumerate([3, 5, 7, 2, 6, 4]):
        mask[row, length - n :] = 1
    logps = (per_token * mask).sum(1)
    chosen, rejected = logps[:pairs], logps[pairs:]
    ref_chosen, ref_rejected = chosen + t(0.5, -1.0, 2.0), rejected + t(-0.7, 0.3, 1.1)
    tokens = mask[:pairs].sum(1)

    theirs = _trl_loss(["sigmoid", "sft"], [0.8, 1.0], per_token, mask, ref_chosen, ref_rejected, beta=0.1)
    config = MPOLossConfig(bco_weight=0.0, sft_reduction=SFTReduction.TOKEN)
    ours = mpo_loss(chosen, rejected, ref_chosen, ref_rejected, tokens, config, RewardShift()).loss.item()
    assert ours == pytest.approx(theirs, rel=1e-9)

    # TRL >= 0.29's bco_pair has no δ: ours with δ pinned at 0 must match it.
    theirs_bco = _trl_loss(["bco_pair"], [1.0], per_token, mask, ref_chosen, ref_rejected, beta=0.1)
    ours_bco = bco_pair(chosen - ref_chosen, rejected - ref_rejected, 0.1, 0.0).mean().item()
    assert ours_bco == pytest.approx(theirs_bco, rel=1e-9)
