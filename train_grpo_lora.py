"""GRPO family on a LoRA / QLoRA / TinyLoRA adapter, rewarded by unit tests or stdin/stdout tests.

Each step samples ``--num_generations`` (G) completions for each of ``--batch_size`` prompts (a
group per prompt), scores them in the sandbox, turns verdicts into rewards (``--reward``) and
updates the adapter ``--num_iterations`` (mu) times on that rollout. With i a completion of group
g, t one of its tokens and rho = pi_theta(y_t) / pi_old(y_t):

* **Advantages** (``--scale_rewards``): group ``(r_i - mean_g r) / (std_g r + 1e-4)``; batch: the
  same over the std of the step's rewards (this process's); none: ``r_i - mean_g r`` (Dr. GRPO).
  std is Bessel's, as in TRL; an ``infra_error`` sample is left out of both and gets A = 0.
* **Per-token loss**, clip-higher with ``--epsilon`` (low) and ``--epsilon_high`` (DAPO)::

      l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
      k3_t = exp(d_t) - d_t - 1,  d_t = log pi_ref(y_t) - log pi_theta(y_t)

  The reference is the base (adapter disabled; from an SFT adapter, not the SFT policy); ``--beta
  0`` (the default) runs no reference pass. pi_old is the first update's own forward, detached
  (dropout is off, so rho = 1 until the weights move; mu = 1 is the policy gradient).
* **Aggregation** (``--loss_type``): grpo = mean over sequences of the token mean; dapo = token sum
  / tokens of the step; dr_grpo = token sum / (sequences * ``--max_new_tokens``). In the loss: not
  ``infra_error``, not truncated under ``--mask_truncated`` (DAPO's overlong filtering), at least
  one token, not in a group dropped by ``--zero_std``.
* **Equal-reward groups** carry no signal: ``--zero_std`` keep, drop, or resample (draw new prompts
  for the missing groups, up to ``--max_resample_rounds`` rounds: DAPO's dynamic sampling).
  ``--overlong_penalty`` adds DAPO's soft punishment to the reward: 0 up to L - B tokens, then
  (L - B - n) / B down to -1 at n = L (L = ``--max_new_tokens``, B = ``--overlong_buffer``).

A row with A = 0 under beta = 0 has exactly zero gradient: it counts in the normalisers and is
never run. Departures from the seeds (TinyLoRA-GRPO-Coder, Nano-Raccoon) and TRL: the algorithm is
written out with TRL's defaults (epsilon 0.2, beta 0, G 4) and meanings of scale_rewards and
loss_type, but the default loss is grpo (the paper's; TRL's is dapo); a ``--max_steps`` step is
one rollout; TinyLoRA is peft's ``TinyLoraConfig`` (u = 32, r = 2, one tied vector); ``--top_p``
< 1 is not corrected for. The run loop is coderl/rl_loop.py.

The TinyLoRA seed (Qwen2.5-Coder-3B-Instruct in 4-bit, 32 shared parameters, C++ tasks)::

    python train_grpo_lora.py --model Qwen/Qwen2.5-Coder-3B-Instruct --quantization 4bit \\
        --adapter tinylora --prompt_mode instruct --train_file data/deepcoder_lcbv5_train.jsonl \\
        --eval_file data/code_contests_test.jsonl --output_dir checkpoints/tinylora-grpo-cpp \\
        --batch_size 8 --max_new_tokens 1024 --num_iterations 4 --epsilon_high 0.28 \\
        --max_steps 200 --eval_every 50 --eval_tasks 165 --eval_max_new_tokens 1024 --eval_at_start
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from coderl.cli import parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.logprobs import completion_logprobs, micro_batches, pack_rollouts, reference_logprobs
from coderl.masked import nanmean, nanstd
from coderl.rewards import RewardArgs
from coderl.rl_loop import RLLoop, RLModelArgs, RolloutArgs
from coderl.rollouts import Rollout, group_by_prompt
from coderl.training import TrainArgs, build_optimizer, trainable_parameters

REWARD_SCALINGS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ZERO_STD_MODES = ("keep", "drop", "resample")
ADVANTAGE_EPS = 1e-4  # TRL's; keeps a group with a tiny std from blowing up its advantages
EQUAL_REWARD_TOL = 1e-6


# --------------------------------------------------------------------------- options


@dataclass
class GRPOArgs:
    scale_rewards: str = field(
        default="group", metadata={"help": "Advantage scaling.", "choices": list(REWARD_SCALINGS)}
    )
    loss_type: str = field(
        default="grpo", metadata={"help": "Loss aggregation.", "choices": list(LOSS_TYPES)}
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clip range: rho >= 1 - epsilon.", "range": "(0, 1)"}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip (DAPO: 0.28; default: --epsilon).", "range": "(0, inf)"},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer updates per rollout (mu).", "range": "[1, inf)"}
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "Weight of the k3 KL (0: no reference).", "range": "[0, inf)"},
    )
    zero_std: str = field(
        default="keep",
        metadata={"help": "Groups with equal rewards.", "choices": list(ZERO_STD_MODES)},
    )
    max_resample_rounds: int = field(
        default=2, metadata={"help": "resample: extra draws per step.", "range": "[0, inf)"}
    )
    mask_truncated: bool = field(
        default=False, metadata={"help": "Leave truncated completions out of the loss."}
    )
    overlong_penalty: bool = field(
        default=False, metadata={"help": "Add DAPO's soft overlong punishment to the reward."}
    )
    overlong_buffer: int = field(
        default=64, metadata={"help": "Overlong penalty ramp, in tokens.", "range": "[1, inf)"}
    )


@dataclass
class Options:
    """All parsed options of one run."""

    model: RLModelArgs
    train: TrainArgs
    rollout: RolloutArgs
    grpo: GRPOArgs
    reward: RewardArgs


def validate_args(opts: Options) -> None:
    g, max_new_tokens = opts.grpo, opts.rollout.max_new_tokens
    if (n := opts.rollout.num_generations) < 2:
        raise UserError(f"--num_generations must be in [2, inf), got {n}: a group compares samples")
    if g.overlong_penalty and not 1 <= g.overlong_buffer <= max_new_tokens:
        raise UserError(f"--overlong_buffer must be in [1, --max_new_tokens={max_new_tokens}]")


# --------------------------------------------------------------------------- the algorithm


def group_advantages(
    rewards: Tensor, group_size: int, scale: str, eps: float = ADVANTAGE_EPS
) -> Tensor:
    """GRPO advantages for rewards laid out group after group (``group_size`` each). NaN marks a
    sample without a reward (``infra_error``): left out of the means and stds, advantage 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}")
    rewards = rewards.double()
    grouped = rewards.view(-1, group_size)
    centered = grouped - nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (nanstd(grouped, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (nanstd(rewards) + eps)
    return torch.nan_to_num(centered.reshape(-1), nan=0.0).float()


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """One bool per group: True when its (non-NaN) rewards are all equal, i.e. no signal."""
    grouped = rewards.double().view(-1, group_size)
    valid = ~torch.isnan(grouped)
    high = torch.where(valid, grouped, torch.full_like(grouped, -math.inf)).max(dim=1).values
    low = torch.where(valid, grouped, torch.full_like(grouped, math.inf)).min(dim=1).values
    return (valid.sum(dim=1) < 2) | (high - low <= EQUAL_REWARD_TOL)


def overlong_penalty(num_tokens: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -1."""
    free = max_len - buffer
    return 0.0 if num_tokens <= free else max(-1.0, (free - num_tokens) / buffer)


def grpo_loss(
    new_lp: Tensor,
    old_lp: Tensor,
    ref_lp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    max_completion_length: int,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate (+ beta * k3 KL), aggregated by ``loss_type``.

    ``new_lp``, ``old_lp``, ``ref_lp`` and ``mask`` are (B, T) per completion token, ``advantages``
    (B,). ``num_sequences`` / ``num_tokens`` are the normalisers of the WHOLE step (sequences with
    a loss token / loss tokens) when this is one micro-batch of it (default: this batch's); the
    micro-batches' losses then sum to the step's. Also returns, over the masked tokens,
    ``clip_ratio_low`` (rho < 1 - eps_low with A < 0), ``clip_ratio_high`` (rho > 1 + eps_high
    with A > 0), ``kl`` (mean k3; 0 when beta = 0) and ``tokens``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}")
    mask = mask.to(new_lp.dtype)
    adv = advantages.to(new_lp.dtype).unsqueeze(1)
    ratio = torch.exp(new_lp - old_lp)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        if ref_lp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_lp - new_lp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens_per_seq = mask.sum(dim=1)
    if num_sequences is None:
        num_sequences = int((tokens_per_seq > 0).sum())
    if num_tokens is None:
        num_tokens = float(mask.sum())
    masked = per_token * mask
    if loss_type == "grpo":
        per_seq = masked.sum(dim=1) / tokens_per_seq.clamp(min=1)
        loss = per_seq.sum() / max(num_sequences, 1)
    elif loss_type == "dapo":
        loss = masked.sum() / max(num_tokens, 1.0)
    else:  # dr_grpo: a constant normaliser, no length bias
        loss = masked.sum() / (max(num_sequences, 1) * max_completion_length)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        count = mask.sum().clamp(min=1)
        stats = {
            "clip_ratio_low": (low * mask).sum() / count,
            "clip_ratio_high": (high * mask).sum() / count,
            "kl": (kl * mask).sum() / count,
            "tokens": mask.sum(),
        }
    return loss, stats


@dataclass
class GroupDraw:
    """What one step's batch assembly did, in this process (for the ``rollout/`` metrics)."""

    first_draw_zero_std: int = 0
    first_draw_groups: int = 0
    dropped: int = 0
    resample_rounds: int = 0


def group_rewards(group: Sequence[Any]) -> Tensor:
    """A group's rewards, NaN where the sample is masked (``infra_error``)."""
    return torch.tensor([r.reward if r.mask else math.nan for r in group], dtype=torch.float64)


def assemble_groups(
    draw: Callable[[int, int, int], list[list[Any]]],
    num_groups: int,
    zero_std: str,
    max_resample_rounds: int,
    largest: Callable[[int], int] = lambda n: n,
) -> tuple[list[list[Any]], GroupDraw]:
    """The step's groups, with equal-reward groups kept, dropped or replaced per ``zero_std``.

    ``draw(count, round, keep)`` samples ``count`` new groups per process and returns this
    process's first ``keep`` (each a list of items with ``reward`` and ``mask``); round 0 is the
    step's first draw, rounds 1.. are resamples. Under ``resample`` a round draws as many groups
    as the process missing the most lacks (``largest``: the maximum over processes, so all draw
    alike), each process keeping what it lacks; groups still missing after
    ``max_resample_rounds`` rounds are dropped.
    """
    groups = draw(num_groups, 0, num_groups)
    flags = [bool(zero_std_groups(group_rewards(g), len(g))[0]) for g in groups]
    info = GroupDraw(first_draw_zero_std=sum(flags), first_draw_groups=len(groups))
    if zero_std == "keep":
        return groups, info
    kept = [g for g, flat in zip(groups, flags, strict=True) if not flat]
    if zero_std == "resample":
        while info.resample_rounds < max_resample_rounds:
            most = largest(num_groups - len(kept))
            if most == 0:
                break
            info.resample_rounds += 1
            fresh = draw(most, info.resample_rounds, num_groups - len(kept))
            kept += [g for g in fresh if not zero_std_groups(group_rewards(g), len(g))[0]]
    info.dropped = num_groups - len(kept)
    return kept, info


# --------------------------------------------------------------------------- the update


def policy_update(
    loop: RLLoop, optimizer, rollouts: Sequence[Rollout], advantages: Tensor, opts: Options
) -> dict[str, float]:
    """``--num_iterations`` optimizer steps on one rollout (each accumulated over micro-batches,
    gradients averaged over processes). Returns the ``train/`` metrics."""
    g, temperature, options = opts.grpo, opts.rollout.temperature, opts.rollout.logprob_options()
    model, pad, device = loop.policy, loop.tokenizer.pad_token_id, loop.run.accelerator.device
    params = trainable_parameters(model)
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    # Normalisers of this process's whole step, whatever the micro-batch.
    num_sequences = sum(r.in_loss for r in rollouts)
    num_tokens = float(sum(len(r.completion_ids) for r in rollouts if r.in_loss))
    # A row with A = 0 and no KL term has exactly zero gradient: count it, do not run it.
    run = [i for i, r in enumerate(rollouts) if r.in_loss and (g.beta > 0 or r.advantage != 0)]
    # Rows stay in group order, so a micro-batch holds whole groups: one prompt pass each.
    chunks = micro_batches(run, opts.rollout.micro_batch_size)
    packed = [pack_rollouts([rollouts[i] for i in c], pad, device) for c in chunks]
    old_lps: list[Tensor] = []
    sums = {"loss": 0.0, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0, "kl": 0.0}
    entropy = tokens_seen = 0.0
    model.train()
    ref_lps = [
        reference_logprobs(model, batch, temperature, **options) if g.beta > 0 else None
        for batch in packed
    ]
    for iteration in range(g.num_iterations):
        optimizer.zero_grad(set_to_none=False)
        for p in params:  # zeros, not None: a step whose rows all have A = 0 still steps Adam
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        for index, (chunk, batch) in enumerate(zip(chunks, packed, strict=True)):
            first = iteration == 0
            out = completion_logprobs(model, batch, temperature, first, **options)
            if first:  # the rollout-time log-probs: this very forward, before any update
                old_lps.append(out.logprobs.detach())
                entropy += float((out.entropy * batch.completion_mask).sum())
            loss, st = grpo_loss(
                out.logprobs, old_lps[index], ref_lps[index], advantages[chunk].to(device),
                batch.completion_mask, g.epsilon, eps_high, g.beta, g.loss_type,
                opts.rollout.max_new_tokens, num_sequences, num_tokens,
            )  # fmt: skip
            loss.backward()
            tokens = float(st["tokens"])
            sums["loss"] += float(loss.detach()) / g.num_iterations
            for key in ("clip_ratio_low", "clip_ratio_high", "kl"):
                sums[key] += float(st[key]) * tokens
            tokens_seen += tokens
        # Always step, even on a zero gradient: Adam's moments evolve as for any other step.
        grad_norm = loop.processes.optimizer_step(optimizer, params, opts.train.max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    metrics = {"train/loss": sums["loss"], "train/grad_norm": grad_norm}
    for key in ("clip_ratio_low", "clip_ratio_high") + (("kl",) if g.beta > 0 else ()):
        metrics[f"train/{key}"] = sums[key] / max(tokens_seen, 1.0)
    metrics.update({"train/loss_sequences": num_sequences, "train/forward_sequences": len(run)})
    # Entropy over the rows run in every process; none ran: no value (0.0 reads as collapse).
    tokens_run = loop.processes.total(tokens_seen / g.num_iterations)
    if tokens_run > 0:
        metrics["train/entropy"] = loop.processes.total(entropy) / tokens_run
    return metrics


# --------------------------------------------------------------------------- main


def grpo_step(loop: RLLoop, opts: Options, optimizer, step: int) -> tuple[dict, list[Rollout]]:
    """Sample, score, compute advantages, update. Returns (metrics, every rollout drawn)."""
    g, max_len, drawn = opts.grpo, opts.rollout.max_new_tokens, []

    def draw(count: int, round_index: int, keep: int) -> list[list[Rollout]]:
        rollouts = loop.rollouts(step, prompts=count * loop.world, draw=round_index, keep=keep)
        for r in rollouts:
            if g.overlong_penalty and r.mask:
                r.reward += overlong_penalty(len(r.completion_ids), max_len, g.overlong_buffer)
        drawn.extend(rollouts)
        return group_by_prompt(rollouts)

    share, largest = opts.rollout.batch_size // loop.world, loop.processes.largest
    groups, info = assemble_groups(draw, share, g.zero_std, g.max_resample_rounds, largest)
    rollouts = [r for group in groups for r in group]
    rewards = torch.cat([group_rewards(group) for group in groups]) if groups else None
    size = opts.rollout.num_generations
    advantages = group_advantages(rewards, size, g.scale_rewards) if groups else torch.zeros(0)
    for r, advantage in zip(rollouts, advantages.tolist(), strict=True):
        r.advantage = advantage
        r.in_loss = bool(r.mask and r.completion_ids and not (g.mask_truncated and r.truncated))
    metrics = policy_update(loop, optimizer, rollouts, advantages, opts)
    total = loop.processes.total
    metrics["rollout/frac_reward_zero_std"] = total(info.first_draw_zero_std) / max(
        total(info.first_draw_groups), 1
    )
    metrics["rollout/frac_dropped"] = total(info.dropped) / opts.rollout.batch_size
    metrics["rollout/resample_rounds"] = info.resample_rounds
    metrics["train/trainable_params"] = sum(p.numel() for p in trainable_parameters(loop.policy))
    return metrics, drawn


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(
        (RLModelArgs, TrainArgs, RolloutArgs, GRPOArgs, RewardArgs),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    opts = Options(*options)
    validate_args(opts)
    with RLLoop.start("grpo", opts.model, opts.train, opts.rollout, opts.reward, options) as loop:
        loop.record(epsilon_high=opts.grpo.epsilon_high or opts.grpo.epsilon)
        optimizer, scheduler = build_optimizer(trainable_parameters(loop.policy), opts.train)
        loop.attach(loop.policy, optimizer, scheduler)
        for step in loop.steps():
            metrics, drawn = grpo_step(loop, opts, optimizer, step)
            loop.end_step(step, metrics, drawn)
        loop.finish()


if __name__ == "__main__":
    main()
