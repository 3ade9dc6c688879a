"""train_grpo_lora.py's algorithm: advantages, losses and the zero-std logic by hand, and gradients
against the policy gradient on the tiny model. The scripts end to end (toy Python and C++, resume,
TinyLoRA, learning) are in tests/test_grpo_script.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

# Fixture tiny_model_dir comes from conftest.
from coderl.logprobs import completion_logprobs, pack_rows
from coderl.rollouts import adapter_folded, foldable_adapter_layers
from tests.helpers import full_vocab_logprobs, right_padded
from train_grpo_lora import (
    assemble_groups,
    group_advantages,
    grpo_loss,
    overlong_penalty,
    zero_std_groups,
)

# Two groups of four: one success in the first, two in the second.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
EPS = 1e-4


# --------------------------------------------------------------------------- advantages


def test_group_scaling_by_hand():
    # group 1: mean 1/4, sample std sqrt((9/16 + 3/16) / 3) = 1/2
    # group 2: mean 1/2, sample std sqrt((4/4) / 3) = 1/sqrt(3)
    s2 = 1 / math.sqrt(3)
    expected = [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3
    expected += [0.5 / (s2 + EPS)] * 2 + [-0.5 / (s2 + EPS)] * 2
    assert group_advantages(REWARDS, 4, "group").tolist() == pytest.approx(expected, rel=1e-6)


def test_batch_scaling_by_hand():
    # batch mean 3/8; squares 3 * (5/8)^2 + 5 * (3/8)^2 = 15/8; sample variance 15/56
    std = math.sqrt(15 / 56)
    centered = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    expected = [c / (std + EPS) for c in centered]
    assert group_advantages(REWARDS, 4, "batch").tolist() == pytest.approx(expected, rel=1e-6)


def test_no_scaling_is_the_group_centred_reward():
    centered = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    assert group_advantages(REWARDS, 4, "none").tolist() == pytest.approx(centered)


def test_unscored_sample_is_left_out_and_gets_zero_advantage():
    rewards = torch.tensor([1.0, 0.0, math.nan, 0.0])
    # mean of (1, 0, 0) = 1/3, the NaN sample gets 0
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx(
        [2 / 3, -1 / 3, 0, -1 / 3]
    )


def test_equal_reward_groups_have_zero_advantage_and_are_flagged():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, math.nan, math.nan])
    assert zero_std_groups(rewards, 4).tolist() == [True, False, True]
    advantages = group_advantages(rewards, 4, "group")
    assert advantages[:4].tolist() == [0.0] * 4 and advantages[8:].tolist() == [0.0] * 4


def test_overlong_penalty_ramp():
    # L = 100, buffer 20: free up to 80 tokens, then linearly to -1 at 100.
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 90, 100)] == pytest.approx(
        [0.0, 0.0, -0.5, -1.0]
    )


# --------------------------------------------------------------------------- losses

NEW = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.3, 0.0]])
OLD = torch.tensor([[-1.4, -0.5, -1.5], [-0.3, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
# Per-token surrogate, eps_low 0.2, eps_high 0.28:
#   row 0 (A = 1):  rho = e^0.4 > 1.28 -> clipped to 1.28;  rho = 1;  rho = e^-0.5 (unclipped, min)
#   row 1 (A = -2): rho = 1 -> 2;  rho = e^-0.3 < 0.8 -> clipped: -min(-2e^-0.3, -1.6) = 1.6
ROW0 = [-1.28, -1.0, -math.exp(-0.5)]
ROW1 = [2.0, 1.6]


def loss_of(loss_type, **kw):
    return grpo_loss(NEW, OLD, None, ADV, MASK, 0.2, 0.28, 0.0, loss_type, 4, **kw)


def test_grpo_aggregation_by_hand():
    loss, stats = loss_of("grpo")
    assert float(loss) == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2, rel=1e-6)
    # one of five tokens clipped low (rho < 0.8, A < 0), one clipped high (rho > 1.28, A > 0)
    assert float(stats["clip_ratio_low"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio_high"]) == pytest.approx(0.2)


def test_dapo_aggregation_by_hand():
    loss, _ = loss_of("dapo")
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 5, rel=1e-6)


def test_dr_grpo_aggregation_by_hand():
    loss, _ = loss_of("dr_grpo")  # 2 sequences x max_completion_length 4
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 8, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_full_batch(loss_type):
    full, _ = loss_of(loss_type)
    parts = [
        grpo_loss(
            NEW[i : i + 1], OLD[i : i + 1], None, ADV[i : i + 1], MASK[i : i + 1],
            0.2, 0.28, 0.0, loss_type, 4, num_sequences=2, num_tokens=5.0,
        )[0]
        for i in range(2)
    ]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)


def test_k3_kl_term_by_hand():
    ref = torch.tensor([[-1.0, -0.7, -2.0], [-0.5, -1.3, 0.0]])
    loss, stats = grpo_loss(NEW, OLD, ref, ADV, MASK, 0.2, 0.28, 0.1, "dapo", 4)
    d = (ref - NEW)[MASK.bool()]
    k3 = torch.exp(d) - d - 1
    assert float(stats["kl"]) == pytest.approx(float(k3.mean()), rel=1e-6)
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 5 + 0.1 * float(k3.mean()))


def test_clipped_tokens_get_no_gradient():
    new = NEW.clone().requires_grad_(True)
    loss, _ = grpo_loss(new, OLD, None, ADV, MASK, 0.2, 0.28, 0.0, "dapo", 4)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[1, 1] == 0  # the two clipped tokens
    # an unclipped token: d/dnew of -A * exp(new - old) / 5
    assert float(new.grad[0, 1]) == pytest.approx(-1.0 / 5)
    assert float(new.grad[1, 2]) == 0  # masked


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("share_prompts", [True, False])
def test_gradient_equals_reinforce_with_group_mean_baseline(tiny_model_dir, share_prompts):
    """mu = 1, beta = 0: rho = 1, and the GRPO gradient is the policy gradient
    -1/N sum_i A_i * (1/|y_i|) sum_t grad log pi(y_it), computed here through the shared
    right-padded reference (one pass per full row over every position), both when the script
    runs each prompt once for its group and when it runs every row whole."""
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir)
    model = add_adapter(model, "lora", r=4, alpha=8, dropout=0.0)
    for _, p in model.named_parameters():  # LoRA B starts at 0: give A and B real values
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    prompts = [tok.encode("def f(x):\n"), tok.encode("def g(xs):\n    return")]
    completions = [[101, 57, 300], [9, 12], [44, 45, 46, 47], [7]]
    prompt_of = [prompts[0], prompts[0], prompts[1], prompts[1]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 2, "none")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    batch = pack_rows(prompt_of, completions, tok.pad_token_id)
    assert batch.prompt_ids.shape[0] == 2 and batch.row_prompt.tolist() == [0, 0, 1, 1]
    new_lp = completion_logprobs(model, batch, share_prompts=share_prompts).logprobs
    loss, _ = grpo_loss(
        new_lp, new_lp.detach(), None, adv, batch.completion_mask, 0.2, 0.2, 0.0, "grpo", 8
    )
    grads = torch.autograd.grad(loss, params)

    ids, att, cmask = right_padded(prompt_of, completions, tok.pad_token_id)
    lp, _ = full_vocab_logprobs(model, ids, att)
    torch.testing.assert_close(
        new_lp[batch.completion_mask.bool()], lp[cmask.bool()], rtol=1e-5, atol=1e-5
    )
    per_seq = (lp * cmask).sum(1) / cmask.sum(1)
    reinforce = -(adv * per_seq).sum() / 4
    expected = torch.autograd.grad(reinforce, params)
    assert any(float(g.abs().max()) > 1e-6 for g in expected)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_shared_prompt_path_under_kbit_gradient_checkpointing(tiny_model_dir):
    """peft's prepare_model_for_kbit_training (what a 4-bit CUDA base gets) switches gradient
    checkpointing on, which turns the key/value cache off in train mode: the shared-prompt forward
    then had no cache to select rows from (AttributeError at the first update). It must fall back
    to one pass per row and give the same log-probs and gradients as with checkpointing off."""
    from coderl.adapters import add_adapter
    from coderl.models import gradient_checkpointing_on, load_model

    model, tok = load_model(tiny_model_dir, quantization="4bit")
    model = add_adapter(model, "qlora", r=4, alpha=8, dropout=0.0, prepare_kbit=True)
    assert gradient_checkpointing_on(model)
    for _, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    prompts = [tok.encode("def f(x):\n"), tok.encode("def g(xs):\n    return")]
    batch = pack_rows(
        [prompts[0], prompts[0], prompts[1]], [[101, 57], [9], [44, 45, 46]], tok.pad_token_id
    )
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    runs = {}
    for checkpointing in (True, False):
        if not checkpointing:
            model.gradient_checkpointing_disable()
        for share in (True, False):
            lp = completion_logprobs(model, batch, share_prompts=share).logprobs
            model.zero_grad()
            (-(lp * batch.completion_mask).sum()).backward()  # reentrant checkpoints: no .grad()
            kept = lp.detach()[batch.completion_mask.bool()]  # padding columns are no tokens
            runs[checkpointing, share] = (kept, [p.grad.clone() for p in params])
    want_lp, want_grads = runs[False, True]
    assert any(float(g.abs().max()) > 1e-6 for g in want_grads)
    for key, (lp, grads) in runs.items():
        torch.testing.assert_close(lp, want_lp, rtol=1e-4, atol=1e-5, msg=str(key))
        for g, e in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6, msg=str(key))


def test_folded_adapter_gives_the_same_logits_and_leaves_the_adapter_alone(tiny_model_dir):
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir)
    model = add_adapter(model, "lora", r=4, alpha=8, dropout=0.0)
    for _, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with adapter_folded(model):
            assert not any("lora" in n for n, _ in model.named_modules())  # plain linears now
            folded = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert float((plain - again).abs().max()) == 0
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)
    assert float((folded - plain).abs().max()) > 0  # it really ran the folded weights
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    half, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert foldable_adapter_layers(add_adapter(half, "lora", r=4)) == []  # would round dW away


# --------------------------------------------------------------------------- zero-std groups


def fake_group(rewards, masks=None):
    masks = masks or [True] * len(rewards)
    return [SimpleNamespace(reward=r, mask=m) for r, m in zip(rewards, masks, strict=True)]


class ScriptedSource:
    """A fake reward source: hands out pre-made groups in order and records each draw."""

    def __init__(self, groups):
        self.groups = list(groups)
        self.calls = []

    def __call__(self, count, round_index, keep):
        self.calls.append((count, round_index))
        out, self.groups = self.groups[:count], self.groups[count:]
        return out[:keep]


MIXED, FLAT = [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]


def test_keep_returns_every_group_and_counts_the_flat_ones():
    source = ScriptedSource([fake_group(MIXED), fake_group(FLAT), fake_group(FLAT)])
    groups, info = assemble_groups(source, 3, "keep", 5)
    assert len(groups) == 3 and info.first_draw_zero_std == 2 and info.dropped == 0
    assert source.calls == [(3, 0)]


def test_drop_removes_flat_groups_without_drawing_more():
    flat_with_error = fake_group(
        [1.0, 0.0, 1.0, 1.0], [True, False, True, True]
    )  # scored ones equal
    source = ScriptedSource([fake_group(MIXED), fake_group(FLAT), flat_with_error])
    groups, info = assemble_groups(source, 3, "drop", 5)
    assert [[r.reward for r in g] for g in groups] == [MIXED]
    assert info.dropped == 2 and info.first_draw_zero_std == 2 and source.calls == [(3, 0)]


def test_resample_refills_the_batch_within_the_budget():
    source = ScriptedSource(
        [fake_group(MIXED), fake_group(FLAT), fake_group(FLAT)]  # first draw: two flat
        + [fake_group(FLAT), fake_group([0.5, 1.0, 1.0, 1.0])]  # round 1: one flat
        + [fake_group([0.0, 0.0, 0.0, 1.0])]  # round 2: refills
    )
    groups, info = assemble_groups(source, 3, "resample", 3)
    assert len(groups) == 3 and info.dropped == 0
    assert source.calls == [(3, 0), (2, 1), (1, 2)] and info.resample_rounds == 2
    assert info.first_draw_zero_std == 2


def test_resample_gives_up_after_the_budget_and_reports_the_dropped_share():
    source = ScriptedSource([fake_group(FLAT) for _ in range(10)])
    groups, info = assemble_groups(source, 4, "resample", 2)
    assert groups == [] and info.dropped == 4 and info.resample_rounds == 2
    assert source.calls == [(4, 0), (4, 1), (4, 2)]
