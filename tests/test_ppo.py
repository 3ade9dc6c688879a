"""PPO (train_ppo_lora.py): the math with numbers, then the script end to end on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

import train_ppo_lora as ppo

# --------------------------------------------------------------------------- GAE two ways


def gae_closed_form(rewards, values, mask, gamma, lam):
    """GAE as discounted sums of TD residuals, episode by episode (float64, no recursion).

    Each maximal run of 1s in a row of ``mask`` is one episode [s, e]; with
    ``delta_t = r_t + gamma * V_{t+1} * [t < e] - V_t``, ``A_t = sum_{j=t..e} (gamma lam)^(j-t)
    delta_j``, computed as one matrix product per episode.
    """
    rewards, values, mask = (x.double() for x in (rewards, values, mask))
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        for start, end in episodes(mask[row]):
            r, v = rewards[row, start : end + 1], values[row, start : end + 1]
            next_v = torch.cat([v[1:], v.new_zeros(1)])
            delta = r + gamma * next_v - v
            n = end - start + 1
            power = torch.arange(n)[None, :] - torch.arange(n)[:, None]
            discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0).double(), 0.0)
            advantages[row, start : end + 1] = discount @ delta
    return advantages, (advantages + values) * mask


def episodes(mask_row):
    runs, start = [], None
    for t, m in enumerate(mask_row.tolist() + [0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t - 1))
            start = None
    return runs


def random_padded_batch(seed, batch=6, width=12):
    """Rewards / values with a prompt part, a completion part and right padding per row."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, width, generator=g)
    values = torch.randn(batch, width, generator=g)
    mask = torch.zeros(batch, width)
    for row in range(batch):
        prompt = int(torch.randint(0, 4, (1,), generator=g))
        length = int(torch.randint(1, width - prompt + 1, (1,), generator=g))
        mask[row, prompt : prompt + length] = 1
    return rewards, values, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_recursion_matches_closed_form(seed, gamma, lam):
    rewards, values, mask = random_padded_batch(seed)
    adv, ret = ppo.compute_gae(rewards.double(), values.double(), mask.double(), gamma, lam)
    adv_ref, ret_ref = gae_closed_form(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-10, atol=1e-10)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_special_cases_by_hand():
    # Two padding positions before and one after a 3-token completion; reward on the last token.
    rewards = torch.tensor([[9.0, 9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[5.0, 5.0, 0.5, 0.25, 0.75, 5.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    # lambda = 1, gamma = 1: advantage = Monte Carlo return (1) minus the value.
    adv, ret = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.5, 0.75, 0.25, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0]]))
    # lambda = 0: one-step TD residuals, bootstrapping from the next value; none after the end.
    adv, _ = ppo.compute_gae(rewards, values, mask, 0.5, 0.0)
    expected = [0.0 + 0.5 * 0.25 - 0.5, 0.0 + 0.5 * 0.75 - 0.25, 1.0 - 0.75]
    torch.testing.assert_close(adv[0, 2:5], torch.tensor(expected))


# --------------------------------------------------------------------------- losses by hand


def test_ppo_policy_loss_by_hand_token_level():
    ratios = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.1, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the ratio-3 entry is padding
    new = ratios.log().requires_grad_()
    loss, clip_frac = ppo.ppo_policy_loss(new, torch.zeros(2, 3), advantages, mask, clip=0.2)
    # A > 0, r = 1.5: clipped at 1.2 -> -1.2 (clipped term active)
    # A > 0, r = 0.5: min(0.5, 0.8) * 1 -> -0.5 (unclipped active: no reward for going lower)
    # A < 0, r = 1.5: -(-1) * 1.5 = 1.5 (unclipped active: the pessimistic bound)
    # A < 0, r = 0.5: clipped at 0.8 -> 0.8 (clipped term active)
    # A = 2, r = 1.1 inside the range -> -2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5)
    assert clip_frac.item() == pytest.approx(2 / 5)
    loss.backward()
    # Where the clipped term is active the gradient is zero; elsewhere d/dlogp (-A r) / N.
    expected = torch.tensor([[0.0, -0.5, 1.5], [0.0, -2.2, 0.0]]) / 5
    torch.testing.assert_close(new.grad, expected)


def test_ppo_policy_loss_sequence_level_matches_seed_formula():
    new_seq = torch.tensor([-10.0, -20.0, -5.0, -7.0])
    old_seq = torch.tensor([-10.5, -19.0, -5.0, -6.0])
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0])
    loss, clip_frac = ppo.ppo_policy_loss(new_seq, old_seq, adv, torch.ones(4), clip=0.2)
    ratio = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(-1.0)]
    seed = [
        -min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(ratio, adv.tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(sum(seed) / 4)
    # Clipped term active: sample 0 (A > 0, r > 1.2); samples 1 and 3 have A < 0 and r < 0.8.
    assert clip_frac.item() == pytest.approx(3 / 4)


def test_value_loss_by_hand_with_and_without_clipping():
    values = torch.tensor([[1.0, 2.0, 7.0]])
    old = torch.zeros(1, 3)
    returns = torch.tensor([[3.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo.value_loss(values, old, returns, mask).item() == pytest.approx(0.5 * (4 + 1) / 2)
    # Clipped to old +- 0.5 = 0.5: (0.5 - 3)^2 = 6.25 is larger than both unclipped errors.
    clipped = ppo.value_loss(values, old, returns, mask, clip=0.5)
    assert clipped.item() == pytest.approx(0.5 * 6.25)


def test_explained_variance_on_known_vectors():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    ev = ppo.explained_variance
    assert ev(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert ev(torch.zeros(5), returns, mask) == pytest.approx(0.0)
    assert ev(returns + 1.0, returns, mask) == pytest.approx(1.0)  # a constant offset
    # Residuals (-3, -1, 1, 3): variance 20/3 against Var(R) = 5/3 -> 1 - 4.
    assert ev(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]), returns, mask) == pytest.approx(-3.0)
    assert math.isnan(ev(torch.zeros(3), torch.ones(3), torch.ones(3)))


def test_approx_kl_k3_and_whitening():
    new = torch.tensor([[0.0, math.log(2.0)]])
    old = torch.zeros(1, 2)
    # k3 = (r - 1) - log r: 0 for r = 1, 1 - log 2 for r = 2.
    assert ppo.approx_kl(new, old, torch.ones(1, 2)) == pytest.approx((1 - math.log(2)) / 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_sequence_advantages_are_batch_normalised_rewards():
    adv = ppo.normalize_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert ppo.normalize_rewards(torch.tensor([0.7])).item() == 0.0


def test_token_rewards_put_score_on_last_completion_token_and_penalise_kl():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -2.0, -3.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([1.0, -0.5]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, -1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    expected = torch.tensor([[0.0, 0.1, -0.1 + 1.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 0.5]])
    torch.testing.assert_close(rewards, expected)
