"""PPO-Clip on code tasks with unit-test rewards, training a LoRA / QLoRA / TinyLoRA adapter.

Each iteration samples ``--num_generations`` completions for each of ``--batch_size`` training
tasks, scores them in the sandbox, turns verdicts into rewards (``--reward``), fixes old log-probs,
values and advantages, then makes ``--ppo_epochs`` shuffled passes over the batch in
``--num_minibatches`` minibatches (one optimizer step each) with the clipped surrogate
``max(-A r, -A clip(r, 1-eps, 1+eps))``, ``r = pi / pi_old``. Two variants:

* ``--variant token`` (default): token-level PPO. A linear value head on the policy's last hidden
  state (fp32, its own parameter group, saved as ``value_head.pt`` beside the adapter) predicts
  the return of each prefix. Per-token rewards are ``-kl_coef * (log pi - log pi_ref)`` (k1) on
  every completion token plus the task reward on the last one; advantages by GAE (``--gamma`` 1,
  ``--gae_lambda`` 0.95), whitened over the batch's completion tokens; loss = policy loss +
  ``vf_coef`` * value loss (optionally clipped, ``--value_clip``) - ``ent_coef`` * entropy. Clip
  0.2, vf 0.5, entropy 0.01, max grad norm 0.5: the VeriGenLLM-v2 seed's configuration.
* ``--variant sequence``: the RL-Code-Agent seed's algorithm, made correct. One ratio per
  completion, ``exp(sum_t log pi - sum_t log pi_old)``; advantages are the rewards normalised over
  the batch, ``(r - mean) / (std + 1e-8)``; no value head, KL or entropy term (``train/kl_ref`` is
  still logged). A sum of ~100 token log-ratios moves fast: expect a high ``train/clip_frac``.

KL reference (``--kl_reference``): ``base``, the base model (adapter disabled), or ``init``, a
frozen copy of the starting adapter (kept in checkpoints); from an SFT adapter ``base`` penalises
the SFT changes themselves. Old log-probs are recomputed before the first update with dropout off,
as in the updates: the ratio is 1 on the first minibatch (``train/ratio_dev_first``). Log-probs use
the sampling ``--temperature``; unusable samples (``infra_error``, no token) weigh nothing. The
adapter's and the value head's gradients are clipped apart (a fresh head's value loss would scale
the policy step down); ``--target_kl`` stops an iteration at a minibatch past 1.5 x target_kl.

Departures from the seeds: RL-Code-Agent computed ``logp_old`` and the new log-probs in different
dropout modes (here one mode) and had no value head (its algorithm is ``--variant sequence``);
VeriGenLLM-v2's value head was not in the optimizer (here it is, tested); RL-Code-Agent evaluated
on its 33 training tasks (here ``--eval_file`` is held out). The run loop is coderl/rl_loop.py.

The seed's GPU setting (4-bit QLoRA on deepseek-coder-1.3b-base, length penalty 0.01, batch 4)::

    python train_ppo_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \\
        --init_adapter checkpoints/sft/final --quantization 4bit --variant token \\
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \\
        --output_dir checkpoints/ppo --reward unit_test --length_alpha 0.01 --batch_size 4 \\
        --num_generations 1 --ppo_epochs 4 --num_minibatches 2 --learning_rate 1e-5
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from coderl.cli import derive_seed, parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.masked import explained_variance, masked_mean, masked_var
from coderl.rewards import RewardArgs
from coderl.rl_loop import Processes, RLLoop, RLModelArgs, RolloutArgs
from coderl.rollouts import Rollout
from coderl.training import TrainArgs, build_optimizer, clip_each_group
from coderl.value_model import (
    PolicyWithValue,
    RolloutBatch,
    build_value_head,
    rollout_batch,
    usable,
    value_head_source,
)

# --------------------------------------------------------------------------- options


@dataclass
class PPOTrainArgs(TrainArgs):
    max_grad_norm: float = field(
        default=0.5,
        metadata={
            "help": "Clipping norm (0: off), adapter and value head apart.",
            "range": "[0, inf)",
        },
    )


@dataclass
class PPOArgs:
    variant: str = field(
        default="token",
        metadata={"help": "token or sequence (see above).", "choices": ["token", "sequence"]},
    )
    ppo_epochs: int = field(
        default=4, metadata={"help": "Passes over each rollout batch.", "range": "[1, inf)"}
    )
    num_minibatches: int = field(
        default=2,
        metadata={"help": "Minibatches per pass (one optimizer step each).", "range": "[1, inf)"},
    )
    clip_epsilon: float = field(
        default=0.2,
        metadata={"help": "PPO ratio clip: ratio kept in [1 - eps, 1 + eps].", "range": "(0, 1)"},
    )
    vf_coef: float = field(
        default=0.5, metadata={"help": "token: weight of the value loss.", "range": "[0, inf)"}
    )
    value_clip: float = field(
        default=0.0,
        metadata={"help": "token: clip V to old V +- this in the value loss.", "range": "[0, inf)"},
    )
    ent_coef: float = field(
        default=0.01, metadata={"help": "token: weight of the entropy bonus.", "range": "[0, inf)"}
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "token: per-token KL penalty in the rewards.", "range": "[0, inf)"},
    )
    kl_reference: str = field(
        default="base",
        metadata={"help": "KL reference: base or init (see above).", "choices": ["base", "init"]},
    )
    gamma: float = field(
        default=1.0, metadata={"help": "token: discount factor.", "range": "[0, 1]"}
    )
    gae_lambda: float = field(
        default=0.95, metadata={"help": "token: GAE lambda.", "range": "[0, 1]"}
    )
    value_learning_rate: float = field(
        default=0.0,
        metadata={
            "help": "token: the value head's rate (0: --learning_rate).",
            "range": "[0, inf)",
        },
    )
    target_kl: float = field(
        default=0.0,
        metadata={"help": "Early stop at approx KL > 1.5 x this (0: off).", "range": "[0, inf)"},
    )


# --------------------------------------------------------------------------- the math


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries; zero outside the mask."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def normalize_rewards(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """The seed's sequence advantages: ``(r - mean) / (std + eps)`` over the batch."""
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return (rewards - rewards.mean()) / (std + eps)


def token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` everywhere in the completion, plus
    the task reward ``scores[i]`` on row i's last completion token (rows whose mask is all zero
    get nothing). Also returns the per-token KL estimate (k1), zero outside the mask."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.nonzero(mask.sum(1) > 0).squeeze(1)  # a sample without tokens takes no action
    rewards[rows, last_token_index(mask[rows])] += scores[rows].to(rewards.dtype)
    return rewards, kl


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last 1 in ``mask`` (every row must have one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, -1).max(dim=1).values


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, torch.Tensor]:
    """Generalised advantage estimation by the backward recursion (B x T tensors).

    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``delta_t = r_t + gamma * V_{t+1} - V_t``; a
    position whose successor is outside the mask ends its episode (``V_{t+1} = 0``, no carry).
    Returns advantages and returns (``A + V``), both zero outside the mask.
    """
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    carry = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        if t + 1 < length:
            next_value, next_mask = values[:, t + 1], mask[:, t + 1]
        else:
            next_value = next_mask = torch.zeros_like(carry)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        carry = delta + gamma * lam * next_mask * carry
        advantages[:, t] = carry * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, torch.Tensor]:
    """Clipped surrogate ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` over masked entries, with
    ``r = exp(new - old)``, and the fraction of entries where the clipped term is the larger one.

    Token variant: B x T per-token log-probs. Sequence variant: B per-sequence sums, mask of ones.
    """
    ratio = torch.exp(new_logprobs - old_logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.0
) -> Tensor:
    """``0.5 * mean((V - R)^2)`` over masked entries; with ``clip > 0`` the pessimistic maximum
    with the loss of ``V`` clipped to ``old_values +- clip`` (PPO2's clipped value loss)."""
    losses = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        losses = torch.maximum(losses, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def approx_kl(new_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> float:
    """k3 estimator of KL(old || new): ``E[(r - 1) - log r]``, ``r = new / old`` (never negative)."""
    log_ratio = (new_logprobs - old_logprobs).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()


# --------------------------------------------------------------------------- one PPO iteration


def make_batch(
    model: PolicyWithValue, rollouts: list[Rollout], pad_id: int, args: PPOArgs, temperature, device
) -> tuple[RolloutBatch, dict[str, float]]:
    """The batch with old log-probs (in the updates' mode), reference log-probs and the
    advantages of the chosen variant."""
    chunk = max(1, math.ceil(len(rollouts) / args.num_minibatches))
    batch = rollout_batch(model, rollouts, pad_id, temperature, chunk, device)
    old_logprobs, old_values, ref_logprobs = (
        batch.old_logprobs,
        batch.old_values,
        batch.ref_logprobs,
    )
    mask, scores, sample_mask = batch.mask, batch.scores, batch.sample_mask
    metrics: dict[str, float] = {}
    if args.variant == "token":
        rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, args.kl_coef)
        advantages, returns = compute_gae(rewards, old_values, mask, args.gamma, args.gae_lambda)
        metrics["train/value_mean"] = masked_mean(old_values, mask).item()
        metrics["train/explained_variance"] = explained_variance(old_values, returns, mask)
        advantages = whiten(advantages, mask)
    else:
        kl = (old_logprobs - ref_logprobs) * mask
        keep = sample_mask > 0
        advantages, returns = torch.zeros_like(scores), None
        advantages[keep] = normalize_rewards(scores[keep])
    metrics["train/kl_ref"] = (kl.sum(1).sum() / sample_mask.sum().clamp(min=1)).item()
    batch.advantages, batch.returns = advantages, returns
    return batch, metrics


def minibatch_loss(
    model, batch: RolloutBatch, rows: Tensor, args: PPOArgs, temperature: float
) -> tuple[Tensor, dict[str, float], torch.Tensor]:
    """The loss of one minibatch and its diagnostics (also the per-entry log-ratio)."""
    mask = batch.mask[rows]
    logprobs, entropy, values = model(batch.rows.rows(rows), temperature)
    old = batch.old_logprobs[rows]
    entropy_mean = masked_mean(entropy, mask)
    stats: dict[str, float] = {"train/entropy": entropy_mean.item()}
    if args.variant == "token":
        pg_loss, clip_frac = ppo_policy_loss(
            logprobs, old, batch.advantages[rows], mask, args.clip_epsilon
        )
        v_loss = value_loss(
            values, batch.old_values[rows], batch.returns[rows], mask, args.value_clip
        )
        loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_mean
        stats["train/value_loss"] = v_loss.item()
        stats["train/approx_kl"] = approx_kl(logprobs, old, mask)
        log_ratio = (logprobs - old) * mask
    else:
        new_seq, old_seq = (logprobs * mask).sum(1), (old * mask).sum(1)
        samples = batch.sample_mask[rows]
        pg_loss, clip_frac = ppo_policy_loss(
            new_seq, old_seq, batch.advantages[rows], samples, args.clip_epsilon
        )
        loss = pg_loss
        stats["train/approx_kl"] = approx_kl(new_seq, old_seq, samples)
        log_ratio = (new_seq - old_seq) * samples
    stats["train/policy_loss"] = pg_loss.item()
    stats["train/clip_frac"] = clip_frac.item()
    return loss, stats, log_ratio.detach()


def ppo_update(
    model,
    optimizer,
    batch: RolloutBatch,
    args: PPOArgs,
    temperature: float,
    max_grad_norm: float,
    seed: int,
    processes: Processes | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes over the batch, one optimizer step per minibatch (its
    gradients averaged over ``processes``); ``--target_kl`` stops early (averaged over them)."""
    processes = processes or Processes()
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    ratio_dev_first = None
    stopped = False
    for _ in range(args.ppo_epochs):
        order = torch.randperm(batch.size, generator=generator).to(batch.mask.device)
        for rows in torch.tensor_split(order, args.num_minibatches):
            loss, stats, log_ratio = minibatch_loss(model, batch, rows, args, temperature)
            if ratio_dev_first is None:
                ratio_dev_first = log_ratio.abs().max().item()
            kl = processes.mean({"kl": stats["train/approx_kl"]})["kl"]
            if args.target_kl > 0 and kl > 1.5 * args.target_kl:
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            processes.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
            stats.update(clip_each_group(optimizer, max_grad_norm))
            optimizer.step()
            stats["train/loss"] = loss.item()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
        if stopped:
            break
    optimizer.zero_grad(set_to_none=True)
    metrics = {key: value / max(updates, 1) for key, value in sums.items()}
    metrics["train/ratio_dev_first"] = ratio_dev_first if ratio_dev_first is not None else 0.0
    metrics["train/updates"] = updates
    metrics["train/early_stop"] = float(stopped)
    return metrics


# --------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(
        (RLModelArgs, PPOTrainArgs, RolloutArgs, PPOArgs, RewardArgs),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    model_args, train, rollout, args, reward_args = options
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by every multi-process launcher
    if args.num_minibatches > rollout.batch_size // world * rollout.num_generations:
        raise UserError("--num_minibatches must be between 1 and the samples per process and step")
    name = f"ppo-{args.variant}"
    with RLLoop.start(name, model_args, train, rollout, reward_args, options) as loop:
        device, temperature = loop.run.accelerator.device, rollout.temperature
        head = None
        if args.variant == "token":
            source = value_head_source(model_args.init_adapter, loop.run.resume_from)
            head = build_value_head(loop.policy, source, device)
        model = PolicyWithValue(loop.policy, head, **rollout.logprob_options())
        model.train()
        groups = model.parameter_groups(train.learning_rate, args.value_learning_rate)
        optimizer, scheduler = build_optimizer(groups, train)
        if args.kl_reference == "init":
            model.keep_reference_weights()
        state = loop.attach(model, optimizer, scheduler)
        if args.kl_reference == "init" and state:
            model.keep_reference_weights(state["reference_weights"])
        loop.record(**model.parameter_counts())
        for step in loop.steps():
            rollouts = loop.rollouts(step)
            metrics: dict[str, float] = {}
            if loop.processes.total(sum(usable(r) for r in rollouts)) > 0:
                pad = loop.tokenizer.pad_token_id
                batch, metrics = make_batch(model, rollouts, pad, args, temperature, device)
                seed = derive_seed(train.seed, step, "minibatches")
                clip, processes = train.max_grad_norm, loop.processes
                metrics.update(
                    ppo_update(model, optimizer, batch, args, temperature, clip, seed, processes)
                )
                if args.variant == "sequence":
                    for r, advantage in zip(rollouts, batch.advantages.tolist(), strict=True):
                        r.advantage = advantage
            else:
                loop.run.print(f"step {step}: no usable sample (all infra_error or empty)")
            for r in rollouts:
                r.in_loss = usable(r)
            loop.end_step(step, metrics, rollouts, {"reference_weights": model.reference_weights})
        loop.finish()


if __name__ == "__main__":
    main()
