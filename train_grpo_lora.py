"""GRPO family on a LoRA / QLoRA / TinyLoRA adapter, rewarded by unit tests or stdin/stdout tests.

Each step takes ``--num_prompts`` training prompts, samples ``--num_generations`` (G) completions
per prompt from the current policy, scores every completion in the sandbox (one chunk of prompts is
scored while the next one generates), turns verdicts into rewards (``--reward``), and updates the
adapter ``--num_iterations`` times on that one rollout. The math, with i a completion of group g
(one prompt), t one of its tokens, and rho = pi_theta(y_t) / pi_old(y_t):

* **Advantages** (:func:`group_advantages`, ``--scale_rewards``)::

      group:  A_i = (r_i - mean_g r) / (std_g r + 1e-4)
      batch:  A_i = (r_i - mean_g r) / (std_batch r + 1e-4)     (std of the step's raw rewards)
      none:   A_i =  r_i - mean_g r                             (Dr. GRPO)

  std is the sample standard deviation (Bessel), as in TRL. A sample whose verdict is
  ``infra_error`` (the harness's fault) is left out of every mean and std and gets A = 0.

* **Per-token loss** (:func:`grpo_loss`), clip-higher with separate ``--epsilon`` (low) and
  ``--epsilon_high`` (DAPO; defaults to epsilon)::

      l_t = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
      k3_t = exp(d_t) - d_t - 1,  d_t = log pi_ref(y_t) - log pi_theta(y_t)

  The reference is the base model with the adapter disabled (``with model.disable_adapter():``);
  starting from an SFT adapter it is therefore the BASE, not the SFT policy. ``--beta 0`` (the
  default) runs no reference pass at all.

* **Aggregation** (``--loss_type``), over the sequences and tokens that are in the loss::

      grpo:     mean over sequences of (mean over the sequence's tokens of l_t)
      dapo:     sum of l_t over all tokens of the step / number of those tokens
      dr_grpo:  sum of l_t over all tokens / (number of sequences * --max_new_tokens)

  "In the loss" means: not ``infra_error``, not a truncated completion under
  ``--mask_truncated``, at least one token, and not in a group removed by ``--zero_std``.

* **Several updates per rollout** (``--num_iterations`` = mu): the importance ratio is taken
  against the log-probs of the rollout-time policy. They are the first update's own forward pass,
  detached: the parameters are still the rollout's then, and no extra forward pass is spent. Every
  dropout module is switched off at load (an ``--init_adapter`` keeps its own LoRA dropout in its
  config, 0.05 in the full SFT config), so the policy is one deterministic function of the weights:
  rho = 1 exactly until the weights move, and clipping reacts to updates, not to dropout noise.
  With mu = 1, rho = 1 and the gradient is the policy gradient with the group-mean baseline.

* **Groups with equal rewards** carry no signal (all A = 0). ``--zero_std keep`` leaves them in
  (they count in the normalisers and, with beta > 0, in the KL); ``drop`` removes them from the
  loss; ``resample`` removes them and draws new prompts for the missing groups, up to
  ``--max_resample_rounds`` rounds, so the step keeps its batch size where the budget allows
  (DAPO's dynamic sampling). Logged: ``rollout/frac_reward_zero_std`` (share of the first draw's
  groups with equal rewards) and ``rollout/frac_dropped`` (share of the step's ``--num_prompts``
  groups missing from the loss).

* **Truncated completions** (``max_new_tokens`` reached with no EOS and no stop):
  ``--mask_truncated`` removes them from the loss (DAPO's overlong filtering; they still count in
  their group's mean and std). ``--overlong_penalty`` instead adds DAPO's soft overlong punishment
  to the reward, with L = ``--max_new_tokens`` and B = ``--overlong_buffer``::

      0 if n <= L - B;   (L - B - n) / B if L - B < n <= L      (so -1 at n = L)

  for a completion of n tokens, before advantages and before the equal-reward check.

Rewards (``--reward``): ``auto`` picks ``partial`` when the task file holds stdin/stdout tasks
(0 compile failure, 0.5 compiles, 0.5 + 0.5 k/N for k of N tests, 1 all: the TinyLoRA seed's
table) and ``unit_test`` for function tasks; the others are in coderl/rewards.py. Evaluation
(``--eval_file``, greedy) reports pass@1, compile rate (C++) and average score (the mean partial
reward) as the TinyLoRA seed's tables do; ``--eval_at_start`` adds the row before training.

Speed (measured in bench/bench_rl_step.py against TRL's GRPOTrainer):

* generation: all of a step's prompts x G in one batched generate call with the KV cache, the
  adapter folded into a float32 copy of each adapted weight meanwhile (``--merge_for_generation``:
  one plain matmul per layer instead of peft's base + A + B; the adapter layers themselves are
  never modified);
* update: no row is run twice (the rollout-time log-probs are the first update's own forward);
  each distinct prompt goes through the model once per micro-batch and its G completions continue
  from its cached keys/values, which stay in the autograd graph (``--share_prompt_forward``: the
  same log-probs and gradients as one pass per row, tested); logits only for completion columns;
  a row whose advantage is 0 under ``--beta 0`` has exactly zero gradient, so it counts in the
  normalisers but gets no forward/backward pass at all;
* scoring overlaps generation only with ``--score_chunk_tasks`` (chunks of prompts scored while
  the next chunk generates). Splitting the generate call costs more than it hides when tests are
  fast (toy Python: about 0.1-0.2 s of scoring against 10-15% more generation time), and pays when
  scoring is slow (C++: about 1 s per program on two workers).

Departures from the seeds (TinyLoRA-GRPO-Coder, seeds/001; Nano-Raccoon, seeds/003) and TRL:

* The seed ran TRL's GRPOTrainer; here the algorithm is written out, with the same defaults for
  epsilon (0.2), beta (0), G (4) and the TRL meanings of scale_rewards and loss_type (TRL's default
  loss is dapo, this script's is grpo, the paper's). ``--max_steps`` counts rollouts; each runs
  ``--num_iterations`` optimizer updates, and the learning-rate schedule advances once per rollout.
* TinyLoRA is peft's ``TinyLoraConfig`` (u=32, r=2, one tied vector: exactly 32 trainable float32
  parameters) instead of the seed's hand-written layers; ``--tinylora_u`` changes u.
* Log-probs in the loss are those of the sampling distribution (logits / ``--temperature``, as
  TRL); ``--top_p`` < 1 is not corrected for.
* The end-of-sequence token is not among the trained completion ids (generation reports the text
  and its ids without the end token), so the policy gradient does not act on stopping itself.
* One process only (no ``accelerate launch`` with several processes): the zero-std resampling
  would desynchronise processes' data streams and backward counts.

Logged (``runs/<run_name>/metrics.jsonl`` + TensorBoard): ``rollout/reward_mean``,
``rollout/reward_std``, ``rollout/pass_rate``, ``rollout/completion_tokens``,
``rollout/truncated_frac``, ``rollout/infra_error_frac``, ``rollout/compile_rate`` (C++),
``rollout/frac_reward_zero_std``, ``rollout/frac_dropped``, ``rollout/resample_rounds``,
``train/loss``, ``train/clip_ratio_low``, ``train/clip_ratio_high``, ``train/kl`` (beta > 0),
``train/entropy``, ``train/grad_norm``, ``train/lr``, ``train/advantage_std``,
``train/loss_sequences``, ``train/trainable_params``, ``train/epoch``, ``time/generate``,
``time/score`` (scoring not hidden behind generation), ``time/update``, ``time/step``, and
``eval/pass@1``, ``eval/compile_rate``, ``eval/avg_score`` when validating. Every sampled
completion with its reward, advantage and verdict goes to ``samples.jsonl``.

Tiny CPU run (minutes; the tiny model, toy tasks and SFT adapter come from the tiny preset)::

    python train_grpo_lora.py --model checkpoints/tiny-llama --init_adapter checkpoints/tiny-sft/final \\
        --train_file data/toy_python_train.jsonl --eval_file data/toy_python_test.jsonl \\
        --output_dir checkpoints/tiny-grpo --num_prompts 8 --num_generations 4 --max_new_tokens 64 \\
        --max_steps 30 --learning_rate 2e-4 --sandbox_workers 2

TinyLoRA C++ (the TinyLoRA seed: Qwen2.5-Coder-3B-Instruct in 4-bit, 32 shared parameters, partial
compile-and-run reward, clip-higher, four updates per rollout; one 16-24 GB GPU; the seed's
learning rate 1e-5 is kept, though Adam moves each of the 32 scalars by about that much per
update at most, against an initial spread of 0.02)::

    python prepare_data.py --source code_contests,deepcoder --languages cpp
    python train_grpo_lora.py --model Qwen/Qwen2.5-Coder-3B-Instruct --quantization 4bit \\
        --adapter tinylora --tinylora_u 32 --tinylora_r 2 --prompt_mode instruct \\
        --train_file data/deepcoder_lcbv5_train.jsonl --eval_file data/code_contests_test.jsonl \\
        --output_dir checkpoints/tinylora-grpo-cpp --num_prompts 8 --num_generations 4 \\
        --max_new_tokens 1024 --num_iterations 4 --epsilon 0.2 --epsilon_high 0.28 \\
        --learning_rate 1e-5 --micro_batch_size 2 --max_steps 200 --eval_every 50 \\
        --eval_tasks 165 --eval_max_new_tokens 1024 --eval_at_start --score_chunk_tasks 4
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coderl.cli import derive_seed, parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.models import disable_dropout, gradient_checkpointing_on
from coderl.rewards import RewardArgs, Scored, reward_partial
from coderl.training import (
    ModelArgs,
    Rollout,
    Run,
    TaskStream,
    TrainArgs,
    build_optimizer,
    collect_rollouts,
    count_trainable,
    finish,
    load_optimizer_state,
    load_policy,
    restore,
    rollout_metrics,
    save,
    start_run,
    trainable_parameters,
    validate_common,
    write_json,
)

REWARD_SCALINGS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ZERO_STD_MODES = ("keep", "drop", "resample")
ADAPTERS = ("lora", "qlora", "tinylora")
REWARD_NAMES = ("auto", "unit_test", "partial", "shaped", "weighted")
ADVANTAGE_EPS = 1e-4  # TRL's; keeps a group with a tiny std from blowing up its advantages
EQUAL_REWARD_TOL = 1e-6


# --------------------------------------------------------------------------- options


@dataclass
class GRPOModelArgs(ModelArgs):
    adapter: str = field(
        default="lora",
        metadata={
            "help": "Trainable adapter: lora, qlora (LoRA on a 4-bit NF4 base), or tinylora "
            "(peft TinyLoraConfig: --tinylora_u shared scalars, kept in float32).",
            "choices": list(ADAPTERS),
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LoRA dropout written into a fresh adapter's config. The update itself runs "
            "with every dropout module off, so old and new log-probs are the same function.",
            "range": "[0, 1)",
        },
    )


@dataclass
class GRPOTrainArgs(TrainArgs):
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
class GRPORewardArgs(RewardArgs):
    reward: str = field(
        default="auto",
        metadata={
            "help": "Reward: auto (partial for stdin/stdout task files, unit_test for function "
            "tasks), unit_test, partial, shaped, weighted (see coderl/rewards.py).",
            "choices": list(REWARD_NAMES),
        },
    )


@dataclass
class GRPOArgs:
    train_file: str = field(
        default="data/humaneval_train.jsonl",
        metadata={"help": "Training tasks (JSONL in the task schema)."},
    )
    num_prompts: int = field(
        default=8, metadata={"help": "Prompts (groups) per step.", "range": "[1, inf)"}
    )
    num_generations: int = field(
        default=4,
        metadata={"help": "Completions sampled per prompt (the group size).", "range": "[2, inf)"},
    )
    max_new_tokens: int = field(
        default=256,
        metadata={
            "help": "Generation budget per completion (the max_completion_length of dr_grpo "
            "and of the overlong penalty).",
            "range": "[1, inf)",
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature.", "range": "(0, inf)"}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling threshold.", "range": "(0, 1]"}
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: continue the prompt, cut at stop sequences; instruct: chat template, "
            "code from the first fenced block (instruct models such as Qwen2.5-Coder-Instruct).",
            "choices": ["base", "instruct"],
        },
    )
    generation_batch_size: int = field(
        default=32, metadata={"help": "Sequences per generate call.", "range": "[1, inf)"}
    )
    score_chunk_tasks: int = field(
        default=0,
        metadata={
            "help": "Prompts per generation chunk, scored while the next chunk generates (0 = "
            "one chunk: every prompt of a draw in one generate call, then scoring).",
            "range": "[0, inf)",
        },
    )
    micro_batch_size: int = field(
        default=8,
        metadata={
            "help": "Sequences per forward/backward pass (gradients are accumulated).",
            "range": "[1, inf)",
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Advantage scaling: group ((r - group mean) / group std), batch (/ batch "
            "std), none (r - group mean).",
            "choices": list(REWARD_SCALINGS),
        },
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "Loss aggregation: grpo (token mean per sequence, then mean), dapo (token "
            "mean over the step), dr_grpo (token sum / (sequences * max_new_tokens)).",
            "choices": list(LOSS_TYPES),
        },
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clip range: rho >= 1 - epsilon.", "range": "(0, 1)"}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip range: rho <= 1 + epsilon_high (DAPO: 0.28; default epsilon).",
            "range": "(0, inf)",
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Optimizer updates per rollout (mu), ratio against rollout log-probs.",
            "range": "[1, inf)",
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the k3 KL to the reference (base, adapter off); 0 = no pass.",
            "range": "[0, inf)",
        },
    )
    zero_std: str = field(
        default="keep",
        metadata={
            "help": "Groups whose rewards are all equal: keep, drop (out of the loss), resample "
            "(drop and draw new prompts, up to --max_resample_rounds).",
            "choices": list(ZERO_STD_MODES),
        },
    )
    max_resample_rounds: int = field(
        default=2,
        metadata={"help": "zero_std=resample: extra draws per step at most.", "range": "[0, inf)"},
    )
    mask_truncated: bool = field(
        default=False,
        metadata={"help": "Leave completions that hit --max_new_tokens out of the loss."},
    )
    overlong_penalty: bool = field(
        default=False,
        metadata={"help": "Add DAPO's soft overlong punishment (0 to -1) to the reward."},
    )
    overlong_buffer: int = field(
        default=64,
        metadata={
            "help": "Overlong penalty ramp length in tokens, ending at --max_new_tokens.",
            "range": "[1, inf)",
        },
    )
    share_prompt_forward: bool = field(
        default=True,
        metadata={
            "help": "In the update, run each distinct prompt once per micro-batch and its "
            "completions on its cached keys/values (same numbers as one pass per row)."
        },
    )
    merge_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Generate with the adapter folded into a float32 copy of each adapted weight "
            "(the originals are untouched; skipped for quantized or half-precision bases)."
        },
    )
    eval_at_start: bool = field(
        default=False,
        metadata={
            "help": "Also validate before the first step (the 'before' row, logged at step 0)."
        },
    )


@dataclass
class Options:
    """All parsed options of one run."""

    model: GRPOModelArgs
    train: GRPOTrainArgs
    grpo: GRPOArgs
    reward: GRPORewardArgs

    @property
    def epsilon_high(self) -> float:
        """Computed after parsing: --epsilon_high, or --epsilon when not given."""
        return self.grpo.epsilon if self.grpo.epsilon_high is None else self.grpo.epsilon_high


def validate_args(opts: Options) -> None:
    validate_common(opts.model, opts.train)
    g = opts.grpo
    if g.num_prompts < 1:
        raise UserError("--num_prompts must be at least 1")
    if g.num_generations < 2:
        raise UserError(
            f"--num_generations must be at least 2 (a group needs samples to compare), "
            f"got {g.num_generations}"
        )
    if g.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if g.temperature <= 0:
        raise UserError("--temperature must be > 0 (GRPO needs sampled completions)")
    if not 0 < g.top_p <= 1:
        raise UserError("--top_p must be in (0, 1]")
    if g.generation_batch_size < 1 or g.micro_batch_size < 1:
        raise UserError("--generation_batch_size and --micro_batch_size must be at least 1")
    if g.score_chunk_tasks < 0:
        raise UserError("--score_chunk_tasks must be >= 0")
    if not 0 < g.epsilon < 1:
        raise UserError(f"--epsilon must be in (0, 1), got {g.epsilon}")
    if g.epsilon_high is not None and g.epsilon_high <= 0:
        raise UserError(f"--epsilon_high must be > 0, got {g.epsilon_high}")
    if g.num_iterations < 1:
        raise UserError("--num_iterations must be at least 1")
    if g.beta < 0:
        raise UserError("--beta must be >= 0")
    if g.max_resample_rounds < 0:
        raise UserError("--max_resample_rounds must be >= 0")
    if g.overlong_penalty and not 1 <= g.overlong_buffer <= g.max_new_tokens:
        raise UserError(
            f"--overlong_buffer must be in [1, --max_new_tokens={g.max_new_tokens}], "
            f"got {g.overlong_buffer}"
        )
    checked = {
        "--scale_rewards": (g.scale_rewards, REWARD_SCALINGS),
        "--loss_type": (g.loss_type, LOSS_TYPES),
        "--zero_std": (g.zero_std, ZERO_STD_MODES),
        "--adapter": (opts.model.adapter, ADAPTERS),
        "--reward": (opts.reward.reward, REWARD_NAMES),
    }
    for flag, (value, allowed) in checked.items():
        if value not in allowed:
            raise UserError(f"{flag} {value!r}: choose from {', '.join(allowed)}")
    if opts.model.adapter == "qlora" and opts.model.quantization in ("none", "8bit"):
        raise UserError("--adapter qlora needs a 4-bit base (--quantization 4bit or auto)")


# --------------------------------------------------------------------------- the algorithm


def _nanmean(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    valid = ~torch.isnan(x)
    total = torch.where(valid, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / valid.sum()
    return total.sum(dim, keepdim=keepdim) / valid.sum(dim, keepdim=keepdim)


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation (Bessel) over the non-NaN entries; NaN with fewer than two."""
    valid = ~torch.isnan(x)
    mean = _nanmean(x, dim, keepdim=True) if dim is not None else _nanmean(x)
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=keepdim)
    total = squares.sum() if dim is None else squares.sum(dim, keepdim=keepdim)
    return (total / (count - 1)).sqrt()


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """GRPO advantages for rewards laid out group after group (``group_size`` each).

    NaN marks a sample without a reward (``infra_error``): it is left out of the means and
    stds and its advantage is 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}")
    rewards = rewards.double()
    grouped = rewards.view(-1, group_size)
    centered = grouped - _nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (_nanstd(grouped, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (_nanstd(rewards) + eps)
    return torch.nan_to_num(centered.reshape(-1), nan=0.0).float()


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """One bool per group: True when its (non-NaN) rewards are all equal, i.e. no signal."""
    grouped = rewards.double().view(-1, group_size)
    valid = ~torch.isnan(grouped)
    high = torch.where(valid, grouped, torch.full_like(grouped, -math.inf)).max(dim=1).values
    low = torch.where(valid, grouped, torch.full_like(grouped, math.inf)).min(dim=1).values
    return (valid.sum(dim=1) < 2) | (high - low <= EQUAL_REWARD_TOL)


def overlong_penalty(num_tokens: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -1."""
    free = max_len - buffer
    if num_tokens <= free:
        return 0.0
    return max(-1.0, (free - num_tokens) / buffer)


def grpo_loss(
    new_lp: torch.Tensor,
    old_lp: torch.Tensor,
    ref_lp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    max_completion_length: int,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate (+ beta * k3 KL), aggregated by ``loss_type``.

    ``new_lp``, ``old_lp``, ``ref_lp`` and ``mask`` are (B, T) per completion token, ``advantages``
    (B,). ``num_sequences`` / ``num_tokens`` are the normalisers of the WHOLE step (sequences with
    at least one loss token / loss tokens) when this is one micro-batch of it; by default those of
    the given batch. Summing the returned losses of the micro-batches gives the step's loss.

    Returns the loss and statistics over the masked tokens of this batch: ``clip_ratio_low`` (share
    of tokens where rho < 1 - eps_low with A < 0: clipped, no gradient), ``clip_ratio_high``
    (rho > 1 + eps_high with A > 0), ``kl`` (mean k3; 0 when beta = 0) and ``tokens``.
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


# --------------------------------------------------------------------------- the step's groups


@dataclass
class GroupDraw:
    """What one step's batch assembly did (for the ``rollout/`` metrics)."""

    first_draw_zero_std: int = 0
    first_draw_groups: int = 0
    dropped: int = 0
    resample_rounds: int = 0
    resampled_groups: int = 0


def group_rewards(group: Sequence[Any]) -> torch.Tensor:
    """A group's rewards, NaN where the sample is masked (``infra_error``)."""
    return torch.tensor([r.reward if r.mask else math.nan for r in group], dtype=torch.float64)


def is_zero_std(group: Sequence[Any]) -> bool:
    return bool(zero_std_groups(group_rewards(group), len(group))[0])


def assemble_groups(
    draw: Callable[[int, int], list[list[Any]]],
    num_groups: int,
    zero_std: str,
    max_resample_rounds: int,
) -> tuple[list[list[Any]], GroupDraw]:
    """The step's groups, with equal-reward groups kept, dropped or replaced per ``zero_std``.

    ``draw(count, round)`` samples ``count`` new groups (each a list of items with ``reward`` and
    ``mask``); round 0 is the step's first draw, rounds 1.. are resamples. Under ``resample`` a
    round draws exactly as many groups as are missing; groups still missing after
    ``max_resample_rounds`` rounds are dropped.
    """
    groups = draw(num_groups, 0)
    flags = [is_zero_std(g) for g in groups]
    info = GroupDraw(first_draw_zero_std=sum(flags), first_draw_groups=len(groups))
    if zero_std == "keep":
        return groups, info
    kept = [g for g, flat in zip(groups, flags, strict=True) if not flat]
    if zero_std == "resample":
        while len(kept) < num_groups and info.resample_rounds < max_resample_rounds:
            info.resample_rounds += 1
            fresh = draw(num_groups - len(kept), info.resample_rounds)
            info.resampled_groups += len(fresh)
            kept += [g for g in fresh if not is_zero_std(g)]
    info.dropped = num_groups - len(kept)
    return kept, info


# --------------------------------------------------------------------------- sequences


@dataclass
class PackedBatch:
    """Rows of prompt + completion ids, each distinct prompt stored once.

    Prompts are left-padded (they all end in the last column), completions right-padded (they all
    start in the first): so the logits of every completion token sit in known columns.
    """

    prompt_ids: torch.Tensor  # (U, P), the U distinct prompts
    prompt_mask: torch.Tensor  # (U, P)
    row_prompt: torch.Tensor  # (B,), which prompt each row continues
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C), 1.0 on completion tokens

    @property
    def completion_positions(self) -> torch.Tensor:
        """Position ids of the completion tokens: each row continues its own prompt's count."""
        start = self.prompt_mask.sum(dim=1)[self.row_prompt].unsqueeze(1)
        return start + torch.arange(self.completion_ids.shape[1], device=start.device)


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def pack_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    device=None,
) -> PackedBatch:
    """Ids exactly as generated (never re-tokenized); equal prompts (a group's) stored once."""
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    prompts, prompt_mask = _left_padded(list(distinct), pad_id)
    width = max(max(len(c) for c in completion_ids), 1)
    completions = torch.full((len(completion_ids), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completion_ids), width), dtype=torch.float32)
    for i, c in enumerate(completion_ids):
        completions[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        completion_mask[i, : len(c)] = 1.0
    tensors = [prompts, prompt_mask, torch.tensor(row_prompt), completions, completion_mask]
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    return PackedBatch(*tensors)


def joint_logits(model, batch: PackedBatch) -> torch.Tensor:
    """(B, C, V) logits of the completion tokens from one pass over each full row."""
    width = batch.completion_ids.shape[1]
    input_ids = torch.cat([batch.prompt_ids[batch.row_prompt], batch.completion_ids], dim=1)
    attention = torch.cat(
        [batch.prompt_mask[batch.row_prompt], batch.completion_mask.long()], dim=1
    )
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        logits_to_keep=width + 1,
    ).logits
    return logits[:, :width, :]  # column j predicts completion token j


def shared_prompt_logits(model, batch: PackedBatch) -> torch.Tensor:
    """The same logits, with each distinct prompt run once: its keys/values (part of the graph,
    so gradients flow back through them) are selected for every row that continues it."""
    prompt = model(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=(batch.prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    first = prompt.logits[batch.row_prompt]  # the last prompt column predicts token 0
    if batch.completion_ids.shape[1] == 1:
        return first
    cache = prompt.past_key_values
    cache.batch_select_indices(batch.row_prompt)
    attention = torch.cat(
        [batch.prompt_mask[batch.row_prompt], batch.completion_mask[:, :-1].long()], dim=1
    )
    rest = model(
        input_ids=batch.completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=batch.completion_positions[:, :-1],
        past_key_values=cache,
        use_cache=True,
    ).logits
    return torch.cat([first, rest], dim=1)


def completion_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) of every completion token (B x C), logits shifted before gathering.

    Logits are divided by ``temperature`` (the distribution the tokens were sampled from).
    With ``with_entropy`` also the entropy of each next-token distribution (no gradient).
    """
    # In train mode, checkpointing (by any route) turns the key/value cache off: one pass per row.
    if model.training and gradient_checkpointing_on(model):
        share_prompts = False
    logits = (shared_prompt_logits if share_prompts else joint_logits)(model, batch)
    logprobs, entropies = [], []
    for row in range(logits.shape[0]):  # one row at a time bounds the float32 copy of the logits
        row_logp = torch.log_softmax(logits[row].float() / temperature, dim=-1)
        target = batch.completion_ids[row].unsqueeze(-1)
        logprobs.append(row_logp.gather(-1, target).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                entropies.append(-(row_logp.exp() * row_logp).sum(-1))
    return torch.stack(logprobs), (torch.stack(entropies) if with_entropy else None)


# --------------------------------------------------------------------------- the update


@dataclass
class UpdateStats:
    loss: float = 0.0
    clip_ratio_low: float = 0.0
    clip_ratio_high: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0
    loss_sequences: int = 0
    forward_sequences: int = 0


def micro_batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def loss_rows(rollouts: Sequence[Rollout], mask_truncated: bool) -> list[bool]:
    """Which rollouts are in the loss: scored, not empty, and not truncated when masked."""
    return [
        bool(r.mask and r.completion_ids and not (mask_truncated and r.truncated)) for r in rollouts
    ]


def policy_update(
    run,
    model,
    optimizer,
    rollouts: Sequence[Rollout],
    advantages: torch.Tensor,
    in_loss: Sequence[bool],
    opts: Options,
    pad_id: int,
) -> UpdateStats:
    """``--num_iterations`` optimizer steps on one rollout (each accumulated over micro-batches)."""
    g = opts.grpo
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    params = trainable_parameters(unwrapped)
    stats = UpdateStats()
    # Normalisers of the whole step, whatever the micro-batch.
    num_sequences = sum(in_loss)
    num_tokens = float(sum(len(r.completion_ids) for r, k in zip(rollouts, in_loss) if k))
    stats.loss_sequences = num_sequences
    # A row with A = 0 and no KL term has exactly zero gradient: count it, do not run it.
    run_rows = [
        i for i, keep in enumerate(in_loss) if keep and (g.beta > 0 or float(advantages[i]) != 0)
    ]
    # Rows stay in group order, so a micro-batch holds whole groups: one prompt pass each.
    stats.forward_sequences = len(run_rows)
    chunks = [[run_rows[i] for i in c] for c in micro_batches(len(run_rows), g.micro_batch_size)]
    packed = [
        pack_rows(
            [rollouts[i].prompt_ids for i in c],
            [rollouts[i].completion_ids for i in c],
            pad_id,
            accelerator.device,
        )
        for c in chunks
    ]
    share = g.share_prompt_forward
    old_lps: list[torch.Tensor] = []
    ref_lps: list[torch.Tensor | None] = []
    token_weight = 0.0
    model.train()
    for iteration in range(g.num_iterations):
        zero_gradients(optimizer, params)
        for index, (chunk, batch) in enumerate(zip(chunks, packed, strict=True)):
            first = iteration == 0
            new_lp, entropy = completion_logprobs(
                model, batch, g.temperature, with_entropy=first, share_prompts=share
            )
            if first:
                # The rollout-time log-probs: this very forward, before any update.
                old_lps.append(new_lp.detach())
                ref_lps.append(
                    reference_logprobs(unwrapped, batch, g, share) if g.beta > 0 else None
                )
            loss, st = grpo_loss(
                new_lp,
                old_lps[index],
                ref_lps[index],
                advantages[chunk].to(new_lp.device),
                batch.completion_mask,
                g.epsilon,
                opts.epsilon_high,
                g.beta,
                g.loss_type,
                g.max_new_tokens,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
            )
            accelerator.backward(loss)
            tokens = float(st["tokens"])
            stats.loss += float(loss.detach()) / g.num_iterations
            stats.clip_ratio_low += float(st["clip_ratio_low"]) * tokens
            stats.clip_ratio_high += float(st["clip_ratio_high"]) * tokens
            stats.kl += float(st["kl"]) * tokens
            token_weight += tokens
            if first:
                stats.entropy += float((entropy * batch.completion_mask).sum())
        max_norm = opts.train.max_grad_norm if opts.train.max_grad_norm > 0 else math.inf
        stats.grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
        # Always step, even on a zero gradient: Adam's moments then evolve as for any other step.
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weight = max(token_weight, 1.0)
    stats.clip_ratio_low /= weight
    stats.clip_ratio_high /= weight
    stats.kl /= weight
    stats.entropy /= max(token_weight / g.num_iterations, 1.0)
    return stats


def zero_gradients(optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """Zero (not None) gradients, so a step whose rows all have A = 0 still steps the optimizer."""
    optimizer.zero_grad(set_to_none=False)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def reference_logprobs(unwrapped, batch: PackedBatch, g: GRPOArgs, share: bool) -> torch.Tensor:
    """log pi_ref: the base model (adapter disabled), same mode and temperature as the policy."""
    with torch.no_grad(), unwrapped.disable_adapter():
        ref, _ = completion_logprobs(unwrapped, batch, g.temperature, share_prompts=share)
    return ref


# --------------------------------------------------------------------------- rollouts


def foldable_adapter_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, adapter layer) for every peft adapter layer, or [] when any one of them
    cannot be folded exactly: a quantized or half-precision base weight (a bfloat16 sum would
    round a small update away), DoRA, or an already merged layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, BaseTunerLayer):
                continue
            base = child.get_base_layer()
            weight = getattr(base, "weight", None)
            foldable = (
                type(base) is torch.nn.Linear
                and weight is not None
                and weight.dtype == torch.float32
                and not child.merged
                and not any(
                    getattr(child, "use_dora", {}).get(a, False) for a in child.active_adapters
                )
            )
            if not foldable:
                return []
            found.append((parent, name, child))
    return found


@contextlib.contextmanager
def adapter_folded(model, enabled: bool = True):
    """Inside: each adapted linear layer is replaced by a plain ``nn.Linear`` holding
    ``W + delta W`` (a new tensor), so generation skips peft's per-layer adapter branch; on exit
    the adapter layers go back, their weights never touched. For inference only (no gradient)."""
    layers = foldable_adapter_layers(model) if enabled else []
    with torch.no_grad():
        for parent, name, layer in layers:
            base = layer.get_base_layer()
            folded = torch.nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device="meta"
            )
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            folded.weight = torch.nn.Parameter(base.weight + delta, requires_grad=False)
            folded.bias = base.bias
            setattr(parent, name, folded)
    try:
        yield
    finally:
        for parent, name, layer in layers:
            setattr(parent, name, layer)


class TimedSandbox:
    """Passes work to the sandbox and notes when generation handed over its last chunk.

    ``collect_rollouts`` submits each chunk right after generating it, so the last submission marks
    the end of generation; what is left after it is scoring not hidden behind generation.
    """

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.last_submit = 0.0

    def submit_batch(self, jobs):
        self.last_submit = time.perf_counter()
        return self.sandbox.submit_batch(jobs)

    def __getattr__(self, name):
        return getattr(self.sandbox, name)


def resolve_reward(reward_args: RewardArgs, tasks: Sequence[dict]) -> RewardArgs:
    """``auto`` -> partial when the tasks include stdin/stdout ones, else unit_test."""
    if reward_args.reward != "auto":
        return reward_args
    from coderl.generation import task_kind

    stdio = any(task_kind(t) == "stdio" for t in tasks)
    return dataclasses.replace(reward_args, reward="partial" if stdio else "unit_test")


def sampling_config(g: GRPOArgs):
    from coderl.generation import SamplingConfig

    return SamplingConfig(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        n=g.num_generations,
        batch_size=g.generation_batch_size,
        prompt_mode=g.prompt_mode,
    )


@dataclass
class StepTimes:
    generate: float = 0.0
    score: float = 0.0
    update: float = 0.0


@dataclass
class GRPOLoop:
    """Everything one GRPO step needs; :meth:`step` runs one (also used by bench/)."""

    run: Any
    opts: Options
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    tasks: list[dict]
    stream: TaskStream
    sandbox: TimedSandbox
    reward_args: RewardArgs
    sampling: Any = None
    times: StepTimes = field(default_factory=StepTimes)
    drawn: list[Rollout] = field(default_factory=list)  # every completion sampled this step

    def __post_init__(self):
        if self.sampling is None:
            self.sampling = sampling_config(self.opts.grpo)

    def draw_groups(self, step: int, count: int, round_index: int) -> list[list[Rollout]]:
        """Sample and score ``count`` fresh prompts x G completions; one list per prompt."""
        g = self.opts.grpo
        tasks = [self.tasks[i] for i in self.stream.take(count)]
        started = time.perf_counter()
        self.sandbox.last_submit = started
        policy = self.run.accelerator.unwrap_model(self.model)
        with adapter_folded(policy, g.merge_for_generation):
            rollouts = collect_rollouts(
                policy,
                self.tokenizer,
                tasks,
                self.sampling,
                self.sandbox,
                self.reward_args,
                seed=derive_seed(self.opts.train.seed, step, round_index) % 2**31,
                chunk_tasks=g.score_chunk_tasks or len(tasks),
            )
        self.times.generate += self.sandbox.last_submit - started
        self.times.score += time.perf_counter() - self.sandbox.last_submit
        if g.overlong_penalty:
            for r in rollouts:
                if r.mask:
                    r.reward += overlong_penalty(
                        len(r.completion_ids), g.max_new_tokens, g.overlong_buffer
                    )
        self.drawn.extend(rollouts)
        groups: dict[int, list[Rollout]] = {}
        for r in sorted(rollouts, key=lambda r: (r.task_index, r.sample_index)):
            groups.setdefault(r.task_index, []).append(r)
        return list(groups.values())

    def step(self, step: int) -> tuple[dict[str, Any], list[dict]]:
        """Sample, score, compute advantages, update. Returns (metrics, sample rows)."""
        g = self.opts.grpo
        self.times = StepTimes()
        self.drawn = []
        started = time.perf_counter()
        groups, info = assemble_groups(
            lambda count, round_index: self.draw_groups(step, count, round_index),
            g.num_prompts,
            g.zero_std,
            g.max_resample_rounds,
        )
        rollouts = [r for group in groups for r in group]
        rewards = torch.cat([group_rewards(group) for group in groups]) if groups else None
        advantages = (
            group_advantages(rewards, g.num_generations, g.scale_rewards)
            if rewards is not None
            else torch.zeros(0)
        )
        in_loss = loss_rows(rollouts, g.mask_truncated)
        update_started = time.perf_counter()
        stats = policy_update(
            self.run,
            self.model,
            self.optimizer,
            rollouts,
            advantages,
            in_loss,
            self.opts,
            self.tokenizer.pad_token_id,
        )
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        finished = time.perf_counter()
        self.times.update = finished - update_started
        metrics = self.metrics(rollouts, advantages, in_loss, info, stats)
        metrics.update(
            {
                "train/lr": lr,
                "time/generate": self.times.generate,
                "time/score": self.times.score,
                "time/update": self.times.update,
                "time/step": finished - started,
            }
        )
        return metrics, self.sample_rows(rollouts, advantages, in_loss)

    def sample_rows(self, rollouts, advantages, in_loss) -> list[dict]:
        """Every completion drawn this step; those of dropped groups have no advantage."""
        trained = {
            id(r): (float(a), k)
            for r, a, k in zip(rollouts, advantages.tolist(), in_loss, strict=True)
        }
        rows = []
        for r in self.drawn:
            advantage, keep = trained.get(id(r), (None, False))
            rows.append({**r.log_row(), "advantage": advantage, "in_loss": keep})
        return rows

    def metrics(self, rollouts, advantages, in_loss, info: GroupDraw, stats: UpdateStats) -> dict:
        g = self.opts.grpo
        # rollout/ metrics describe everything sampled, dropped groups included.
        metrics: dict[str, Any] = rollout_metrics(self.drawn)
        kept_adv = advantages[torch.tensor(in_loss, dtype=torch.bool)] if rollouts else None
        metrics.update(
            {
                "rollout/frac_reward_zero_std": info.first_draw_zero_std
                / max(info.first_draw_groups, 1),
                "rollout/frac_dropped": info.dropped / g.num_prompts,
                "rollout/resample_rounds": info.resample_rounds,
                "train/loss": stats.loss,
                "train/clip_ratio_low": stats.clip_ratio_low,
                "train/clip_ratio_high": stats.clip_ratio_high,
                "train/grad_norm": stats.grad_norm,
                "train/loss_sequences": stats.loss_sequences,
                "train/forward_sequences": stats.forward_sequences,
                "train/advantage_std": float(kept_adv.std())
                if kept_adv is not None and len(kept_adv) > 1
                else 0.0,
                "train/epoch": self.stream.epoch,
            }
        )
        if stats.forward_sequences:
            # Entropy is measured on the rows the update ran; a step that ran none has no value
            # (logging 0.0 would read as a collapsed policy).
            metrics["train/entropy"] = stats.entropy
        if g.beta > 0:
            metrics["train/kl"] = stats.kl
        return metrics


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[dict],
    sandbox,
    max_new_tokens: int,
    prompt_mode: str,
    batch_size: int,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy pass@1, compile rate (C++) and average score (mean partial reward) on held-out tasks."""
    from coderl.generation import SamplingConfig, completion_for_sandbox, generate, render_prompt

    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        n=1,
        batch_size=batch_size,
        prompt_mode=prompt_mode,
    )
    with torch.no_grad():
        completions = generate(model, tokenizer, list(tasks), cfg, seed=0)
    jobs = []
    for c in completions:
        task = tasks[c.task_index]
        prompt = render_prompt(task, tokenizer, prompt_mode)
        jobs.append((task, completion_for_sandbox(task, prompt, c.text, prompt_mode)))
    results = sandbox.run_batch(jobs)
    scores = reward_partial(
        [
            Scored(task=t, code=code, num_tokens=c.num_tokens, result=res)
            for (t, code), c, res in zip(jobs, completions, results, strict=True)
        ],
        RewardArgs(reward="partial"),
    )
    n = len(results)
    metrics = {
        "eval/pass@1": sum(r.passed for r in results) / n,
        "eval/avg_score": sum(scores) / n,
        "eval/completion_tokens": sum(c.num_tokens for c in completions) / n,
        "eval/num_tasks": n,
    }
    compiled = [r.compiled for r in results if r.compiled is not None]
    if compiled:
        metrics["eval/compile_rate"] = sum(compiled) / len(compiled)
    rows = [
        {"task_id": t["task_id"], "status": r.status, "passed": r.passed, "score": s}
        for (t, _), r, s in zip(jobs, results, scores, strict=True)
    ]
    return metrics, rows


def results_table(before: dict | None, after: dict) -> str:
    """The TinyLoRA seed's comparison table (markdown)."""

    def cells(m: dict) -> list[str]:
        n = int(m["eval/num_tasks"])
        out = [str(n), f"{m['eval/pass@1']:.2%} ({round(m['eval/pass@1'] * n)}/{n})"]
        rate = m.get("eval/compile_rate")
        out.append("-" if rate is None else f"{rate:.2%}")
        out.append(f"{m['eval/avg_score']:.4f}")
        return out

    names = ["Total Samples", "Pass@1", "Compile Rate", "Average Score"]
    after_cells = cells(after)
    if before is None:
        lines = ["| Metric | After GRPO |", "| --- | --- |"]
        lines += [f"| {n} | {a} |" for n, a in zip(names, after_cells, strict=True)]
    else:
        lines = ["| Metric | Before | After GRPO |", "| --- | --- | --- |"]
        lines += [
            f"| {n} | {b} | {a} |"
            for n, b, a in zip(names, cells(before), after_cells, strict=True)
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def load_task_files(opts: Options, run):
    from coderl.tasks import load_tasks

    train_tasks = load_tasks(opts.grpo.train_file)
    eval_tasks = (
        load_tasks(opts.train.eval_file)[: opts.train.eval_tasks] if opts.train.eval_file else []
    )
    overlap = {t["task_id"] for t in train_tasks} & {t["task_id"] for t in eval_tasks}
    if overlap:
        run.print(
            f"warning: {len(overlap)} validation task ids are also training tasks; "
            "eval/ metrics are not held-out"
        )
    return train_tasks, eval_tasks


def make_sandbox(train_args: TrainArgs):
    from sandbox import Sandbox

    return Sandbox(workers=train_args.sandbox_workers or None, timeout=train_args.sandbox_timeout)


def policy_model_args(model_args: GRPOModelArgs) -> ModelArgs:
    """qlora is LoRA on a 4-bit base: what ``load_policy`` builds from these arguments."""
    if model_args.adapter != "qlora":
        return model_args
    return dataclasses.replace(model_args, adapter="qlora", quantization="4bit")


def run_eval(loop: GRPOLoop, eval_tasks: list[dict], step: int) -> dict:
    opts = loop.opts
    policy = loop.run.accelerator.unwrap_model(loop.model)
    with adapter_folded(policy, opts.grpo.merge_for_generation):
        metrics, rows = evaluate(
            policy,
            loop.tokenizer,
            eval_tasks,
            loop.sandbox,
            opts.train.eval_max_new_tokens,
            opts.grpo.prompt_mode,
            opts.grpo.generation_batch_size,
        )
    loop.model.train()
    line = f"step {step}: eval/pass@1 = {metrics['eval/pass@1']:.3f}"
    line += f", avg_score = {metrics['eval/avg_score']:.3f}"
    if "eval/compile_rate" in metrics:
        line += f", compile_rate = {metrics['eval/compile_rate']:.3f}"
    loop.run.print(f"{line} on {len(eval_tasks)} tasks")
    write_json(loop.run.run_dir / f"eval-step{step}.json", {"metrics": metrics, "results": rows})
    return metrics


def evaluates_at(step: int, train_args: TrainArgs) -> bool:
    return bool(train_args.eval_every) and step % train_args.eval_every == 0


def saved_eval(run: Run, step: int) -> dict | None:
    """The metrics :func:`run_eval` wrote for ``step`` (None when it did not run)."""
    path = run.run_dir / f"eval-step{step}.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    opts = Options(
        *parse_args(
            (GRPOModelArgs, GRPOTrainArgs, GRPOArgs, GRPORewardArgs),
            argv,
            description=__doc__.split("\n\n")[0],
        )
    )
    validate_args(opts)
    run = start_run(opts.train, (opts.model, opts.train, opts.grpo, opts.reward))
    if run.accelerator.num_processes > 1:
        raise UserError("train_grpo_lora.py runs in one process; launch it without accelerate")
    train_tasks, eval_tasks = load_task_files(opts, run)  # a bad file fails before any loading
    model, tokenizer = load_policy(policy_model_args(opts.model), run, run.resume_from)
    run.print(f"dropout modules disabled: {disable_dropout(model)}")
    reward_args = resolve_reward(opts.reward, train_tasks)
    run.config["computed"].update({"reward": reward_args.reward, "epsilon_high": opts.epsilon_high})
    write_json(run.run_dir / "config.json", run.config)
    optimizer, scheduler = build_optimizer(trainable_parameters(model), opts.train)
    stream = TaskStream(len(train_tasks), seed=opts.train.seed)
    start_step = 0
    state = restore(run.resume_from)
    if state is not None:
        load_optimizer_state(run, optimizer, scheduler, state)
        stream.position = state["data_position"]
        start_step = state["step"]
        run.print(f"resumed from {run.resume_from} at step {start_step}")
    # The scheduler is stepped by hand, once per rollout.
    model, optimizer = run.accelerator.prepare(model, optimizer)
    trainable = count_trainable(run.accelerator.unwrap_model(model))
    run.print(f"trainable parameters: {trainable}; reward: {reward_args.reward}")

    from tqdm.auto import tqdm

    sandbox = TimedSandbox(make_sandbox(opts.train))
    loop = GRPOLoop(
        run, opts, model, tokenizer, optimizer, scheduler, train_tasks, stream, sandbox, reward_args
    )
    last_checkpoint = run.resume_from
    before = final = None
    bar = tqdm(total=opts.train.max_steps, initial=start_step, desc="grpo", disable=not run.is_main)
    try:
        if eval_tasks and opts.grpo.eval_at_start and start_step == 0:
            before = run_eval(loop, eval_tasks, 0)
            run.logger.log(before, 0)
        for step in range(start_step + 1, opts.train.max_steps + 1):
            metrics, rows = loop.step(step)
            metrics["train/trainable_params"] = trainable
            # The last step validates before its checkpoint, so the logs a resume keeps hold it.
            if eval_tasks and (evaluates_at(step, opts.train) or step == opts.train.max_steps):
                final = run_eval(loop, eval_tasks, step)
                metrics.update(final)
            run.logger.log(metrics, step)
            run.logger.log_samples(rows, step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics.get('rollout/reward_mean', 0.0):.3f}",
                zero_std=f"{metrics['rollout/frac_reward_zero_std']:.2f}",
            )
            if step % opts.train.save_every == 0 or step == opts.train.max_steps:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data_position": stream.position,
                }
                last_checkpoint = save(
                    run, step, model, trainer_state, metrics, opts.train.keep_last
                )
    finally:
        bar.close()
        sandbox.close()
    finish(run, last_checkpoint)
    if eval_tasks and start_step > 0:  # a resumed run: what earlier processes measured
        before = before or saved_eval(run, 0)
        final = final or saved_eval(run, opts.train.max_steps)
    if final is not None:
        table = results_table(before, final)
        write_json(run.output_dir / "final_eval.json", {"before": before, "after": final})
        print(table)


if __name__ == "__main__":
    main()
