"""REINFORCE with unit-test rewards on a LoRA / QLoRA / TinyLoRA adapter.

Each step takes ``--batch_size`` training prompts, samples ``--num_generations`` completions per
prompt from the current policy, runs every completion against its task's unit tests in the sandbox
(scoring one chunk while the next generates), turns verdicts into rewards (``--reward``, see
coderl/rewards.py) and takes one gradient step on

    L(theta) = 1/N * sum_i  -(r_i - b_i) * log p_theta(y_i | x_i)    [+ kl_coef * KL term]

over the N samples of the step, where ``log p(y | x)`` is the sum over the completion's tokens
(``--token_aggregation sum``, the seed's objective) or their mean (``mean``, length-normalised),
and ``b_i`` is the baseline (``--baseline``):

* ``none``         b = 0: the seed's ``L = -reward * log p(completion)``.
* ``moving_mean``  b = an exponential moving average of past batch-mean rewards. It is read
                   BEFORE the current batch updates it, so a batch never sees its own rewards:
                   b_1 = 0 (no history); after step t, b <- mean_t on the first update and
                   b <- decay * b + (1 - decay) * mean_t afterwards (``--baseline_decay``).
* ``batch_mean``   b = the mean reward of the step's samples (of this process's share).
* ``rloo``         b_ij = mean reward of the OTHER samples of the same prompt (leave-one-out,
                   Kool et al. 2019 / Ahmadian et al. 2024): unbiased, and the advantages of one
                   prompt sum to zero. Needs ``--num_generations >= 2``; a prompt left with one
                   usable sample gets advantage 0 (nothing to compare it with).

Samples whose verdict is ``infra_error`` (the harness's fault, not the model's) get weight 0 in
the loss and are left out of every baseline and mean; they still go through the forward pass so
that, under accelerate, every process runs the same number of backward passes.

Optional KL to the reference policy (``--kl_coef`` > 0): the reference is the base model with the
adapter disabled (``with model.disable_adapter():``), so it costs one extra forward pass and no
memory for a second model. Starting from an SFT adapter, the reference is therefore the BASE model,
not the SFT policy. Per-token estimators (Schulman, "Approximating KL divergence", 2020), with
d_t = log ref(y_t) - log pi(y_t):

* ``k3``  exp(d_t) - d_t - 1: non-negative, unbiased for KL(pi || ref), differentiable; its
          gradient is (1 - ref/pi) * grad log pi per token (as in GRPO).
* ``k1``  -d_t = log pi - log ref. Its pathwise gradient is grad log pi, which is zero in
          expectation, so k1 enters as a reward penalty instead: the loss term is
          stopgrad(agg_t(-d_t)) * agg_t log pi(y_t), the score-function estimate of grad KL.

Both are aggregated over the completion's tokens like the policy term (sum or mean) and averaged
over samples; ``train/kl`` logs the chosen estimator's per-token mean over completion tokens.

What ``log p(y | x)`` covers: the sampled completion's tokens as the plumbing returns them
(``coderl.training.collect_rollouts``): the kept text's ids plus the EOS token when the sample
ended by emitting it (stopping is an action too); the prompt and the tokens after a stop string
are not scored. They are recomputed in one forward pass over prompt + completion ids, never by
re-tokenizing text.

Dropout mode: REINFORCE has no old log-probs, so the only thing to keep consistent is the policy
that sampled (eval mode, no dropout) and the one that is differentiated (train mode). The loss's
log-probs are recomputed in train mode with ``--lora_dropout``, which defaults to 0.0 here and is
also applied to an ``--init_adapter`` (an SFT adapter would otherwise bring its 0.05): with 0.0
the two are the same function. A nonzero value differentiates a dropped-out policy instead. The
base model's own dropout is its config's (0 for Llama-style models).

The policy is the sampling distribution: every log-prob of the update (the policy term, the KL
and its reference, the logged entropy) is taken from the logits divided by ``--temperature``, so
the gradient is the policy gradient of what was actually sampled (at the default 1.0, the model's
own distribution). ``--top_p`` < 1 truncates the sampling distribution further; that truncation
is not modelled (a small bias, as in most implementations). A lower temperature (0.5-0.7) keeps a
small model's samples away from its noisy tail, where nearly every sample is a syntax error.

Departures from the seed (RL-Code-Agent, seeds/000):

* Its reward was always 0: it built the program as ``prompt.strip() + completion.strip()``,
  which destroys the body's indentation. Here the sandbox runs ``prompt + completion`` exactly and
  calls ``check(entry_point)``, in a contained process with its own time limit (not
  ``signal.alarm`` inside the evaluated code).
* Its evaluation ran on the tasks it trained on. Here validation (``--eval_file``) uses a
  held-out file and the script warns if its task ids overlap the training file.
* Added: baselines (the seed had none), several samples per prompt, per-token mean aggregation,
  KL to the reference, infra_error masking, resume, multi-process sampling.

Under accelerate with P processes, every process reads the same global task order and samples its
own ``batch_size / P`` prompts of it (offset by process index); gradients are averaged by DDP.
Baselines use the process's own samples, except the moving mean, which is updated with the global
batch mean so that every process holds the same value.

Logged (``runs/<run_name>/metrics.jsonl`` + TensorBoard): ``rollout/reward_mean``,
``rollout/pass_rate``, ``rollout/completion_tokens`` (+ ``rollout/reward_std``,
``rollout/truncated_frac``, ``rollout/infra_error_frac``), ``train/loss``, ``train/pg_loss``,
``train/entropy``, ``train/kl``, ``train/grad_norm``, ``train/lr``, ``train/advantage_mean``,
``train/advantage_std``, ``train/baseline``, ``train/epoch``, ``time/generate``, ``time/score``
(scoring time NOT hidden behind generation), ``time/update``, and ``eval/pass@1`` when validating.
Every sampled completion with its reward, advantage and verdict goes to ``samples.jsonl``.

Tiny CPU run (minutes; the tiny model, toy tasks and SFT adapter come from the tiny preset)::

    python train_rl_lora.py --model checkpoints/tiny-llama --init_adapter checkpoints/tiny-sft/final \
        --train_file data/toy_python_train.jsonl --eval_file data/toy_python_test.jsonl \
        --output_dir checkpoints/tiny-rl --baseline rloo --num_generations 4 --batch_size 8 \
        --max_steps 40 --learning_rate 2e-4 --max_new_tokens 64 --sandbox_workers 2

The seed's setting (one 16-24 GB GPU, 4-bit QLoRA, unit-test reward with length penalty 0.01)::

    python train_rl_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \
        --init_adapter checkpoints/deepseek_1_3b_lora_sft_v2/final \
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \
        --output_dir checkpoints/deepseek_1_3b_lora_rl_alpha0.01_100 --quantization 4bit \
        --reward unit_test --length_alpha 0.01 --baseline none --num_generations 1 \
        --batch_size 4 --max_steps 100 --learning_rate 1e-5 --max_new_tokens 256
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coderl.cli import derive_seed, parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.models import describe_model
from coderl.rewards import RewardArgs
from coderl.training import (
    ModelArgs,
    Rollout,
    TaskStream,
    TrainArgs,
    all_positions,
    build_optimizer,
    collect_rollouts,
    count_trainable,
    finish,
    load_optimizer_state,
    load_policy,
    masked_token_logprobs,
    pack_sequences,
    restore,
    rollout_metrics,
    save,
    spread_over_mask,
    start_run,
    trainable_parameters,
    validate,
    validate_common,
    write_json,
)

BASELINES = ("none", "moving_mean", "batch_mean", "rloo")
AGGREGATIONS = ("sum", "mean")
KL_ESTIMATORS = ("k3", "k1")


@dataclass
class RLModelArgs(ModelArgs):
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LoRA dropout during the update (RL default 0.0: the updated policy is "
            "exactly the one that sampled); also applied to an --init_adapter.",
            "range": "[0, 1)",
        },
    )


@dataclass
class RLTrainArgs(TrainArgs):
    learning_rate: float = field(
        default=1e-5, metadata={"help": "Peak learning rate.", "range": "(0, inf)"}
    )
    save_every: int = field(
        default=25,
        metadata={
            "help": "Checkpoint every N steps and at the end (N > --max_steps: only at the end).",
            "range": "[1, inf)",
        },
    )


@dataclass
class ReinforceArgs:
    train_file: str = field(
        default="data/humaneval_train.jsonl",
        metadata={"help": "Training tasks (JSONL in the task schema)."},
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Prompts per step, over all processes (each process takes an equal share).",
            "range": "[1, inf)",
        },
    )
    num_generations: int = field(
        default=1,
        metadata={"help": "Completions sampled per prompt (rloo needs >= 2).", "range": "[1, inf)"},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; the loss uses the same tempered policy.",
            "range": "(0, inf)",
        },
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling threshold.", "range": "(0, 1]"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation budget per sample.", "range": "[1, inf)"}
    )
    generation_batch_size: int = field(
        default=8,
        metadata={"help": "Sequences per generate call (prompts x samples).", "range": "[1, inf)"},
    )
    micro_batch_size: int = field(
        default=4,
        metadata={
            "help": "Sequences per forward/backward pass (gradients are accumulated).",
            "range": "[1, inf)",
        },
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: continue the prompt, cut at stop sequences; instruct: chat template.",
            "choices": ["base", "instruct"],
        },
    )
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
    score_chunk_tasks: int = field(
        default=0,
        metadata={
            "help": "Prompts per generation chunk scored while the next generates "
            "(0 = half the step's prompts).",
            "range": "[0, inf)",
        },
    )


def validate_args(model_args: RLModelArgs, train_args: RLTrainArgs, rl_args: ReinforceArgs) -> None:
    validate_common(model_args, train_args)
    if rl_args.baseline not in BASELINES:
        raise UserError(f"--baseline {rl_args.baseline!r}: choose from {', '.join(BASELINES)}")
    if rl_args.token_aggregation not in AGGREGATIONS:
        raise UserError(f"--token_aggregation must be one of {', '.join(AGGREGATIONS)}")
    if rl_args.kl_estimator not in KL_ESTIMATORS:
        raise UserError(f"--kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
    if rl_args.num_generations < 1:
        raise UserError("--num_generations must be at least 1")
    if rl_args.baseline == "rloo" and rl_args.num_generations < 2:
        raise UserError(
            "--baseline rloo needs --num_generations >= 2 (leave-one-out compares the samples "
            f"of one prompt), got {rl_args.num_generations}"
        )
    if rl_args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if rl_args.micro_batch_size < 1 or rl_args.generation_batch_size < 1:
        raise UserError("--micro_batch_size and --generation_batch_size must be at least 1")
    if rl_args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if rl_args.temperature <= 0:
        raise UserError("--temperature must be > 0 (REINFORCE needs sampled completions)")
    if not 0 < rl_args.top_p <= 1:
        raise UserError("--top_p must be in (0, 1]")
    if not 0 <= rl_args.baseline_decay < 1:
        raise UserError("--baseline_decay must be in [0, 1)")
    if rl_args.kl_coef < 0:
        raise UserError("--kl_coef must be >= 0")


# --------------------------------------------------------------------------- the algorithm


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 when nothing is kept)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


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
        update_moving_mean(
            state,
            float(masked_mean(rewards, mask))
            if batch_mean_for_update is None
            else batch_mean_for_update,
            decay,
        )
    return advantages


def update_moving_mean(state: dict[str, Any], batch_mean: float, decay: float) -> None:
    """b <- batch_mean on the first update, then b <- decay * b + (1 - decay) * batch_mean."""
    previous = state.get("moving_mean")
    state["moving_mean"] = (
        batch_mean if previous is None else decay * previous + (1 - decay) * batch_mean
    )


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

    ``logprobs`` and ``completion_mask`` are B x T-1 (``sampling_logprobs`` / ``pack_sequences``).
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


def sampling_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    completion_mask: torch.Tensor | None = None,
):
    """log pi_T(x_t | x_<t) for t = 1..T-1 (B x T-1) under the sampling distribution: logits
    divided by ``temperature``, shifted before gathering (``coderl.training.token_logprobs`` at
    temperature 1). With ``return_entropy`` also each next-token distribution's entropy.

    Only the positions of ``completion_mask`` (None: all) are computed, the others are 0: the
    loss never reads them, and the vocabulary-wide log-softmax dominates the cost.
    """
    mask = all_positions(input_ids) if completion_mask is None else completion_mask
    out = masked_token_logprobs(
        model, input_ids, attention_mask, mask, temperature, return_entropy=return_entropy
    )
    logprobs = spread_over_mask(out.logprobs, mask)
    if not return_entropy:
        return logprobs
    return logprobs, spread_over_mask(out.entropy, mask)


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0


def micro_batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def policy_update(
    run,
    model,
    optimizer,
    rollouts: Sequence[Rollout],
    advantages: torch.Tensor,
    rl_args: ReinforceArgs,
    train_args: TrainArgs,
    pad_id: int,
) -> UpdateStats:
    """One optimizer step on the step's rollouts (accumulated over micro-batches)."""
    accelerator = run.accelerator
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    mask = torch.tensor([r.mask for r in rollouts], dtype=torch.bool)
    # The global normaliser: every kept sample of the step counts once, whatever its micro-batch.
    num_kept = max(int(mask.sum()), 1)
    token_total = sum(len(r.completion_ids) for r in rollouts if r.mask) or 1
    stats = UpdateStats()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    chunks = micro_batches(len(rollouts), rl_args.micro_batch_size)
    for index, chunk in enumerate(chunks):
        part = [rollouts[i] for i in chunk]
        input_ids, attention, completion_mask = pack_sequences(
            [r.prompt_ids for r in part],
            [r.completion_ids for r in part],
            pad_id,
            device,
        )
        part_mask = mask[chunk.start : chunk.stop].to(device)
        part_adv = advantages[chunk.start : chunk.stop].to(device)
        ref_logprobs = None
        if rl_args.kl_coef > 0:
            with torch.no_grad(), unwrapped.disable_adapter():
                ref_logprobs = sampling_logprobs(
                    unwrapped,
                    input_ids,
                    attention,
                    rl_args.temperature,
                    completion_mask=completion_mask,
                )
        last = index == len(chunks) - 1
        # DDP all-reduces once, on the last micro-batch; each process runs the same count.
        sync = accelerator.no_sync(model) if not last else contextlib.nullcontext()
        with sync:
            logprobs, entropy = sampling_logprobs(
                model,
                input_ids,
                attention,
                rl_args.temperature,
                return_entropy=True,
                completion_mask=completion_mask,
            )
            pg = reinforce_loss(
                logprobs,
                completion_mask,
                part_adv,
                rl_args.token_aggregation,
                part_mask,
                num_kept,
            )
            loss = pg
            kept_tokens = completion_mask * part_mask.unsqueeze(-1).to(completion_mask.dtype)
            if ref_logprobs is not None:
                kl_term = kl_loss(
                    logprobs,
                    ref_logprobs,
                    completion_mask,
                    rl_args.token_aggregation,
                    rl_args.kl_estimator,
                    part_mask,
                    num_kept,
                )
                loss = loss + rl_args.kl_coef * kl_term
                with torch.no_grad():
                    per_token = kl_per_token(logprobs, ref_logprobs, rl_args.kl_estimator)
                    stats.kl += float((per_token * kept_tokens).sum()) / token_total
            accelerator.backward(loss)
        stats.loss += float(loss.detach())
        stats.pg_loss += float(pg.detach())
        stats.entropy += float((entropy.detach() * kept_tokens).sum()) / token_total
    params = trainable_parameters(unwrapped)
    max_norm = train_args.max_grad_norm if train_args.max_grad_norm > 0 else math.inf
    stats.grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


# --------------------------------------------------------------------------- rollouts


class TimedSandbox:
    """Passes work to the sandbox and notes when generation handed over its last chunk.

    ``collect_rollouts`` submits each chunk right after generating it, so the last submission
    marks the end of generation; what is left after it is scoring not hidden behind generation.
    """

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.last_submit = 0.0

    def submit_batch(self, jobs):
        self.last_submit = time.perf_counter()
        return self.sandbox.submit_batch(jobs)

    def __getattr__(self, name):
        return getattr(self.sandbox, name)


def process_share(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's contiguous share of the step's global prompts."""
    per_process = len(indices) // num_processes
    return indices[process_index * per_process : (process_index + 1) * per_process]


def gather_across_processes(run, items: list) -> list:
    """Every process's items (for logging), in process order."""
    if run.accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


def global_kept_mean(run, rewards: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The mean reward of the kept samples over all processes (None if none is kept)."""
    totals = torch.tensor(
        [float((rewards * mask.float()).sum()), float(mask.sum())],
        device=run.accelerator.device,
    )
    if run.accelerator.num_processes > 1:
        totals = run.accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if float(totals[1]) > 0 else None


def mean_over_processes(run, values: dict[str, float]) -> dict[str, float]:
    if run.accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=run.accelerator.device)
    tensor = run.accelerator.reduce(tensor, reduction="mean")
    return {k: float(v) for k, v in zip(keys, tensor.tolist(), strict=True)}


def sample_rows(rollouts: Sequence[Rollout], advantages: Sequence[float]) -> list[dict]:
    return [
        {**r.log_row(), "advantage": a, "masked": not r.mask}
        for r, a in zip(rollouts, advantages, strict=True)
    ]


# --------------------------------------------------------------------------- main


def load_task_files(train_args: TrainArgs, rl_args: ReinforceArgs, run):
    from coderl.tasks import load_tasks

    train_tasks = load_tasks(rl_args.train_file)
    eval_tasks = (
        load_tasks(train_args.eval_file)[: train_args.eval_tasks] if (train_args.eval_file) else []
    )
    overlap = {t["task_id"] for t in train_tasks} & {t["task_id"] for t in eval_tasks}
    if overlap:
        run.print(
            f"warning: {len(overlap)} validation task ids are also training tasks; "
            "eval/ metrics are not held-out"
        )
    return train_tasks, eval_tasks


def set_lora_dropout(model, p: float) -> int:
    """Make every LoRA dropout layer drop with probability ``p``, also for a loaded adapter (an
    SFT adapter keeps the 0.05 it was trained with otherwise). Returns the layers changed."""
    changed = 0
    for name, module in model.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout):
            module.p = p
            changed += 1
    return changed


def record_computed(run, computed: dict) -> None:
    """Add values computed after parsing to the run's config (config.json and checkpoints)."""
    run.config["computed"].update(computed)
    if run.is_main:
        write_json(run.run_dir / "config.json", run.config)
    run.print(
        "computed: " + ", ".join(f"{k}={v}" for k, v in computed.items() if not isinstance(v, dict))
    )


def make_sandbox(train_args: TrainArgs):
    from sandbox import Sandbox

    return Sandbox(workers=train_args.sandbox_workers or None, timeout=train_args.sandbox_timeout)


@dataclass
class Options:
    """All parsed options of one run."""

    model: RLModelArgs
    train: RLTrainArgs
    rl: ReinforceArgs
    reward: RewardArgs


def sampling_config(rl_args: ReinforceArgs):
    from coderl.generation import SamplingConfig

    return SamplingConfig(
        max_new_tokens=rl_args.max_new_tokens,
        temperature=rl_args.temperature,
        top_p=rl_args.top_p,
        n=rl_args.num_generations,
        batch_size=rl_args.generation_batch_size,
        prompt_mode=rl_args.prompt_mode,
    )


def reinforce_step(
    run,
    opts: Options,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    tasks: list[dict],
    sandbox: TimedSandbox,
    baseline_state: dict[str, Any],
) -> tuple[dict[str, Any], list[dict]]:
    """Sample, score, compute advantages, update once. Returns (metrics, sample rows)."""
    accelerator = run.accelerator
    started = time.perf_counter()
    rollouts = collect_rollouts(
        accelerator.unwrap_model(model),
        tokenizer,
        tasks,
        sampling_config(opts.rl),
        sandbox,
        opts.reward,
        seed=derive_seed(opts.train.seed, step, accelerator.process_index) % 2**31,
        chunk_tasks=opts.rl.score_chunk_tasks or None,
    )
    scored = time.perf_counter()
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    mask = torch.tensor([r.mask for r in rollouts], dtype=torch.bool)
    groups = torch.tensor([r.task_index for r in rollouts], dtype=torch.long)
    baseline_before = baseline_state.get("moving_mean")
    advantages = compute_advantages(
        rewards,
        groups,
        opts.rl.baseline,
        baseline_state,
        mask,
        opts.rl.baseline_decay,
        batch_mean_for_update=global_kept_mean(run, rewards, mask),
    )
    stats = policy_update(
        run,
        model,
        optimizer,
        rollouts,
        advantages,
        opts.rl,
        opts.train,
        tokenizer.pad_token_id,
    )
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    updated = time.perf_counter()

    kept_adv = advantages[mask]
    local = {
        "train/loss": stats.loss,
        "train/pg_loss": stats.pg_loss,
        "train/entropy": stats.entropy,
        "train/kl": stats.kl,
        "train/advantage_mean": float(kept_adv.mean()) if len(kept_adv) else 0.0,
        "train/advantage_std": float(kept_adv.std()) if len(kept_adv) > 1 else 0.0,
        "time/generate": sandbox.last_submit - started,
        "time/score": scored - sandbox.last_submit,
        "time/update": updated - scored,
    }
    all_rollouts = gather_across_processes(run, rollouts)
    all_advantages = gather_across_processes(run, advantages.tolist())
    metrics = {
        **rollout_metrics(all_rollouts),
        **mean_over_processes(run, local),
        "train/grad_norm": stats.grad_norm,
        "train/lr": lr,
    }
    if opts.rl.baseline == "moving_mean":
        metrics["train/baseline"] = baseline_before or 0.0
    return metrics, sample_rows(all_rollouts, all_advantages)


def run_validation(run, model, tokenizer, eval_tasks, sandbox, opts: Options) -> dict:
    """Greedy pass@1 on the held-out tasks, computed on the main process only."""
    result: dict = {}
    if run.is_main:
        result = validate(
            run.accelerator.unwrap_model(model),
            tokenizer,
            eval_tasks,
            sandbox,
            opts.train.eval_max_new_tokens,
            opts.rl.prompt_mode,
            opts.rl.generation_batch_size,
        )
        run.print(f"eval/pass@1 = {result['eval/pass@1']:.3f} on {len(eval_tasks)} tasks")
    run.accelerator.wait_for_everyone()
    return result


def evaluates_at(step: int, train_args: TrainArgs) -> bool:
    return bool(train_args.eval_every) and step % train_args.eval_every == 0


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    opts = Options(
        *parse_args(
            (RLModelArgs, RLTrainArgs, ReinforceArgs, RewardArgs),
            argv,
            description=__doc__.split("\n\n")[0],
        )
    )
    validate_args(opts.model, opts.train, opts.rl)
    run = start_run(opts.train, (opts.model, opts.train, opts.rl, opts.reward))
    accelerator = run.accelerator
    if opts.rl.batch_size % accelerator.num_processes:
        raise UserError(
            f"--batch_size {opts.rl.batch_size} must be a multiple of the "
            f"{accelerator.num_processes} processes"
        )
    train_tasks, eval_tasks = load_task_files(opts.train, opts.rl, run)
    model, tokenizer = load_policy(opts.model, run, run.resume_from)
    set_lora_dropout(model, opts.model.lora_dropout)
    optimizer, scheduler = build_optimizer(trainable_parameters(model), opts.train)
    stream = TaskStream(len(train_tasks), seed=opts.train.seed)
    baseline_state: dict[str, Any] = {"moving_mean": None}
    start_step = 0
    state = restore(run.resume_from)
    if state is not None:
        load_optimizer_state(run, optimizer, scheduler, state)
        stream.position = state["data_position"]
        baseline_state = state["baseline_state"]
        start_step = state["step"]
        run.print(f"resumed from {run.resume_from} at step {start_step}")
    record_computed(
        run,
        {
            "trainable_params": count_trainable(model),
            "model": describe_model(model),
            "prompts_per_process": opts.rl.batch_size // accelerator.num_processes,
        },
    )
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)

    from tqdm.auto import tqdm

    sandbox = TimedSandbox(make_sandbox(opts.train))
    last_checkpoint = run.resume_from  # what finish() exports if no step is left to run
    bar = tqdm(
        total=opts.train.max_steps, initial=start_step, desc="reinforce", disable=not run.is_main
    )
    try:
        for step in range(start_step + 1, opts.train.max_steps + 1):
            # Every process reads the same global order and keeps its own share of it.
            indices = process_share(
                stream.take(opts.rl.batch_size),
                accelerator.process_index,
                accelerator.num_processes,
            )
            metrics, rows = reinforce_step(
                run,
                opts,
                step,
                model,
                tokenizer,
                optimizer,
                scheduler,
                [train_tasks[i] for i in indices],
                sandbox,
                baseline_state,
            )
            metrics["train/epoch"] = stream.epoch
            # The last step validates before its checkpoint, so the logs a resume keeps hold it.
            if eval_tasks and (evaluates_at(step, opts.train) or step == opts.train.max_steps):
                metrics.update(run_validation(run, model, tokenizer, eval_tasks, sandbox, opts))
            run.logger.log(metrics, step)
            run.logger.log_samples(rows, step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['rollout/reward_mean']:.3f}",
                pass_rate=f"{metrics['rollout/pass_rate']:.2f}",
            )
            if step % opts.train.save_every == 0 or step == opts.train.max_steps:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data_position": stream.position,
                    "baseline_state": dict(baseline_state),
                }
                last_checkpoint = save(
                    run, step, model, trainer_state, metrics, opts.train.keep_last
                )
    finally:
        bar.close()
        sandbox.close()
    finish(run, last_checkpoint)


if __name__ == "__main__":
    main()
