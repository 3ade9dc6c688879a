"""PPO-Clip on code tasks with unit-test rewards, training a LoRA / QLoRA / TinyLoRA adapter.

Each iteration samples ``--num_generations`` completions for each of ``--batch_size`` training
tasks, runs them in the sandbox, turns verdicts into rewards (``--reward``, coderl/rewards.py),
then makes ``--ppo_epochs`` shuffled passes over the batch in ``--num_minibatches`` minibatches
(one optimizer step each) with the clipped surrogate objective. Two variants:

* ``--variant token`` (default): token-level PPO. A linear value head on the policy's last hidden
  state (fp32, its own parameter group in the same AdamW, saved as ``value_head.pt`` next to the
  adapter and restored on resume) predicts the return from each prefix. Per-token rewards are
  ``-kl_coef * (log pi - log pi_ref)`` (k1) on every completion token plus the task reward on the
  last one; advantages by GAE (``--gamma`` 1, ``--gae_lambda`` 0.95), whitened over the batch's
  completion tokens; loss = clipped policy loss + ``vf_coef`` * value loss (optionally clipped,
  ``--value_clip``) - ``ent_coef`` * entropy. Clip 0.2, vf 0.5, entropy 0.01, max grad norm 0.5:
  the VeriGenLLM-v2 seed's configuration.
* ``--variant sequence``: the RL-Code-Agent seed's algorithm, made correct. One ratio per
  completion, ``exp(sum_t log pi - sum_t log pi_old)``; advantages = rewards normalised over the
  batch, ``(r - mean) / (std + 1e-8)``; loss ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)``
  averaged over samples. No value head, KL or entropy term (as the seed; ``train/kl_ref`` is
  still logged). A sum of ~100 token log-ratios moves fast: expect a high ``train/clip_frac``.

KL reference (``--kl_reference``): ``base`` = the base model, adapter disabled
(``with model.disable_adapter():``); ``init`` = the policy PPO starts from, i.e. a frozen copy of
the starting adapter's weights swapped in for the reference pass (kept in every checkpoint).
Starting from an SFT adapter, ``base`` penalises the SFT changes themselves; use ``init`` (or
``--kl_coef 0``) when the base is far from the SFT policy, as with the tiny preset's base.

Old log-probabilities are recomputed by a forward pass over the sampled ids before the first
update, in the same mode as the updates: train mode with every dropout module set to p=0 (LoRA
dropout included, also for an ``--init_adapter`` saved with dropout). Old and new log-probs are
then one deterministic function of the weights, the ratio is 1 on the first minibatch (logged as
``train/ratio_dev_first``, the largest |log ratio| there) and both match the policy that sampled
(generation runs without dropout too). Train mode rather than eval mode keeps gradient
checkpointing active. Log-probs use the sampling ``--temperature`` (logits / T), like TRL.

Samples that cannot be learned from (``infra_error``: the harness's fault; or no generated token)
stay in the batch with a zero mask: they weigh nothing in the loss or in the advantage statistics,
and every process still runs the same passes.

One iteration is one ``--max_steps`` step: the learning-rate schedule advances once per iteration.

Logged (``runs/<name>/metrics.jsonl`` + TensorBoard): ``rollout/reward_mean``,
``rollout/pass_rate``, ``rollout/completion_tokens`` (+ ``reward_std``, ``truncated_frac``,
``infra_error_frac``), ``train/policy_loss``, ``train/value_loss``, ``train/entropy``,
``train/kl_ref`` (sum over a completion of log pi - log pi_ref, mean over samples),
``train/approx_kl`` (k3 of old vs new, mean over updates), ``train/clip_frac`` (share of entries
where the clipped term is the active one), ``train/explained_variance`` (of the returns by the
old values), ``train/value_mean``, ``train/ratio_dev_first``, ``train/grad_norm`` (before
clipping; ``train/grad_norm_adapter`` and ``train/grad_norm_value_head`` per group, each clipped to
``--max_grad_norm`` on its own), ``train/loss``, ``train/lr``, ``train/updates``, ``train/epoch``, ``time/generate``,
``time/score`` (scoring not hidden behind generation), ``time/update`` (old log-probs, reference,
advantages and all updates), and ``eval/pass@1`` when validating. Every sample with its reward,
verdict and completion goes to ``samples.jsonl``.

Trainable parameters are counted apart: ``computed.trainable_params_adapter`` (TinyLoRA with the
defaults: 32) and ``computed.trainable_params_value_head`` (hidden size + 1; 0 for ``sequence``),
in ``runs/<name>/config.json`` and every checkpoint's ``meta.json``.

Departures from the seeds:

* RL-Code-Agent computed ``logp_old`` and the new log-probs in different dropout modes, so the
  ratio was not 1 before any update and clipping acted on dropout noise; here one mode, no dropout.
* Its PPO had no value head (kept as ``--variant sequence``); the VeriGenLLM-v2 seed's value head
  was not in the optimizer, so it never learned. Here it is in the optimizer (tested) and saved.
* RL-Code-Agent trained and evaluated on the same 33 HumanEval tasks; here validation
  (``--eval_file``) reads a separate held-out file (a warning names any shared task id).
* Verdicts come from the sandbox (no ``signal.alarm`` inside the evaluated process), and
  ``infra_error`` samples are masked out instead of being scored 0.

Tiny CPU run (the tiny model, toy data and SFT adapter come from the tiny preset)::

    python train_ppo_lora.py --model checkpoints/tiny-llama \
        --init_adapter checkpoints/tiny-sft/final --train_file data/toy_python_train.jsonl \
        --eval_file data/toy_python_test.jsonl --output_dir checkpoints/tiny-ppo \
        --max_steps 20 --batch_size 16 --num_generations 4 --num_minibatches 4 \
        --learning_rate 5e-4 --max_new_tokens 64 --kl_reference init --sandbox_workers 2

The seed's GPU setting (4-bit QLoRA on deepseek-coder-1.3b-base, unit-test reward with length
penalty 0.01, batch 4; 0.03 and batch 8 are the seed's other runs)::

    python train_ppo_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \
        --init_adapter checkpoints/deepseek_1_3b_lora_sft/final \
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \
        --output_dir checkpoints/deepseek_1_3b_lora_ppo_alpha0.01 --quantization 4bit \
        --variant token --reward unit_test --length_alpha 0.01 --batch_size 4 --ppo_epochs 4 \
        --num_minibatches 2 --learning_rate 1e-5 --max_new_tokens 256 --max_steps 100

Multi-GPU: ``accelerate launch train_ppo_lora.py ...``: every process samples its share of the
global batch; advantage statistics are per process.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coderl.cli import derive_seed, parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.models import disable_dropout, save_adapter
from coderl.rewards import RewardArgs
from coderl.training import (
    ModelArgs,
    Rollout,
    Run,
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
    validate,
    validate_common,
    write_json,
)

VALUE_HEAD_FILE = "value_head.pt"


# --------------------------------------------------------------------------- options


@dataclass
class PPOModelArgs(ModelArgs):
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LoRA dropout of a fresh adapter (PPO disables every dropout module anyway, "
            "so old and new log-probs are computed the same way).",
            "range": "[0, 1)",
        },
    )


@dataclass
class PPOTrainArgs(TrainArgs):
    max_steps: int = field(
        default=100,
        metadata={
            "help": "PPO iterations: one rollout batch, then ppo_epochs x num_minibatches "
            "optimizer updates (the LR schedule advances once per iteration).",
            "range": "[1, inf)",
        },
    )
    max_grad_norm: float = field(
        default=0.5,
        metadata={
            "help": "Gradient clipping norm (0 = off), applied to the adapter and the value "
            "head apart; the seed's 0.5.",
            "range": "[0, inf)",
        },
    )
    save_every: int = field(
        default=25,
        metadata={
            "help": "Checkpoint every N iterations and at the end (N > --max_steps: only at the end).",
            "range": "[1, inf)",
        },
    )


@dataclass
class PPOArgs:
    train_file: str = field(
        default="data/humaneval_train.jsonl",
        metadata={"help": "Training tasks (JSONL in the task schema)."},
    )
    variant: str = field(
        default="token",
        metadata={
            "help": "token: per-token PPO with a value head, GAE and a KL penalty; sequence: "
            "the seed's sequence-ratio PPO with batch-normalised rewards.",
            "choices": ["token", "sequence"],
        },
    )
    batch_size: int = field(
        default=8,
        metadata={"help": "Tasks per iteration and process (seed: 4 and 8).", "range": "[1, inf)"},
    )
    num_generations: int = field(
        default=1, metadata={"help": "Completions sampled per task.", "range": "[1, inf)"}
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
        metadata={
            "help": "token: clip value predictions to old value +- this in the value loss "
            "(0 = unclipped value loss).",
            "range": "[0, inf)",
        },
    )
    ent_coef: float = field(
        default=0.01, metadata={"help": "token: weight of the entropy bonus.", "range": "[0, inf)"}
    )
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "token: per-token KL penalty to the reference, folded into rewards.",
            "range": "[0, inf)",
        },
    )
    kl_reference: str = field(
        default="base",
        metadata={
            "help": "KL reference: base (the base model, adapter disabled) or init (the policy "
            "PPO starts from: a frozen copy of the starting adapter's weights, e.g. the SFT "
            "adapter; the same as base for a fresh adapter).",
            "choices": ["base", "init"],
        },
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
            "help": "token: learning rate of the value head (its own parameter group in the "
            "same optimizer); 0 = --learning_rate.",
            "range": "[0, inf)",
        },
    )
    target_kl: float = field(
        default=0.0,
        metadata={
            "help": "Stop an iteration's updates once a minibatch's approx KL (k3, old vs new) "
            "exceeds 1.5 x this (0 = off; run all ppo_epochs).",
            "range": "[0, inf)",
        },
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation budget per sample.", "range": "[1, inf)"}
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; log-probs use the same temperature.",
            "range": "(0, inf)",
        },
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling (1 = off).", "range": "(0, 1]"}
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: the raw prompt; instruct: the tokenizer's chat template.",
            "choices": ["base", "instruct"],
        },
    )
    generation_batch_size: int = field(
        default=8, metadata={"help": "Sequences generated at once.", "range": "[1, inf)"}
    )


def validate_ppo_args(args: PPOArgs) -> None:
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.num_generations < 1:
        raise UserError("--num_generations must be at least 1")
    if args.ppo_epochs < 1:
        raise UserError("--ppo_epochs must be at least 1")
    if not 1 <= args.num_minibatches <= args.batch_size * args.num_generations:
        raise UserError("--num_minibatches must be between 1 and batch_size * num_generations")
    if args.clip_epsilon <= 0:
        raise UserError("--clip_epsilon must be positive")
    if not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        raise UserError("--gamma and --gae_lambda must lie in [0, 1]")
    for name in (
        "vf_coef",
        "value_clip",
        "ent_coef",
        "kl_coef",
        "value_learning_rate",
        "target_kl",
    ):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative")
    if args.temperature <= 0:
        raise UserError("--temperature must be positive (PPO samples; greedy is not a policy)")
    if not 0 < args.top_p <= 1:
        raise UserError("--top_p must lie in (0, 1]")
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")


# --------------------------------------------------------------------------- the math


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the entries where ``mask`` is 1."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; zero outside the mask."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def normalize_rewards(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The seed's sequence advantages: ``(r - mean) / (std + eps)`` over the batch."""
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return (rewards - rewards.mean()) / (std + eps)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` everywhere in the completion, plus
    the task reward ``scores[i]`` on row i's last completion token (rows whose mask is all zero
    get nothing). Also returns the per-token KL estimate (k1), zero outside the mask."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.nonzero(mask.sum(1) > 0).squeeze(1)  # a sample without tokens takes no action
    rewards[rows, last_token_index(mask[rows])] += scores[rows].to(rewards.dtype)
    return rewards, kl


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last 1 in ``mask`` (every row must have one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, -1).max(dim=1).values


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.0,
) -> torch.Tensor:
    """``0.5 * mean((V - R)^2)`` over masked entries; with ``clip > 0`` the pessimistic maximum
    with the loss of ``V`` clipped to ``old_values +- clip`` (PPO2's clipped value loss)."""
    losses = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        losses = torch.maximum(losses, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def approx_kl(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """k3 estimator of KL(old || new): ``E[(r - 1) - log r]``, ``r = new / old`` (never negative)."""
    log_ratio = (new_logprobs - old_logprobs).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over masked entries (nan when the returns do not vary)."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


# --------------------------------------------------------------------------- policy + value head


class ValueHead(torch.nn.Module):
    """A linear map from the last hidden state to a scalar, kept in fp32 whatever the policy's
    dtype. Zero-initialised, so the first advantages are the (KL-shaped) returns themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(torch.nn.Module):
    """The adapter-wrapped causal LM and (token variant) its value head, as one module so that
    accelerate wraps, and checkpoints save, both together."""

    def __init__(self, policy, value_head: ValueHead | None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        # --kl_reference init: the adapter's starting weights (None: the base is the reference).
        self.reference_weights: list[torch.Tensor] | None = None

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def keep_reference_weights(self, weights: list[torch.Tensor] | None = None) -> None:
        """Freeze a copy of the adapter's weights (or of ``weights``) as the KL reference."""
        source = weights if weights is not None else self.adapter_parameters()
        self.reference_weights = [w.detach().clone() for w in source]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs of ``input_ids[:, 1:]``, entropies and values, each B x T-1: entry
        t belongs to the prefix ending at token t (logits shifted before gathering).

        Log-probs and entropies only where ``mask`` (None: everywhere) is 1, zero elsewhere;
        values everywhere (the value head is cheap and reads every hidden state anyway)."""
        mask = all_positions(input_ids) if mask is None else mask
        out = masked_token_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            mask,
            temperature,
            return_entropy=True,
            return_hidden=self.value_head is not None,
        )
        values = None
        if self.value_head is not None:
            values = self.value_head(out.hidden[:, :-1])
        return spread_over_mask(out.logprobs, mask), spread_over_mask(out.entropy, mask), values

    @torch.no_grad()
    def reference_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probs under the reference: the same network with the adapter switched off (base),
        or with the adapter's starting weights swapped in for the pass (init). Only where
        ``mask`` (None: everywhere) is 1, zero elsewhere."""
        switch = (
            self.policy.disable_adapter()
            if self.reference_weights is None
            else swapped_weights(self.adapter_parameters(), self.reference_weights)
        )
        mask = all_positions(input_ids) if mask is None else mask
        with switch:
            out = masked_token_logprobs(self.policy, input_ids, attention_mask, mask, temperature)
        return spread_over_mask(out.logprobs, mask)

    def save_pretrained(self, path: str) -> None:
        save_adapter(self.policy, path)  # with base_model.json, as the other trainers write
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), Path(path) / VALUE_HEAD_FILE)


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], weights: list[torch.Tensor]):
    """Temporarily give ``params`` the values ``weights`` (no autograd record; restored after)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)


def hidden_size_of(policy) -> int:
    config = policy.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise UserError("cannot find the model's hidden size for the value head")
    return int(size)


def build_value_head(policy, source: Path | None, device) -> ValueHead:
    """A fresh value head, or the one saved in ``source`` (a checkpoint or an adapter folder)."""
    head = ValueHead(hidden_size_of(policy))
    if source is not None and (source / VALUE_HEAD_FILE).is_file():
        head.load_state_dict(torch.load(source / VALUE_HEAD_FILE, map_location="cpu"))
    return head.to(device)


def optimizer_groups(model: PolicyWithValue, args: PPOArgs, lr: float) -> list[dict]:
    """The adapter's trainable parameters and, as a second group, the value head's."""
    groups = [{"params": model.adapter_parameters(), "name": "adapter"}]
    if model.value_head is not None:
        groups.append(
            {
                "params": list(model.value_head.parameters()),
                "lr": args.value_learning_rate or lr,
                "name": "value_head",
            }
        )
    return groups


# --------------------------------------------------------------------------- one PPO iteration


@dataclass
class Batch:
    """A rollout batch in tensors, with everything fixed before the first update."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # B x T-1: 1 on the completion tokens of usable samples
    sample_mask: torch.Tensor  # B: 1 for usable samples
    scores: torch.Tensor  # B task rewards
    old_logprobs: torch.Tensor  # B x T-1
    ref_logprobs: torch.Tensor  # B x T-1
    advantages: torch.Tensor  # token: B x T-1; sequence: B
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def usable(rollout: Rollout) -> bool:
    """Whether a sample enters the loss: not an infra_error, and at least one generated token.

    The others stay in the batch with a zero mask, so every process runs the same number of
    forward / backward passes (accelerate's gradient synchronisation needs that)."""
    return bool(rollout.mask) and len(rollout.completion_ids) > 0


@torch.no_grad()
def forward_in_chunks(
    model: PolicyWithValue, input_ids, attention_mask, mask, temperature, chunk: int
):
    """Log-probs and reference log-probs (where ``mask`` is 1) and values of a whole batch,
    ``chunk`` rows at a time."""
    logprobs, values, ref = [], [], []
    for start in range(0, input_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        ids, att, part = input_ids[rows], attention_mask[rows], mask[rows]
        lp, _, v = model(ids, att, temperature, mask=part)
        logprobs.append(lp)
        values.append(v)
        ref.append(model.reference_logprobs(ids, att, temperature, mask=part))
    stacked_values = torch.cat(values) if values[0] is not None else None
    return torch.cat(logprobs), stacked_values, torch.cat(ref)


def make_batch(
    model: PolicyWithValue,
    rollouts: list[Rollout],
    pad_id: int,
    args: PPOArgs,
    device,
) -> tuple[Batch, dict[str, float]]:
    """Pack rollouts, recompute old log-probs (same mode as the updates), reference log-probs,
    and the advantages of the chosen variant."""
    input_ids, attention_mask, mask = pack_sequences(
        [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id, device
    )
    sample_mask = torch.tensor([usable(r) for r in rollouts], dtype=torch.float32, device=device)
    mask = mask * sample_mask[:, None]
    scores = torch.tensor([r.reward for r in rollouts], dtype=torch.float32, device=device)
    chunk = max(1, math.ceil(len(rollouts) / args.num_minibatches))
    old_logprobs, old_values, ref_logprobs = forward_in_chunks(
        model, input_ids, attention_mask, mask, args.temperature, chunk
    )
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
    batch = Batch(
        input_ids,
        attention_mask,
        mask,
        sample_mask,
        scores,
        old_logprobs,
        ref_logprobs,
        advantages,
        old_values,
        returns,
    )
    return batch, metrics


def minibatch_loss(
    model, batch: Batch, rows: torch.Tensor, args: PPOArgs
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The loss of one minibatch and its diagnostics (also the per-entry log-ratio)."""
    mask = batch.mask[rows]
    logprobs, entropy, values = model(
        batch.input_ids[rows], batch.attention_mask[rows], args.temperature, mask=mask
    )
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
    batch: Batch,
    args: PPOArgs,
    max_grad_norm: float,
    accelerator,
    seed: int,
) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes over the batch, one optimizer step per minibatch.

    With ``--target_kl`` > 0 the iteration stops before a step whose minibatch already drifted
    past 1.5 x target_kl (k3 of old vs new, averaged over processes), as in Stable-Baselines3.
    """
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    ratio_dev_first = None
    stopped = False
    for _ in range(args.ppo_epochs):
        order = torch.randperm(batch.size, generator=generator).to(batch.input_ids.device)
        for rows in torch.tensor_split(order, args.num_minibatches):
            loss, stats, log_ratio = minibatch_loss(model, batch, rows, args)
            if ratio_dev_first is None:
                ratio_dev_first = log_ratio.abs().max().item()
            if (
                args.target_kl > 0
                and mean_over_processes(accelerator, stats["train/approx_kl"])
                > 1.5 * args.target_kl
            ):
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
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


def clip_each_group(optimizer, max_grad_norm: float) -> dict[str, float]:
    """Clip the adapter's and the value head's gradients apart, each to ``max_grad_norm``.

    The value loss of a fresh head is large and its gradient dwarfs the policy's early on: one
    global clip would then scale the policy step down by the critic's norm. Returns each group's
    norm before clipping (``train/grad_norm_<group>``) and their combined norm (``train/grad_norm``).
    """
    limit = max_grad_norm or float("inf")
    norms = {}
    for index, group in enumerate(optimizer.param_groups):
        norm = torch.nn.utils.clip_grad_norm_(group["params"], limit)
        norms[f"train/grad_norm_{group.get('name', index)}"] = float(norm)
    norms["train/grad_norm"] = math.hypot(*norms.values())
    return norms


def mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    return accelerator.reduce(tensor, reduction="mean").item()


# --------------------------------------------------------------------------- rollouts


class TimedSandbox:
    """Passes jobs to the sandbox and notes when the last chunk was handed over: generation is
    done by then, so what comes after is the scoring time generation did not hide."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.last_submit = time.perf_counter()

    def submit_batch(self, jobs):
        self.last_submit = time.perf_counter()
        return self.sandbox.submit_batch(jobs)


def rollout_step(
    model, tokenizer, tasks, sampling, sandbox, reward_args, seed
) -> tuple[list[Rollout], dict[str, float]]:
    timed = TimedSandbox(sandbox)
    start = time.perf_counter()
    rollouts = collect_rollouts(model, tokenizer, tasks, sampling, timed, reward_args, seed=seed)
    end = time.perf_counter()
    timing = {"time/generate": timed.last_submit - start, "time/score": end - timed.last_submit}
    return rollouts, timing


# --------------------------------------------------------------------------- main


def load_value_head_source(model_args: ModelArgs, resume_from: Path | None) -> Path | None:
    if resume_from is not None:
        if not (resume_from / VALUE_HEAD_FILE).is_file():
            raise UserError(
                f"{resume_from} has no {VALUE_HEAD_FILE}: it was not written by --variant token"
            )
        return resume_from
    return Path(model_args.init_adapter) if model_args.init_adapter else None


def record_parameter_counts(run: Run, model: PolicyWithValue) -> None:
    """Computed after parsing: trainable parameters of the adapter and of the value head."""
    adapter = count_trainable(model.policy)
    head = sum(p.numel() for p in model.value_head.parameters()) if model.value_head else 0
    run.config["computed"]["trainable_params_adapter"] = adapter
    run.config["computed"]["trainable_params_value_head"] = head
    if run.is_main:
        write_json(run.run_dir / "config.json", run.config)
    run.print(f"trainable parameters: adapter {adapter:,} + value head {head:,}")


def load_task_files(ppo_args: PPOArgs, train_args: TrainArgs, run: Run):
    from coderl.tasks import load_tasks

    train_tasks = load_tasks(ppo_args.train_file)
    eval_tasks = (
        load_tasks(train_args.eval_file)[: train_args.eval_tasks] if train_args.eval_file else []
    )
    overlap = {t["task_id"] for t in train_tasks} & {t["task_id"] for t in eval_tasks}
    if overlap:
        run.print(
            f"warning: {len(overlap)} validation task ids are also training tasks; "
            "eval/ metrics are not held-out"
        )
    return train_tasks, eval_tasks


def any_usable(accelerator, rollouts: list[Rollout]) -> bool:
    """Whether any process has a sample to learn from (all processes then update, or none)."""
    count = torch.tensor([float(sum(usable(r) for r in rollouts))], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return count.item() > 0


def ppo_iteration(
    run: Run,
    step: int,
    model,
    optimizer,
    scheduler,
    tokenizer,
    tasks: list[dict],
    sandbox,
    sampling,
    ppo_args: PPOArgs,
    train_args: TrainArgs,
    reward_args: RewardArgs,
) -> tuple[dict[str, Any], list[Rollout]]:
    """Sample and score, then fix the batch (old log-probs, values, advantages) and update."""
    accelerator = run.accelerator
    unwrapped: PolicyWithValue = accelerator.unwrap_model(model)
    rollouts, metrics = rollout_step(
        unwrapped.policy,
        tokenizer,
        tasks,
        sampling,
        sandbox,
        reward_args,
        seed=derive_seed(train_args.seed, step, accelerator.process_index) % 2**31,
    )
    metrics.update(rollout_metrics(rollouts))
    started = time.perf_counter()
    if any_usable(accelerator, rollouts):
        batch, batch_metrics = make_batch(
            unwrapped, rollouts, tokenizer.pad_token_id, ppo_args, accelerator.device
        )
        metrics.update(batch_metrics)
        update_seed = derive_seed(train_args.seed, step, "minibatches")
        metrics.update(
            ppo_update(
                model,
                optimizer,
                batch,
                ppo_args,
                train_args.max_grad_norm,
                accelerator,
                update_seed,
            )
        )
    else:
        run.print(f"step {step}: no usable sample (all infra_error or empty); no update")
    metrics["train/lr"] = scheduler.get_last_lr()[0]
    scheduler.step()
    metrics["time/update"] = time.perf_counter() - started
    return metrics, rollouts


def run_validation(run: Run, model, tokenizer, tasks, sandbox, train_args, ppo_args) -> dict:
    """Greedy pass@1 on the held-out tasks, on the main process only."""
    result: dict = {}
    if run.is_main:
        result = validate(
            run.accelerator.unwrap_model(model).policy,
            tokenizer,
            tasks,
            sandbox,
            max_new_tokens=train_args.eval_max_new_tokens,
            prompt_mode=ppo_args.prompt_mode,
            batch_size=ppo_args.generation_batch_size,
        )
        run.print(f"eval/pass@1 = {result['eval/pass@1']:.3f} on {len(tasks)} tasks")
    run.accelerator.wait_for_everyone()
    return result


def evaluates_at(step: int, train_args: TrainArgs) -> bool:
    return (
        bool(train_args.eval_file and train_args.eval_every) and step % train_args.eval_every == 0
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    model_args, train_args, ppo_args, reward_args = parse_args(
        (PPOModelArgs, PPOTrainArgs, PPOArgs, RewardArgs),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    validate_common(model_args, train_args)
    validate_ppo_args(ppo_args)
    run = start_run(train_args, (model_args, train_args, ppo_args, reward_args))
    accelerator = run.accelerator
    train_tasks, eval_tasks = load_task_files(ppo_args, train_args, run)

    policy, tokenizer = load_policy(model_args, run, run.resume_from)
    value_head = None
    if ppo_args.variant == "token":
        source = load_value_head_source(model_args, run.resume_from)
        value_head = build_value_head(policy, source, accelerator.device)
    model = PolicyWithValue(policy, value_head)
    run.print(f"dropout modules disabled: {disable_dropout(model)}")
    model.train()
    record_parameter_counts(run, model)
    optimizer, scheduler = build_optimizer(
        optimizer_groups(model, ppo_args, train_args.learning_rate), train_args
    )

    stream = TaskStream(len(train_tasks), seed=train_args.seed)
    start_step = 0
    if ppo_args.kl_reference == "init":
        model.keep_reference_weights()
    state = restore(run.resume_from)  # after every model / head init: the RNG is as saved
    if state is not None:
        load_optimizer_state(run, optimizer, scheduler, state)
        stream.position = state["data_position"]
        start_step = state["step"]
        if ppo_args.kl_reference == "init":
            model.keep_reference_weights(state["reference_weights"])
        run.print(f"resumed from {run.resume_from} at step {start_step}")
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per process.
    # device_placement off: the loader placed the (possibly quantized) model already.
    unwrapped = model
    model = accelerator.prepare_model(model, device_placement=False)
    optimizer = accelerator.prepare_optimizer(optimizer)

    from tqdm.auto import tqdm

    from coderl.generation import SamplingConfig
    from sandbox import Sandbox

    sampling = SamplingConfig(
        max_new_tokens=ppo_args.max_new_tokens,
        temperature=ppo_args.temperature,
        top_p=ppo_args.top_p,
        n=ppo_args.num_generations,
        batch_size=ppo_args.generation_batch_size,
        prompt_mode=ppo_args.prompt_mode,
    )
    sandbox = Sandbox(
        workers=train_args.sandbox_workers or None, timeout=train_args.sandbox_timeout
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    last_checkpoint = run.resume_from  # what finish() exports if no step is left to run
    bar = tqdm(
        total=train_args.max_steps,
        initial=start_step,
        desc=f"ppo-{ppo_args.variant}",
        disable=not run.is_main,
    )
    try:
        for step in range(start_step + 1, train_args.max_steps + 1):
            # Every process draws the same global batch and keeps its own slice of it.
            indices = stream.take(ppo_args.batch_size * world)[rank::world]
            metrics, rollouts = ppo_iteration(
                run,
                step,
                model,
                optimizer,
                scheduler,
                tokenizer,
                [train_tasks[i] for i in indices],
                sandbox,
                sampling,
                ppo_args,
                train_args,
                reward_args,
            )
            metrics["train/epoch"] = stream.epoch
            last = step == train_args.max_steps
            if evaluates_at(step, train_args) or (last and eval_tasks):
                metrics.update(
                    run_validation(run, model, tokenizer, eval_tasks, sandbox, train_args, ppo_args)
                )
            run.logger.log(metrics, step)
            run.logger.log_samples([sample_row(r) for r in rollouts], step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['rollout/reward_mean']:.3f}",
                pass_rate=f"{metrics['rollout/pass_rate']:.2f}",
            )
            if step % train_args.save_every == 0 or last:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data_position": stream.position,
                    "reference_weights": unwrapped.reference_weights,
                }
                last_checkpoint = save(
                    run, step, model, trainer_state, metrics, train_args.keep_last
                )
    finally:
        bar.close()
        sandbox.close()
    finish(run, last_checkpoint)


def sample_row(rollout: Rollout) -> dict:
    return {**rollout.log_row(), "masked": not usable(rollout)}


if __name__ == "__main__":
    main()
