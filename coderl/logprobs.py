"""Log-probabilities of completions after their prompts: the one packed-batch layout and the one
tempered log-prob function every training script uses.

A batch holds each distinct prompt once (left-padded, so every prompt ends in the last column) and
one right-padded completion per row (so every completion starts in the first column). Ids are
exactly the sampled or tokenized ones, concatenated, never re-tokenized. Column ``j`` of every
per-token tensor belongs to completion token ``j``: its log-prob given the prompt and the
completion tokens before it.

The output head and the float32 log-softmax run only for completion tokens: the prompt (most of
each row) produces no logits at all. With ``share_prompts`` each distinct prompt runs once per
batch and the rows that continue it attend to its cached keys/values, which stay in the autograd
graph (the same numbers as one pass per row, up to float rounding).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from coderl.models import gradient_checkpointing_on


@dataclass
class PackedBatch:
    """Rows of prompt + completion ids, each distinct prompt stored once."""

    prompt_ids: torch.Tensor  # (U, P), the U distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (U, P)
    row_prompt: torch.Tensor  # (B,), which prompt each row continues
    completion_ids: torch.Tensor  # (B, C), right-padded
    completion_mask: torch.Tensor  # (B, C), 1.0 on completion tokens

    @property
    def completion_positions(self) -> torch.Tensor:
        """Position ids of the completion tokens: each row continues its own prompt's count."""
        start = self.prompt_mask.sum(dim=1)[self.row_prompt].unsqueeze(1)
        return start + torch.arange(self.completion_ids.shape[1], device=start.device)

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, index: torch.Tensor | Sequence[int]) -> PackedBatch:
        """The batch of the given rows, with only the prompts they continue (a prompt pass costs
        the same whichever rows are taken)."""
        index = torch.as_tensor(index, device=self.completion_ids.device)
        used, row_prompt = torch.unique(self.row_prompt[index], return_inverse=True)
        prompt_mask = self.prompt_mask[used]
        first = int(prompt_mask.any(dim=0).int().argmax())  # left padding no kept prompt needs
        return PackedBatch(
            self.prompt_ids[used, first:],
            prompt_mask[:, first:],
            row_prompt,
            self.completion_ids[index],
            self.completion_mask[index],
        )


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of ``rows``, left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def pack_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    device=None,
) -> PackedBatch:
    """Ids exactly as given (never re-tokenized); equal prompts (a group's) stored once."""
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    prompts, prompt_mask = left_padded(list(distinct), pad_id)
    width = max(max(len(c) for c in completion_ids), 1)
    completions = torch.full((len(completion_ids), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completion_ids), width), dtype=torch.float32)
    for i, c in enumerate(completion_ids):
        if c:
            completions[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            completion_mask[i, : len(c)] = 1.0
    tensors = [prompts, prompt_mask, torch.tensor(row_prompt), completions, completion_mask]
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    return PackedBatch(*tensors)


def pack_rollouts(rollouts: Sequence, pad_id: int, device=None) -> PackedBatch:
    """:func:`pack_rows` of rollouts (anything with ``prompt_ids`` and ``completion_ids``)."""
    prompts = [r.prompt_ids for r in rollouts]
    return pack_rows(prompts, [r.completion_ids for r in rollouts], pad_id, device)


def micro_batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive runs of at most ``size``."""
    indices = list(indices)
    return [indices[start : start + size] for start in range(0, len(indices), size)]


class Outputs(NamedTuple):
    """Logits (B, C, V) of the completion columns and, when asked, the last hidden state that
    produced them (B, C, H): column j predicts completion token j."""

    logits: torch.Tensor
    hidden: torch.Tensor | None


def joint_outputs(model, batch: PackedBatch, with_hidden: bool = False) -> Outputs:
    """One pass over each full row (its prompt, then its completion)."""
    width = batch.completion_ids.shape[1]
    input_ids = torch.cat([batch.prompt_ids[batch.row_prompt], batch.completion_ids], dim=1)
    attention = torch.cat(
        [batch.prompt_mask[batch.row_prompt], batch.completion_mask.long()], dim=1
    )
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        logits_to_keep=width + 1,
        output_hidden_states=with_hidden,
    )
    hidden = out.hidden_states[-1][:, -width - 1 : -1] if with_hidden else None
    return Outputs(out.logits[:, :width, :], hidden)


def shared_prompt_outputs(model, batch: PackedBatch, with_hidden: bool = False) -> Outputs:
    """The same, with each distinct prompt run once: its keys/values (part of the graph, so
    gradients flow back through them) are selected for every row that continues it."""
    prompt = model(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=(batch.prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=with_hidden,
    )
    logits = prompt.logits[batch.row_prompt]  # the last prompt column predicts token 0
    hidden = prompt.hidden_states[-1][batch.row_prompt, -1:] if with_hidden else None
    if batch.completion_ids.shape[1] == 1:
        return Outputs(logits, hidden)
    cache = prompt.cache if "cache" in prompt else prompt.past_key_values  # renamed in 5.2x
    cache.batch_select_indices(batch.row_prompt)
    attention = torch.cat(
        [batch.prompt_mask[batch.row_prompt], batch.completion_mask[:, :-1].long()], dim=1
    )
    rest = model(
        input_ids=batch.completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=batch.completion_positions[:, :-1],
        **{_cache_argument(model): cache},
        use_cache=True,
        output_hidden_states=with_hidden,
    )
    logits = torch.cat([logits, rest.logits], dim=1)
    if with_hidden:
        hidden = torch.cat([hidden, rest.hidden_states[-1]], dim=1)
    return Outputs(logits, hidden)


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before (and removed in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class CompletionLogprobs(NamedTuple):
    """What :func:`completion_logprobs` returns, each (B, C) and 0 where the mask is 0, except
    ``hidden`` (B, C, H), which is given for every column."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def completion_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    with_hidden: bool = False,
    share_prompts: bool = True,
) -> CompletionLogprobs:
    """log pi_T(y_j | x, y_<j) of every completion token, under logits divided by
    ``temperature`` (the distribution the tokens were sampled from); logits shifted before
    gathering.

    ``with_entropy``: also each next-token distribution's entropy (without gradient unless
    ``entropy_grad``: a loss term then, not only a logged number). ``with_hidden``: also the last
    hidden state of each completion column (a value head reads it). The model always runs, even
    when nothing is masked, so a loss built on the result can always be backpropagated.
    """
    # In train mode, checkpointing (by any route) turns the key/value cache off: one pass per row.
    if model.training and gradient_checkpointing_on(model):
        share_prompts = False
    outputs = (shared_prompt_outputs if share_prompts else joint_outputs)(model, batch, with_hidden)
    lengths = batch.completion_mask.sum(dim=1).long().tolist()
    width = batch.completion_ids.shape[1]
    logprobs, entropies = [], []
    # One row at a time bounds the float32 copy of the logits to one row's completion.
    for row, length in enumerate(lengths):
        row_logp = torch.log_softmax(outputs.logits[row, :length].float() / temperature, dim=-1)
        target = batch.completion_ids[row, :length].unsqueeze(-1)
        logprobs.append(_padded(row_logp.gather(-1, target).squeeze(-1), width))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropies.append(_padded(-(row_logp.exp() * row_logp).sum(-1), width))
    return CompletionLogprobs(
        torch.stack(logprobs),
        torch.stack(entropies) if with_entropy else None,
        outputs.hidden,
    )


def _padded(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[0]))


def reference_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, share_prompts: bool = True
) -> torch.Tensor:
    """:func:`completion_logprobs` under the base model (a peft model's adapter disabled), without
    gradient: the reference a KL penalty compares the policy with."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(model, batch, temperature, share_prompts=share_prompts).logprobs
