"""train_rl_lora.py: REINFORCE advantages and loss against hand computations, one update in
process on the tiny model against the hand loss's gradient and the full-vocabulary computation,
and the script's options. Its runs end to end and the learning check are in
tests/test_reinforce_runs.py."""

from __future__ import annotations

import types

import pytest
import torch

import train_rl_lora as rl
from coderl.adapters import add_adapter
from coderl.models import load_model
from coderl.rollouts import Rollout, prompt_token_ids
from coderl.tasks import load_tasks
from tests.helpers import REPO, full_vocab_logprobs_of_batch, run_script, scripted, tiny_lora_model

# Fixture toy_data_dir comes from conftest (its plugin).

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


# --------------------------------------------------------------------------- one update, in process


def fake_rollouts(tokenizer, tasks, completions, masks) -> list[Rollout]:
    from coderl.prompts import render_prompt

    rows = []
    for i, (task, text, keep) in enumerate(zip(tasks, completions, masks)):
        prompt_ids = prompt_token_ids(tokenizer, render_prompt(task, tokenizer, "base"))
        ids = tokenizer.encode(text, add_special_tokens=False)
        status = "passed" if keep else "infra_error"
        result = types.SimpleNamespace(status=status, passed=keep, compiled=None)
        rows.append(
            Rollout(i, 0, task, prompt_ids, ids, text, text, len(ids), False, result, 1.0, keep)
        )
    return rows


def update_options(
    micro_batch_size=2, temperature=1.0, max_grad_norm=0.0, one_pass_per_row=False, **rl_options
):
    """The options ``rl.policy_update`` reads, as parsed from a command line."""
    rollout = rl.RolloutArgs(
        micro_batch_size=micro_batch_size,
        temperature=temperature,
        share_prompt_forward=not one_pass_per_row,
        padding_free=not one_pass_per_row,
    )
    return rl.Options(
        rl.RLModelArgs(),
        rl.TrainArgs(output_dir="x", max_grad_norm=max_grad_norm),
        rollout,
        rl.ReinforceArgs(**rl_options),
        rl.RewardArgs(),
    )


def step_gradients(model, tokenizer, rollouts, advantages, aggregation="sum", **options):
    """Gradients of the trainable parameters after one policy_update with SGD(lr=1)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    opts = update_options(token_aggregation=aggregation, **options)
    stats = rl.policy_update(model, optimizer, rollouts, advantages, opts, 0)
    moved = {n: before[n] - p.detach() for n, p in params.items()}  # = lr * grad
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(before[name])
    return moved, stats


def test_rollouts_train_the_end_token_that_was_sampled(tiny_model_dir, toy_data_dir):
    """Instruct mode ends an answer with the template's ``<|im_end|>``, not the tokenizer's EOS: the
    ids a rollout trains on are the sampled ids, that very end token included."""
    from coderl.generation import SamplingConfig
    from coderl.rewards import RewardArgs
    from coderl.rollouts import collect_rollouts
    from sandbox import Sandbox

    model, tokenizer = load_model(tiny_model_dir)
    task = load_tasks(toy_data_dir / "toy_python_train.jsonl")[0]
    answer = f"```python\n{task['prompt']}{task['canonical_solution']}```"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    script = tokenizer.encode(answer, add_special_tokens=False) + [end_of_turn]
    cfg = SamplingConfig(max_new_tokens=len(script) + 4, prompt_mode="instruct")
    with Sandbox(workers=1) as box, scripted(model, script):
        [rollout] = collect_rollouts(model, tokenizer, [task], cfg, box, RewardArgs(), seed=0)
    assert rollout.completion_ids == script
    assert rollout.result.status == "passed" and rollout.reward == 1.0


def test_update_equals_hand_loss_gradient_and_skips_masked_samples(tiny_model_dir, toy_data_dir):
    """Three samples in two micro-batches, the middle one an infra_error with a different text:
    the update is -grad of the hand-written loss over the two kept samples, whatever the masked
    sample holds."""
    model, tokenizer = tiny_lora_model(tiny_model_dir)
    model.eval()
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:3]
    texts = ["    x = x + 1\n    return x\n", "    return 0\n", "    return sum(xs)\n"]
    rollouts = fake_rollouts(tokenizer, tasks, texts, [True, False, True])
    advantages = torch.tensor([0.5, 3.0, -1.25])
    moved, stats = step_gradients(model, tokenizer, rollouts, advantages)

    params = [p for p in model.parameters() if p.requires_grad]
    hand = 0.0
    for r, adv in ((rollouts[0], 0.5), (rollouts[2], -1.25)):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        hand = hand - adv * logp[len(r.prompt_ids) - 1 :].sum()
    hand = hand / 2  # N = the two kept samples
    assert stats.loss == pytest.approx(hand.item(), rel=1e-5)
    grads = torch.autograd.grad(hand, params)
    for (name, delta), grad in zip(moved.items(), grads):
        torch.testing.assert_close(delta, grad, atol=1e-6, rtol=1e-4), name

    other = fake_rollouts(
        tokenizer, tasks, [texts[0], "    pass\n" * 5, texts[2]], [True, False, True]
    )
    moved_other, _ = step_gradients(model, tokenizer, other, torch.tensor([0.5, -7.0, -1.25]))
    for name in moved:
        assert torch.equal(moved[name], moved_other[name]), name


def test_update_moves_the_adapter_and_never_the_base(tiny_model_dir, toy_data_dir):
    model, tokenizer = tiny_lora_model(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:2]
    rollouts = fake_rollouts(tokenizer, tasks, ["    return x\n", "    return xs\n"], [True, True])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opts = update_options(micro_batch_size=1, max_grad_norm=1.0, kl_coef=0.1)
    stats = rl.policy_update(model, optimizer, rollouts, torch.tensor([1.0, -0.5]), opts, 0)
    assert stats.kl >= 0 and stats.entropy > 0 and stats.grad_norm > 0
    after = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(after[name].detach(), value), name
    for name, value in adapter.items():
        assert not torch.equal(after[name].detach(), value), name


def test_kl_to_the_reference_is_zero_while_the_adapter_is_the_identity(
    tiny_model_dir, toy_data_dir
):
    """A fresh LoRA (B = 0) computes exactly the base model: the k3 estimate is 0 at the start."""
    model, tokenizer = load_model(tiny_model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.0)
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:2]
    rollouts = fake_rollouts(tokenizer, tasks, ["    return x\n", "    return 1\n"], [True, True])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    opts = update_options(kl_coef=1.0, kl_estimator="k3")
    stats = rl.policy_update(model, optimizer, rollouts, torch.zeros(2), opts, 0)
    assert stats.kl == pytest.approx(0.0, abs=1e-7) and stats.loss == pytest.approx(0.0, abs=1e-7)


def reference_logprobs(model, batch, temperature=1.0, **options):
    """``coderl.logprobs.reference_logprobs`` through the full-vocabulary reference."""
    with torch.no_grad(), model.disable_adapter():
        return full_vocab_logprobs_of_batch(model, batch, temperature).logprobs


def test_update_equals_the_full_vocabulary_update(tiny_model_dir, toy_data_dir, monkeypatch):
    """Log-probs normalised on the completion positions only give the update of the
    full-vocabulary computation: loss, KL to the reference, entropy and every gradient, at a
    sampling temperature, over rows whose prompts and completions differ in length."""
    model, tokenizer = tiny_lora_model(tiny_model_dir)
    model.eval()
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:3]
    texts = ["    x = x + 1\n    return x\n", "    return 0\n", "    return sum(xs)\n"]
    rollouts = fake_rollouts(tokenizer, tasks, texts, [True, False, True])
    assert len({len(r.prompt_ids) for r in rollouts}) == 3
    advantages = torch.tensor([0.5, 3.0, -1.25])
    # One pass per row on both sides: this compares the output head and log-softmax alone (the
    # shared prompt pass is compared in tests/test_logprobs.py).
    options = dict(kl_coef=0.3, temperature=0.7, one_pass_per_row=True)
    moved, stats = step_gradients(model, tokenizer, rollouts, advantages, **options)
    monkeypatch.setattr(rl, "completion_logprobs", full_vocab_logprobs_of_batch)
    monkeypatch.setattr(rl, "reference_logprobs", reference_logprobs)
    expected_moved, expected = step_gradients(model, tokenizer, rollouts, advantages, **options)

    assert expected.kl > 1e-4 and expected.grad_norm > 1e-4
    for name in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        assert getattr(stats, name) == pytest.approx(getattr(expected, name), rel=1e-6), name
    for name, delta in moved.items():
        torch.testing.assert_close(delta, expected_moved[name], rtol=1e-6, atol=1e-9), name


# --------------------------------------------------------------------------- options


def test_help_lists_the_algorithm_options():
    proc = run_script("train_rl_lora.py", ["--help"], cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--baseline", "--baseline_decay", "--num_generations", "--token_aggregation",
        "--kl_coef", "--kl_estimator", "--init_adapter", "--reward", "--length_alpha",
        "--resume", "--temperature", "--top_p",
    ):  # fmt: skip
        assert flag in proc.stdout, flag
    assert "leave-one-out" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--baseline", "rloo", "--num_generations", "1"], "--baseline rloo needs"),
        (["--init_adapter", "no/such/folder"], "--init_adapter no/such/folder"),
        (["--temperature", "0"], "--temperature"),
        (["--baseline_decay", "1.5", "--baseline", "moving_mean"], "--baseline_decay"),
        ([], "--output_dir is required"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(extra, message, tmp_path, capsys):
    args = [] if not extra else ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        rl.main(["--model", "unused", *args, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
