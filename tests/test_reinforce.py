"""train_rl_lora.py: REINFORCE advantages and loss against hand computations, then the script end
to end on the tiny model (fp32 LoRA, 4-bit LoRA, TinyLoRA), resume, and a learning check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_rl_lora as rl

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- advantages

# Two prompts x three samples; sample 4 (prompt 1) is an infra_error.
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.3, 1.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
MASK = torch.tensor([True, True, True, True, False, True])


def test_advantages_without_baseline_are_the_rewards_and_masked_is_zero():
    adv = rl.compute_advantages(REWARDS, GROUPS, "none", {}, MASK)
    assert adv.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])


def test_batch_mean_baseline_uses_kept_samples_only():
    adv = rl.compute_advantages(REWARDS, GROUPS, "batch_mean", {}, MASK)
    mean = (1.0 + 0.0 + 0.5 + 0.0 + 1.0) / 5  # 0.5; the 0.3 of the infra_error is left out
    expected = [1.0 - mean, 0.0 - mean, 0.5 - mean, 0.0 - mean, 0.0, 1.0 - mean]
    assert adv.tolist() == pytest.approx(expected)


def test_rloo_leaves_one_out_per_prompt_and_sums_to_zero():
    adv = rl.compute_advantages(REWARDS, GROUPS, "rloo", {}, MASK)
    # prompt 0: others' means (0+0.5)/2, (1+0.5)/2, (1+0)/2; prompt 1 keeps samples 3 and 5 only.
    expected = [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 0.0 - 1.0, 0.0, 1.0 - 0.0]
    assert adv.tolist() == pytest.approx(expected)
    for group in (0, 1):
        assert float(adv[GROUPS == group].sum()) == pytest.approx(0.0, abs=1e-7)


def test_rloo_equals_scaled_group_mean_advantage():
    # Second way: r_j - mean_{k != j} r_k = n / (n - 1) * (r_j - mean_k r_k).
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = rl.compute_advantages(rewards, groups, "rloo", {})
    for g in (0, 1):
        r = rewards[groups == g]
        assert adv[groups == g].tolist() == pytest.approx((4 / 3 * (r - r.mean())).tolist())


def test_rloo_lone_sample_gets_zero_advantage():
    adv = rl.compute_advantages(
        torch.tensor([1.0, 0.7]), torch.tensor([0, 0]), "rloo", {}, torch.tensor([True, False])
    )
    assert adv.tolist() == [0.0, 0.0]


def test_moving_mean_is_read_before_it_is_updated():
    state: dict = {}
    first = rl.compute_advantages(REWARDS, GROUPS, "moving_mean", state, MASK, decay=0.9)
    assert first.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])  # b_1 = 0
    assert state["moving_mean"] == pytest.approx(0.5)  # first update: the batch mean itself
    second_rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    second = rl.compute_advantages(second_rewards, GROUPS, "moving_mean", state, decay=0.9)
    assert second.tolist() == pytest.approx([0.5, 0.5, 0.5, -0.5, -0.5, -0.5])
    assert state["moving_mean"] == pytest.approx(0.9 * 0.5 + 0.1 * 0.5)
    third = rl.compute_advantages(torch.ones(6), GROUPS, "moving_mean", state, decay=0.9)
    assert third.tolist() == pytest.approx([0.5] * 6)
    assert state["moving_mean"] == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)


def test_moving_mean_ignores_a_batch_of_only_infra_errors():
    state = {"moving_mean": 0.4}
    adv = rl.compute_advantages(
        torch.tensor([1.0, 1.0]), torch.tensor([0, 1]), "moving_mean", state, torch.zeros(2) > 0
    )
    assert adv.tolist() == [0.0, 0.0] and state["moving_mean"] == 0.4


# --------------------------------------------------------------------------- loss

# Two sequences, T-1 = 4 positions; completion tokens at positions 1-3 and 2-3.
LOGPROBS = torch.tensor([[-9.0, -0.5, -1.0, -2.0], [-9.0, -9.0, -0.25, -0.75]])
COMPLETION = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
ADVANTAGES = torch.tensor([2.0, -1.0])


def test_reinforce_loss_sum_aggregation_by_hand():
    loss = rl.reinforce_loss(LOGPROBS, COMPLETION, ADVANTAGES, "sum")
    # -(2 * (-3.5) + (-1) * (-1.0)) / 2
    assert float(loss) == pytest.approx(-(2 * -3.5 + -1 * -1.0) / 2)


def test_reinforce_loss_mean_aggregation_by_hand():
    loss = rl.reinforce_loss(LOGPROBS, COMPLETION, ADVANTAGES, "mean")
    assert float(loss) == pytest.approx(-(2 * (-3.5 / 3) + -1 * (-1.0 / 2)) / 2)


def test_reinforce_loss_micro_batches_add_up_to_the_full_batch():
    full = rl.reinforce_loss(LOGPROBS, COMPLETION, ADVANTAGES, "sum")
    halves = sum(
        rl.reinforce_loss(LOGPROBS[[i]], COMPLETION[[i]], ADVANTAGES[[i]], "sum", num_samples=2)
        for i in range(2)
    )
    assert float(halves) == pytest.approx(float(full))


def test_reinforce_gradient_is_minus_advantage_over_n_per_completion_token():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    rl.reinforce_loss(logprobs, COMPLETION, ADVANTAGES, "sum").backward()
    expected = -(ADVANTAGES[:, None] / 2) * COMPLETION
    assert torch.allclose(logprobs.grad, expected)


def test_masked_sample_contributes_zero_gradient():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    sample_mask = torch.tensor([True, False])
    loss = rl.reinforce_loss(logprobs, COMPLETION, ADVANTAGES, "mean", sample_mask)
    assert loss.item() == pytest.approx(-(2 * (-3.5 / 3)))  # N counts kept samples only
    loss.backward()
    assert torch.all(logprobs.grad[1] == 0)
    assert logprobs.grad[0].abs().sum() > 0


def test_all_zero_rewards_without_baseline_give_exactly_zero_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    ids = torch.randint(0, 11, (3, 6))
    logits = model(ids)[:, :-1]
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    completion = torch.ones_like(logprobs)
    advantages = rl.compute_advantages(torch.zeros(3), torch.arange(3), "none", {})
    rl.reinforce_loss(logprobs, completion, advantages, "sum").backward()
    for p in model.parameters():
        assert torch.count_nonzero(p.grad) == 0


def test_kl_k3_value_and_gradient_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    loss = rl.kl_loss(logprobs, ref, mask, "sum", "k3")
    d = ref - logprobs.detach()
    assert loss.item() == pytest.approx(float((d.exp() - d - 1).sum()))
    loss.backward()
    # d/dlogp (e^d - d - 1) = 1 - e^d
    assert torch.allclose(logprobs.grad, 1 - d.exp())


def test_kl_k1_is_a_score_function_penalty():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -1.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = rl.kl_loss(logprobs, ref, mask, "sum", "k1")
    k1 = ((logprobs.detach() - ref) * mask).sum(-1)  # [-0.5, 0.0]
    seq = (logprobs.detach() * mask).sum(-1)  # [-3.0, -0.5]
    assert loss.item() == pytest.approx(float((k1 * seq).sum() / 2))
    loss.backward()
    assert torch.allclose(logprobs.grad, k1[:, None] / 2 * mask)
