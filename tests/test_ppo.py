"""PPO (train_ppo_lora.py): the math with numbers (GAE two ways, the losses by hand), then the
update on the tiny model against the policy gradient and the full-vocabulary computation. The
script's options and its runs end to end are in tests/test_ppo_script.py."""

from __future__ import annotations

import math
import random

import pytest
import torch

import train_ppo_lora as ppo
from coderl.logprobs import pack_rows
from coderl.models import disable_dropout
from coderl.rollouts import Rollout
from coderl.training import build_optimizer, count_trainable, load_policy
from coderl.value_model import VALUE_HEAD_FILE
from tests.helpers import PPO_SEQUENCE as SEQUENCE
from tests.helpers import PPO_TOKEN as TOKEN
from tests.helpers import full_vocab_logprobs_of_batch
from train_ppo_lora import PPOTrainArgs

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


def test_token_rewards_skip_a_row_without_completion_tokens():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    rewards, _ = ppo.token_rewards(
        torch.tensor([1.0, 7.0]), torch.zeros(2, 3), torch.zeros(2, 3), mask, kl_coef=0.1
    )
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_token_rewards_put_score_on_last_completion_token_and_penalise_kl():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -2.0, -3.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([1.0, -0.5]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, -1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    expected = torch.tensor([[0.0, 0.1, -0.1 + 1.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 0.5]])
    torch.testing.assert_close(rewards, expected)


# --------------------------------------------------------------------------- on the tiny model


def tiny_policy(model_dir, variant=TOKEN, adapter="lora", quantization="none", dropout=0.0):
    """The script's policy (+ value head for the token variant) on a tiny model, fresh adapter."""
    args = ppo.RLModelArgs(
        model=str(model_dir), quantization=quantization, adapter=adapter, lora_dropout=dropout
    )
    policy, tokenizer = load_policy(args)
    head = ppo.build_value_head(policy, None, "cpu") if variant == TOKEN else None
    model = ppo.PolicyWithValue(policy, head)
    disable_dropout(model)
    model.train()
    return model, tokenizer


def fake_rollouts(count=6, seed=0, vocab=1000):
    """Rollouts of random ids with unequal prompt / completion lengths and varied rewards."""
    g = random.Random(seed)
    rewards = [1.0, 0.0, 0.5, -0.2, 1.0, 0.0]
    return [
        Rollout(
            task_index=i,
            sample_index=0,
            task={"task_id": f"t{i}"},
            prompt_ids=[g.randrange(8, vocab) for _ in range(g.randint(4, 9))],
            completion_ids=[g.randrange(8, vocab) for _ in range(g.randint(2, 7))],
            text="",
            code="",
            num_tokens=0,
            truncated=False,
            result=None,
            reward=rewards[i % len(rewards)],
        )
        for i in range(count)
    ]


def randomize_adapter(model, seed=0):
    """Move the adapter away from its init (LoRA B = 0 would make A's gradient vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def adapter_parameters(model):
    return [p for p in model.policy.parameters() if p.requires_grad]


def frozen_snapshot(model):
    return {
        n: p.detach().clone() for n, p in model.policy.named_parameters() if not p.requires_grad
    }


@pytest.mark.parametrize("variant", [TOKEN, SEQUENCE])
def test_first_update_at_ratio_one_has_the_policy_gradient(tiny_model_dir, variant):
    model, tokenizer = tiny_policy(tiny_model_dir, variant)
    randomize_adapter(model)
    args = ppo.PPOArgs(variant=variant, num_minibatches=1, ppo_epochs=1, vf_coef=0.0, ent_coef=0.0)
    batch, _ = ppo.make_batch(model, fake_rollouts(), tokenizer.pad_token_id, args, 1.0, "cpu")
    rows = torch.arange(batch.size)
    loss, _, log_ratio = ppo.minibatch_loss(model, batch, rows, args, 1.0)
    # Old log-probs were recomputed in the update's own mode: the ratio is 1 before any step.
    assert log_ratio.abs().max().item() < 1e-5
    params = adapter_parameters(model)
    ppo_grads = torch.autograd.grad(loss, params)

    logprobs, _, _ = model(batch.rows)
    if variant == TOKEN:  # REINFORCE on every completion token with the same advantages
        reinforce = -ppo.masked_mean(batch.advantages * logprobs, batch.mask)
    else:  # the seed's REINFORCE: -A * log p(completion)
        reinforce = -(batch.advantages * (logprobs * batch.mask).sum(1)).mean()
    pg_grads = torch.autograd.grad(reinforce, params)
    assert sum(g.norm() for g in pg_grads) > 1e-4
    for a, b in zip(ppo_grads, pg_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant", [TOKEN, SEQUENCE])
def test_infra_errors_and_empty_completions_change_nothing(tiny_model_dir, variant):
    """Masked samples stay in the batch (same passes on every process) but weigh nothing: not in
    the advantage statistics, not in the loss."""
    model, tokenizer = tiny_policy(tiny_model_dir, variant)
    randomize_adapter(model)
    args = ppo.PPOArgs(variant=variant, num_minibatches=1, ppo_epochs=1)
    clean = fake_rollouts()
    infra, empty = fake_rollouts(count=2, seed=1)
    infra.mask, infra.reward = False, 0.0
    empty.completion_ids, empty.reward = [], 0.5
    losses = []
    for rollouts in (clean, [infra, *clean[:3], empty, *clean[3:]]):
        batch, _ = ppo.make_batch(model, rollouts, tokenizer.pad_token_id, args, 1.0, "cpu")
        loss, _, _ = ppo.minibatch_loss(model, batch, torch.arange(batch.size), args, 1.0)
        losses.append(loss.item())
    assert batch.sample_mask.tolist() == [0, 1, 1, 1, 0, 1, 1, 1]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize(
    ("quantization", "adapter", "adapter_params"),
    [("none", "lora", None), ("4bit", "lora", None), ("none", "tinylora", 32)],
)
def test_one_update_moves_adapter_and_value_head_not_the_base(
    tiny_model_dir, quantization, adapter, adapter_params
):
    model, tokenizer = tiny_policy(tiny_model_dir, TOKEN, adapter, quantization)
    if adapter_params is not None:
        assert count_trainable(model.policy) == adapter_params
    head = list(model.value_head.parameters())
    groups = model.parameter_groups(1e-2)
    optimizer, _ = build_optimizer(groups, PPOTrainArgs(output_dir="x", learning_rate=1e-2))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    # The VeriGenLLM seed's value head was not in the optimizer: it never learned.
    assert all(id(p) in in_optimizer for p in head)
    assert all(id(p) in in_optimizer for p in adapter_parameters(model))
    assert not any(id(p) in in_optimizer for p in model.policy.parameters() if not p.requires_grad)

    before_adapter = [p.detach().clone() for p in adapter_parameters(model)]
    before_head = [p.detach().clone() for p in head]
    before_base = frozen_snapshot(model)
    args = ppo.PPOArgs(ppo_epochs=2, num_minibatches=2)
    batch, _ = ppo.make_batch(model, fake_rollouts(), tokenizer.pad_token_id, args, 1.0, "cpu")
    stats = ppo.ppo_update(model, optimizer, batch, args, 1.0, 0.5, seed=0)
    assert stats["train/updates"] == 4
    assert any(not torch.equal(a, p) for a, p in zip(before_head, head, strict=True))
    assert any(
        not torch.equal(a, p)
        for a, p in zip(before_adapter, adapter_parameters(model), strict=True)
    )
    after_base = frozen_snapshot(model)
    assert before_base.keys() == after_base.keys()
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base)


def reference_forward(self, batch, temperature=1.0):
    """``PolicyWithValue.forward`` as the full-vocabulary computation (every position)."""
    out = full_vocab_logprobs_of_batch(
        self.policy, batch, temperature, True, True, self.value_head is not None
    )
    values = self.value_head(out.hidden) if self.value_head is not None else None
    return out.logprobs, out.entropy, values


@torch.no_grad()
def reference_reference_logprobs(self, batch, temperature=1.0):
    """``PolicyWithValue.reference_logprobs`` (base) as the full-vocabulary computation."""
    with self.policy.disable_adapter():
        return full_vocab_logprobs_of_batch(self.policy, batch, temperature).logprobs


def one_ppo_iteration(model, rollouts, pad_id, args, temperature):
    """Batch, first-minibatch loss and gradients, and the parameter moves of a whole update
    (SGD); the parameters are put back afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    batch, batch_metrics = ppo.make_batch(model, rollouts, pad_id, args, temperature, "cpu")
    loss, stats, _ = ppo.minibatch_loss(model, batch, torch.arange(batch.size), args, temperature)
    grads = torch.autograd.grad(loss, params)
    optimizer = torch.optim.SGD(model.parameter_groups(0.1, args.value_learning_rate), lr=0.1)
    metrics = ppo.ppo_update(model, optimizer, batch, args, temperature, 0.0, seed=0)
    moved = [a - p.detach() for a, p in zip(start, params, strict=True)]
    with torch.no_grad():
        for p, a in zip(params, start, strict=True):
            p.copy_(a)
    return batch, {**batch_metrics, **stats, **metrics, "loss": loss.item()}, grads, moved


@pytest.mark.parametrize("variant", [TOKEN, SEQUENCE])
def test_update_equals_the_full_vocabulary_update(tiny_model_dir, variant, monkeypatch):
    """Log-probs and entropies normalised on the completion positions only give the iteration of
    the full-vocabulary computation: old and reference log-probs, values, advantages, losses,
    gradients and the parameters after two epochs of minibatch steps, at a sampling temperature,
    with an infra_error row and an empty completion in the batch."""
    model, tokenizer = tiny_policy(tiny_model_dir, variant)
    # One padded pass per row, as the reference: this compares the head.
    model.logprob_options = {"share_prompts": False, "padding_free": False}
    randomize_adapter(model)
    if model.value_head is not None:
        with torch.no_grad():
            model.value_head.linear.weight.normal_(
                0.0, 0.1, generator=torch.Generator().manual_seed(1)
            )
    rollouts = fake_rollouts()
    infra, empty = fake_rollouts(count=2, seed=1)
    infra.mask, infra.reward = False, 0.0
    empty.completion_ids, empty.reward = [], 0.5
    rollouts = [infra, *rollouts[:3], empty, *rollouts[3:]]
    args = ppo.PPOArgs(
        variant=variant,
        num_minibatches=2,
        ppo_epochs=2,
        kl_coef=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
    )
    pad = tokenizer.pad_token_id
    batch, metrics, grads, moved = one_ppo_iteration(model, rollouts, pad, args, 0.7)
    monkeypatch.setattr(ppo.PolicyWithValue, "forward", reference_forward)
    monkeypatch.setattr(ppo.PolicyWithValue, "reference_logprobs", reference_reference_logprobs)
    expected_batch, expected, expected_grads, expected_moved = one_ppo_iteration(
        model, rollouts, pad, args, 0.7
    )

    assert expected["train/updates"] == 4 and expected["train/kl_ref"] > 1e-4
    mask = expected_batch.mask
    for name in ("old_logprobs", "ref_logprobs", "advantages", "old_values", "returns"):
        value, reference = getattr(batch, name), getattr(expected_batch, name)
        if value is None:
            assert reference is None, name
            continue
        if value.shape == mask.shape:
            value, reference = value * mask, reference * mask
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-6), name
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert reference.abs().max() > 0
        torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-9)
    for delta, reference in zip(moved, expected_moved, strict=True):
        torch.testing.assert_close(delta, reference, rtol=1e-5, atol=1e-9)


def test_adapter_and_value_head_are_clipped_apart(tiny_model_dir):
    """One global clip would shrink the policy's step by the critic's norm (a fresh value head's
    loss is large). Each group is clipped to max_grad_norm on its own: a limit between the two
    norms clips the larger group only and leaves the other exactly as it was."""
    model, tokenizer = tiny_policy(tiny_model_dir, TOKEN)
    randomize_adapter(model)
    groups = model.parameter_groups(1e-2)
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    args = ppo.PPOArgs()
    batch, _ = ppo.make_batch(model, fake_rollouts(), tokenizer.pad_token_id, args, 1.0, "cpu")
    loss, _, _ = ppo.minibatch_loss(model, batch, torch.arange(batch.size), args, 1.0)
    loss.backward()
    raw = {g["name"]: [p.grad.clone() for p in g["params"]] for g in optimizer.param_groups}
    raw_norm = {name: float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
                for name, grads in raw.items()}  # fmt: skip
    low, high = sorted(raw_norm.values())
    assert high > 1.5 * low > 0
    limit = (low + high) / 2
    norms = ppo.clip_each_group(optimizer, limit)
    assert norms["train/grad_norm_adapter"] == pytest.approx(raw_norm["adapter"], rel=1e-5)
    assert norms["train/grad_norm_value_head"] == pytest.approx(raw_norm["value_head"], rel=1e-5)
    assert norms["train/grad_norm"] == pytest.approx(math.hypot(*raw_norm.values()), rel=1e-5)
    for group in optimizer.param_groups:
        scale = min(1.0, limit / raw_norm[group["name"]])
        for p, before in zip(group["params"], raw[group["name"]], strict=True):
            torch.testing.assert_close(p.grad, before * scale, rtol=1e-5, atol=1e-8)


def test_target_kl_stops_the_updates_of_an_iteration(tiny_model_dir):
    model, tokenizer = tiny_policy(tiny_model_dir, SEQUENCE)
    randomize_adapter(model)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=5e-2)
    counts = {}
    for target in (0.0, 1e-6):
        args = ppo.PPOArgs(variant=SEQUENCE, ppo_epochs=3, num_minibatches=2, target_kl=target)
        batch, _ = ppo.make_batch(model, fake_rollouts(), tokenizer.pad_token_id, args, 1.0, "cpu")
        stats = ppo.ppo_update(model, optimizer, batch, args, 1.0, 0.5, seed=0)
        counts[target] = (stats["train/updates"], stats["train/early_stop"])
    # The first minibatch is at ratio 1 (KL 0): one step always happens.
    assert counts == {0.0: (6, 0.0), 1e-6: (1, 1.0)}


def test_old_and_new_logprobs_share_one_dropout_mode(tiny_model_dir):
    args = ppo.RLModelArgs(model=str(tiny_model_dir), quantization="none", lora_dropout=0.5)
    policy, tokenizer = load_policy(args)
    model = ppo.PolicyWithValue(policy, None)
    randomize_adapter(model)  # a fresh LoRA (B = 0) ignores its dropout
    model.train()
    batch = pack_rows([[5, 6, 7, 8]], [[9, 10, 11]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = model(batch)[0], model(batch)[0]
    assert not torch.equal(a, b)  # dropout on: the mixed-mode bug would show as ratio != 1
    assert disable_dropout(model) > 0
    with torch.no_grad():
        a, b = model(batch)[0], model(batch)[0]
    assert torch.equal(a, b)


def test_kl_reference_base_or_frozen_starting_adapter(tiny_model_dir):
    model, tokenizer = tiny_policy(tiny_model_dir, SEQUENCE)
    randomize_adapter(model, seed=1)
    batch = pack_rows([[5, 6, 7, 8]], [[9, 10, 11]], tokenizer.pad_token_id)
    mask = batch.completion_mask
    with torch.no_grad():
        start = model(batch)[0]
        with model.policy.disable_adapter():
            base = model(batch)[0]
    torch.testing.assert_close(model.reference_logprobs(batch), base)  # --kl_reference base
    model.keep_reference_weights()  # --kl_reference init
    randomize_adapter(model, seed=2)  # training moves the adapter...
    moved = [p.detach().clone() for p in adapter_parameters(model)]
    torch.testing.assert_close(model.reference_logprobs(batch), start)  # ...not the reference
    assert not torch.allclose(start * mask, base * mask)
    assert all(torch.equal(a, p) for a, p in zip(moved, adapter_parameters(model), strict=True))


def test_value_head_checkpoint_round_trip(tiny_model_dir, tmp_path):
    model, _ = tiny_policy(tiny_model_dir, TOKEN)
    with torch.no_grad():
        model.value_head.linear.weight.fill_(0.25)
        model.value_head.linear.bias.fill_(-1.5)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / VALUE_HEAD_FILE).is_file()
    assert (tmp_path / "adapter_config.json").is_file()
    loaded = ppo.build_value_head(model.policy, tmp_path, "cpu")
    assert torch.equal(loaded.linear.weight, model.value_head.linear.weight)
    assert loaded.linear.bias.item() == -1.5
    assert loaded.linear.weight.dtype == torch.float32
