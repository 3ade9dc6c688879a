"""REINFORCE with unit-test rewards on a LoRA / QLoRA / TinyLoRA adapter.

Each step samples ``--num_generations`` completions for each of ``--batch_size`` training prompts,
scores them in the sandbox, turns verdicts into rewards (``--reward``, coderl/rewards.py) and takes
one gradient step on

    L(theta) = 1/N * sum_i  -(r_i - b_i) * log p_theta(y_i | x_i)    [+ kl_coef * KL term]

over the N kept samples of the step (an ``infra_error``, the harness's fault, is left out of the
loss, the baselines and the means), where ``log p(y | x)`` is the sum over the completion's tokens
(``--token_aggregation sum``, the seed's objective) or their mean (``mean``), and ``b_i`` is the
baseline (``--baseline``):

* ``none``         b = 0: the seed's ``L = -reward * log p(completion)``.
* ``moving_mean``  b = an exponential moving average of past batch-mean rewards, read BEFORE the
                   current batch updates it (b_1 = 0): b <- mean_t on the first update, then
                   b <- decay * b + (1 - decay) * mean_t; mean_t is over every process's samples.
* ``batch_mean``   b = the mean reward of the step's samples (of this process's share).
* ``rloo``         b_ij = mean reward of the OTHER samples of the same prompt (leave-one-out,
                   Kool et al. 2019, Ahmadian et al. 2024): unbiased, a prompt's advantages sum to
                   zero; a prompt left with one usable sample gets advantage 0.

KL (``--kl_coef`` > 0) to the base model (the adapter disabled; from an SFT adapter the reference
is the BASE, not the SFT policy), per token with d_t = log ref(y_t) - log pi(y_t) (Schulman
2020): ``k3`` = exp(d_t) - d_t - 1, differentiated directly; ``k1`` = -d_t, whose pathwise
gradient is zero in expectation, as a reward penalty stopgrad(agg_t(-d_t)) * agg_t log pi(y_t).

``log p(y | x)`` is over the ids generation sampled (the end token included when the sample
emitted one: stopping is an action too), recomputed over prompt + completion ids (never
re-tokenized) with logits / ``--temperature``: the gradient is that of the policy that sampled
(``--top_p`` < 1 is not modelled, as in most implementations; dropout is off).

Departures from the seed (RL-Code-Agent, seeds/000): its reward was always 0 (it ran
``prompt.strip() + completion.strip()``, which destroys the body's indentation; here the sandbox
runs ``prompt + completion`` and calls ``check(entry_point)`` in a contained process); it evaluated
on its training tasks (here ``--eval_file`` is held out and an overlap is named); added: baselines,
several samples per prompt, mean aggregation, KL, infra_error masking, resume, several processes
(the run loop is coderl/rl_loop.py).

The seed's setting (one 16-24 GB GPU, 4-bit QLoRA, unit-test reward with length penalty 0.01)::

    python train_rl_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \\
        --init_adapter checkpoints/sft/final --quantization 4bit \\
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \\
        --output_dir checkpoints/rl --reward unit_test --length_alpha 0.01 --baseline none \\
        --num_generations 1 --batch_size 4 --max_steps 100 --learning_rate 1e-5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coderl.cli import parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.logprobs import completion_logprobs, micro_batches, pack_rollouts, reference_logprobs
from coderl.masked import masked_mean
from coderl.rewards import RewardArgs
from coderl.rl_loop import Processes, RLLoop, RLModelArgs, RolloutArgs
from coderl.rollouts import Rollout
from coderl.training import TrainArgs, build_optimizer, trainable_parameters

BASELINES = ("none", "moving_mean", "batch_mean", "rloo")
AGGREGATIONS = ("sum", "mean")
KL_ESTIMATORS = ("k3", "k1")


# --------------------------------------------------------------------------- options


@dataclass
class ReinforceArgs:
    baseline: str = field(
        default="none",
        metadata={
            "help": "Reward baseline: none (the seed), moving_mean, batch_mean, rloo "
            "(leave-one-out over the samples of one prompt).",
            "choices": list(BASELINES),
        },
    )
    baseline_decay: float = field(
        default=0.9,
        metadata={
            "help": "moving_mean: b <- decay * b + (1 - decay) * batch mean.",
            "range": "[0, 1)",
        },
    )
    token_aggregation: str = field(
        default="sum",
        metadata={
            "help": "log p(completion) as the sum of token log-probs (the seed) or their mean "
            "(length-normalised).",
            "choices": list(AGGREGATIONS),
        },
    )
    kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KL to the reference (base model, adapter disabled).",
            "range": "[0, inf)",
        },
    )
    kl_estimator: str = field(
        default="k3",
        metadata={
            "help": "Per-token KL estimator: k3 (exp(d) - d - 1, in the loss) or k1 "
            "(log pi - log ref, as a reward penalty).",
            "choices": list(KL_ESTIMATORS),
        },
    )


@dataclass
class Options:
    """All parsed options of one run."""

    model: RLModelArgs
    train: TrainArgs
    rollout: RolloutArgs
    rl: ReinforceArgs
    reward: RewardArgs


def validate_args(opts: Options) -> None:
    if opts.rl.baseline == "rloo" and opts.rollout.num_generations < 2:
        raise UserError(
            "--baseline rloo needs --num_generations >= 2 (leave-one-out compares the samples "
            f"of one prompt), got {opts.rollout.num_generations}"
        )


# --------------------------------------------------------------------------- the algorithm


def leave_one_out_baselines(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """For each sample, the mean reward of the other kept samples of its group (prompt).

    A sample that is alone in its group (or masked) gets its own reward, i.e. advantage 0.
    """
    baselines = rewards.clone()
    for group in group_ids.unique():
        members = (group_ids == group) & mask
        count = int(members.sum())
        if count < 2:
            continue
        total = rewards[members].sum()
        baselines[members] = (total - rewards[members]) / (count - 1)
    return baselines


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    baseline: str,
    state: dict[str, Any],
    mask: torch.Tensor | None = None,
    decay: float = 0.9,
    batch_mean_for_update: float | None = None,
) -> torch.Tensor:
    """Advantages ``r_i - b_i`` for one step's samples; masked samples get 0.

    ``state`` carries the moving mean between steps (``state["moving_mean"]``, None before the
    first update) and is updated in place AFTER the advantages are computed.
    ``batch_mean_for_update`` overrides the mean the moving average absorbs (the global batch
    mean under several processes); by default it is this batch's kept mean.
    """
    rewards = rewards.float()
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    if baseline == "none":
        baselines = torch.zeros_like(rewards)
    elif baseline == "batch_mean":
        baselines = masked_mean(rewards, mask).expand_as(rewards)
    elif baseline == "moving_mean":
        previous = state.get("moving_mean")
        baselines = torch.full_like(rewards, 0.0 if previous is None else previous)
    elif baseline == "rloo":
        baselines = leave_one_out_baselines(rewards, group_ids, mask)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    advantages = torch.where(mask, rewards - baselines, torch.zeros_like(rewards))
    if baseline == "moving_mean" and bool(mask.any()):
        mean = batch_mean_for_update
        mean = float(masked_mean(rewards, mask)) if mean is None else mean
        previous = state.get("moving_mean")
        state["moving_mean"] = mean if previous is None else decay * previous + (1 - decay) * mean
    return advantages


def aggregate_tokens(
    values: torch.Tensor, completion_mask: torch.Tensor, aggregation: str
) -> torch.Tensor:
    """Per-sequence sum (``sum``) or mean (``mean``) of per-token values over the completion."""
    total = (values * completion_mask).sum(-1)
    if aggregation == "sum":
        return total
    if aggregation == "mean":
        return total / completion_mask.sum(-1).clamp(min=1)
    raise ValueError(f"unknown token aggregation {aggregation!r}")


def sample_weights(sample_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if sample_mask is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    return sample_mask.to(like.dtype)


def reinforce_loss(
    logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    aggregation: str = "sum",
    sample_mask: torch.Tensor | None = None,
    num_samples: float | None = None,
) -> torch.Tensor:
    """``1/N * sum_i -A_i * agg_t log p(y_it)`` over kept samples (advantages are constants).

    ``logprobs`` and ``completion_mask`` are (B, C), one column per completion token.
    ``num_samples`` is N; pass the step's total when the batch is split into micro-batches so the
    accumulated gradient equals the full batch's. Default: the kept samples of this batch.
    """
    weights = sample_weights(sample_mask, logprobs)
    sequence_logprob = aggregate_tokens(logprobs, completion_mask, aggregation)
    n = weights.sum().clamp(min=1) if num_samples is None else num_samples
    return -(weights * advantages.detach().to(logprobs.dtype) * sequence_logprob).sum() / n


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str):
    """Per-token estimate of KL(pi || ref) from d = log ref - log pi (k3 or k1, see the docstring)."""
    d = ref_logprobs - logprobs
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return -d
    raise ValueError(f"unknown KL estimator {estimator!r}")


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    aggregation: str = "sum",
    estimator: str = "k3",
    sample_mask: torch.Tensor | None = None,
    num_samples: float | None = None,
) -> torch.Tensor:
    """The KL term added (times ``kl_coef``) to the loss, averaged over kept samples like the
    policy term. k3 is differentiated directly; k1 as ``stopgrad(KL) * log p`` (score function)."""
    weights = sample_weights(sample_mask, logprobs)
    per_sample = aggregate_tokens(
        kl_per_token(logprobs, ref_logprobs.detach(), estimator), completion_mask, aggregation
    )
    if estimator == "k1":
        per_sample = per_sample.detach() * aggregate_tokens(logprobs, completion_mask, aggregation)
    n = weights.sum().clamp(min=1) if num_samples is None else num_samples
    return (weights * per_sample).sum() / n


# --------------------------------------------------------------------------- one update


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0


def policy_update(
    model,
    optimizer,
    rollouts: Sequence[Rollout],
    advantages: torch.Tensor,
    opts: Options,
    pad_id: int,
    processes: Processes | None = None,
) -> UpdateStats:
    """One optimizer step on the step's kept rollouts (accumulated over micro-batches); the
    gradients are averaged over ``processes`` (default: this one alone) before clipping."""
    rl, temperature, options = opts.rl, opts.rollout.temperature, opts.rollout.logprob_options()
    device = next(model.parameters()).device
    kept = [i for i, r in enumerate(rollouts) if r.mask]
    # The step's normalisers: every kept sample and token counts once, whatever its micro-batch.
    num_kept = max(len(kept), 1)
    token_total = sum(len(rollouts[i].completion_ids) for i in kept) or 1
    stats = UpdateStats()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for chunk in micro_batches(kept, opts.rollout.micro_batch_size):
        batch = pack_rollouts([rollouts[i] for i in chunk], pad_id, device)
        mask, part_adv = batch.completion_mask, advantages[chunk].to(device)
        out = completion_logprobs(model, batch, temperature, with_entropy=True, **options)
        pg = reinforce_loss(out.logprobs, mask, part_adv, rl.token_aggregation, None, num_kept)
        loss = pg
        if rl.kl_coef > 0:
            ref_logprobs = reference_logprobs(model, batch, temperature, **options)
            kl_term = kl_loss(
                out.logprobs, ref_logprobs, mask, rl.token_aggregation, rl.kl_estimator, None,
                num_kept,
            )  # fmt: skip
            loss = loss + rl.kl_coef * kl_term
            per_token = kl_per_token(out.logprobs.detach(), ref_logprobs, rl.kl_estimator)
            stats.kl += float((per_token * mask).sum()) / token_total
        loss.backward()
        stats.loss += float(loss.detach())
        stats.pg_loss += float(pg.detach())
        stats.entropy += float((out.entropy * mask).sum()) / token_total
    params = trainable_parameters(model)
    stats.grad_norm = (processes or Processes()).optimizer_step(
        optimizer, params, opts.train.max_grad_norm
    )
    optimizer.zero_grad(set_to_none=True)
    return stats


# --------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(
        (RLModelArgs, TrainArgs, RolloutArgs, ReinforceArgs, RewardArgs),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    opts = Options(*options)
    validate_args(opts)
    with RLLoop.start(
        "reinforce", opts.model, opts.train, opts.rollout, opts.reward, options
    ) as loop:
        model, rl = loop.policy, opts.rl
        optimizer, scheduler = build_optimizer(trainable_parameters(model), opts.train)
        state = loop.attach(model, optimizer, scheduler)
        baseline_state: dict[str, Any] = state.get("baseline_state", {"moving_mean": None})
        for step in loop.steps():
            rollouts = loop.rollouts(step)
            rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
            mask = torch.tensor([r.mask for r in rollouts], dtype=torch.bool)
            groups = torch.tensor([r.task_index for r in rollouts], dtype=torch.long)
            baseline_before = baseline_state.get("moving_mean")
            advantages = compute_advantages(
                rewards,
                groups,
                rl.baseline,
                baseline_state,
                mask,
                rl.baseline_decay,
                batch_mean_for_update=loop.processes.kept_reward_mean(rollouts),
            )
            for r, advantage in zip(rollouts, advantages.tolist(), strict=True):
                r.advantage, r.in_loss = advantage, r.mask
            stats = policy_update(
                model,
                optimizer,
                rollouts,
                advantages,
                opts,
                loop.tokenizer.pad_token_id,
                loop.processes,
            )
            metrics = {
                "train/loss": stats.loss,
                "train/pg_loss": stats.pg_loss,
                "train/entropy": stats.entropy,
                "train/kl": stats.kl,
                "train/grad_norm": stats.grad_norm,
            }
            if rl.baseline == "moving_mean":
                metrics["train/baseline"] = baseline_before or 0.0
            loop.end_step(step, metrics, rollouts, {"baseline_state": dict(baseline_state)})
        loop.finish()


if __name__ == "__main__":
    main()
