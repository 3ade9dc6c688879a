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

With ``padding_free`` the rows are packed into one sequence without padding: each row is a segment
that attends causally to itself and fully to the segments it continues (a shared prompt, or with
``share_prefix`` the longest prefix common to every prompt, such as a chat template's opening, run
once for the whole batch). Keys and values of shared segments stay in the graph as above, and the
output head runs on exactly the positions that predict a completion token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel

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
        **{cache_argument(model): cache},
        use_cache=True,
        output_hidden_states=with_hidden,
    )
    logits = torch.cat([logits, rest.logits], dim=1)
    if with_hidden:
        hidden = torch.cat([hidden, rest.hidden_states[-1]], dim=1)
    return Outputs(logits, hidden)


def cache_argument(model) -> str:
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
    padding_free: bool = False,
    share_prefix: bool = False,
) -> CompletionLogprobs:
    """log pi_T(y_j | x, y_<j) of every completion token, under logits divided by
    ``temperature`` (the distribution the tokens were sampled from); logits shifted before
    gathering.

    ``with_entropy``: also each next-token distribution's entropy (without gradient unless
    ``entropy_grad``: a loss term then, not only a logged number). ``with_hidden``: also the last
    hidden state of each completion column (a value head reads it; zero on padding columns with
    ``padding_free``). The model always runs, even when nothing is masked, so a loss built on the
    result can always be backpropagated.

    ``padding_free``: one packed pass (see :func:`packed_outputs`) where the model supports it
    (:func:`padding_free_supported`), else the padded passes; also the padded ones under
    checkpointing in train mode (its recomputation, after this call, would run the model's own
    attention over the packed rows). ``share_prefix`` (padding-free only):
    also run the prefix common to every prompt once. Sharing a segment between rows also shares
    its dropout masks: with dropout active, rows that run it separately draw one mask each, so
    callers that must match separate passes share nothing then (:func:`dropout_active`).
    """
    checkpointing = model.training and gradient_checkpointing_on(model)
    # In train mode, checkpointing (by any route) turns the key/value cache off: one pass per row.
    if checkpointing:
        share_prompts = False
    packed = padding_free and not checkpointing and padding_free_supported(model)
    if packed:
        outputs = packed_outputs(model, batch, share_prompts, share_prefix, with_hidden)
    else:
        pass_ = shared_prompt_outputs if share_prompts else joint_outputs
        outputs = pass_(model, batch, with_hidden)
    lengths = batch.completion_mask.sum(dim=1).long().tolist()
    width = batch.completion_ids.shape[1]
    if packed:  # rows follow each other: split (its backward is one concatenation, no zero fill)
        packed_rows = outputs.logits.split(lengths)
    logprobs, entropies = [], []
    # One row at a time bounds the float32 copy of the logits to one row's completion.
    for row, length in enumerate(lengths):
        row_logits = packed_rows[row] if packed else outputs.logits[row, :length]
        row_logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)
        target = batch.completion_ids[row, :length].unsqueeze(-1)
        logprobs.append(_padded(row_logp.gather(-1, target).squeeze(-1), width))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropies.append(_padded(-(row_logp.exp() * row_logp).sum(-1), width))
    hidden = outputs.hidden
    if packed and with_hidden:
        hidden = _spread_rows(hidden, lengths, width)
    return CompletionLogprobs(
        torch.stack(logprobs),
        torch.stack(entropies) if with_entropy else None,
        hidden,
    )


def _padded(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[0]))


def _spread_rows(flat: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """(K, H) values of the packed completion tokens as (B, C, H), zero on padding columns."""
    rows = flat.split(lengths)
    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])


def reference_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, **options: bool
) -> torch.Tensor:
    """:func:`completion_logprobs` (with these ``options``) under the base model (a peft model's
    adapter disabled), without gradient: the reference a KL penalty compares the policy with."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(model, batch, temperature, **options).logprobs


# --------------------------------------------------------------------------- padding-free pass

PACKED_ATTENTION = "coderl_packed_segments"


@dataclass
class Segments:
    """How the packed sequence splits: segment ``i`` holds ``sizes[i]`` tokens, attends causally
    to them and fully to the earlier segments ``context[i]`` (its ancestors: a shared prefix, a
    shared prompt). ``masks[i]`` is that pattern for segments with a context (None otherwise)."""

    sizes: list[int]
    context: list[tuple[int, ...]]
    masks: list[torch.Tensor | None] = field(default_factory=list)
    calls: int = 0  # attention layers that ran on this layout

    def add(self, size: int, context: tuple[int, ...]) -> int:
        self.sizes.append(size)
        self.context.append(context)
        return len(self.sizes) - 1

    def finish(self, device) -> None:
        """Each segment's mask: every key of its context, then its own keys causally."""
        self.masks = []
        for size, context in zip(self.sizes, self.context, strict=True):
            if not context:
                self.masks.append(None)
                continue
            before = sum(self.sizes[c] for c in context)
            allowed = torch.ones((size, before + size), dtype=torch.bool, device=device)
            self.masks.append(allowed.tril(before))


def segment_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: Segments | None = None,
    **kwargs,
):
    """Attention of a packed batch (one sequence), segment by segment: no token attends to another
    row's tokens, and no segment pays for the others' length. Registered with transformers'
    ``AttentionInterface``; the layout comes as the ``packed_segments`` keyword of the forward."""
    if packed_segments is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention called without packed_segments")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("the padding-free pass supports plain causal attention only")
    layout = packed_segments
    layout.calls += 1
    gqa = query.shape[1] != key.shape[1]
    queries, keys, values = (t.split(layout.sizes, dim=2) for t in (query, key, value))
    outputs = []
    for i, context in enumerate(layout.context):
        own_keys = torch.cat([keys[c] for c in context] + [keys[i]], dim=2) if context else keys[i]
        own_values = (
            torch.cat([values[c] for c in context] + [values[i]], dim=2) if context else values[i]
        )
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                queries[i],
                own_keys,
                own_values,
                attn_mask=layout.masks[i],
                dropout_p=dropout,
                is_causal=not context,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, segment_attention)


def padding_free_supported(model) -> bool:
    """Whether the model's attention goes through transformers' ``AttentionInterface`` (where
    the segment attention plugs in)."""
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return base is not None and bool(getattr(base, "_supports_attention_backend", False))


def dropout_active(model) -> bool:
    """Whether a forward of ``model`` now draws dropout masks: a dropout module (LoRA's included)
    in train mode with p > 0, or attention dropout in train mode."""
    dropouts = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, dropouts) and module.p > 0:
            return True
        if getattr(getattr(module, "config", None), "attention_dropout", 0.0):
            return True
    return False


@contextlib.contextmanager
def packed_attention(model) -> Iterator[None]:
    """The model's attention is the segment attention inside this block (its configs name it)."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if isinstance(getattr(m, "config", None), PreTrainedConfig)
    }
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = PACKED_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


@dataclass
class PackedLayout:
    """The batch as one sequence: ids and positions (1, N), its segments, and ``predict_at``: for
    every completion token, row after row, the index of the output that predicts it."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: Segments
    predict_at: torch.Tensor


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    shortest = min(len(r) for r in rows)
    for i in range(shortest):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return shortest


def packed_layout(
    batch: PackedBatch, share_prompts: bool = True, share_prefix: bool = False
) -> PackedLayout:
    """Pack the batch's rows (the last completion token is never an input) into one sequence.

    A prompt shared by several rows (``share_prompts``) is one segment their completions continue;
    with ``share_prefix`` the prefix common to every prompt is one segment before all of them.
    Position ids restart at 0 for every row, as separate passes number them.
    """
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    row_prompt = batch.row_prompt.tolist()
    lengths = batch.completion_mask.sum(dim=1).long().tolist()
    completions = [batch.completion_ids[r, :n].tolist() for r, n in enumerate(lengths)]
    used = sorted(set(row_prompt))
    if any(not prompts[u] for u in used):
        raise ValueError("the padding-free pass needs at least one prompt token in every row")
    ids: list[int] = []
    positions: list[int] = []
    segments = Segments([], [])

    def append(tokens: Sequence[int], first_position: int, context: tuple[int, ...]):
        """Add a segment; returns its index and the packed index of its last token."""
        ids.extend(tokens)
        positions.extend(range(first_position, first_position + len(tokens)))
        return segments.add(len(tokens), context), len(ids) - 1

    prefix_length = 0
    root: tuple[int, ...] = ()
    prefix_last = -1
    if share_prefix and len(row_prompt) > 1:
        prefix_length = common_prefix_length([prompts[u] for u in used])
        if prefix_length:
            prefix, prefix_last = append(prompts[used[0]][:prefix_length], 0, ())
            root = (prefix,)
    # Where each shared prompt ends: the context its rows attend to and its last token's index.
    chains: dict[int, tuple[tuple[int, ...], int]] = {}
    if share_prompts:
        for u in used:
            rest = prompts[u][prefix_length:]
            if rest:
                segment, last = append(rest, prefix_length, root)
                chains[u] = (root + (segment,), last)
            else:
                chains[u] = (root, prefix_last)
    predict_at: list[int] = []
    for u, completion in zip(row_prompt, completions, strict=True):
        if not completion:
            continue
        if share_prompts:
            (context, last), head = chains[u], []
        else:  # the row runs its own prompt (after the shared prefix, if any)
            context, head = root, prompts[u][prefix_length:]
        first = len(ids)
        if head or len(completion) > 1:  # a one-token completion after a shared prompt has no input
            append(head + completion[:-1], len(prompts[u]) - len(head), context)
        if not share_prompts:
            last = first + len(head) - 1 if head else prefix_last
        # Token 0 is predicted by the prompt's last token, token j by completion token j - 1.
        predict_at.append(last)
        predict_at.extend(range(first + len(head), first + len(head) + len(completion) - 1))
    if not ids:  # no completion token anywhere: still one forward, so backward always works
        append(prompts[used[0]], 0, ())
    device = batch.completion_ids.device
    segments.finish(device)
    return PackedLayout(
        torch.tensor([ids], device=device),
        torch.tensor([positions], device=device),
        segments,
        torch.tensor(predict_at, dtype=torch.long, device=device),
    )


def packed_outputs(
    model,
    batch: PackedBatch,
    share_prompts: bool = True,
    share_prefix: bool = False,
    with_hidden: bool = False,
) -> Outputs:
    """Logits (K, V) and hidden states (K, H) of the K positions that predict a completion token,
    from one padding-free pass: row 0's completion tokens in order, then row 1's, and so on."""
    layout = packed_layout(batch, share_prompts, share_prefix)
    with packed_attention(model):
        out = model(
            input_ids=layout.input_ids,
            position_ids=layout.position_ids,
            logits_to_keep=layout.predict_at,
            use_cache=False,
            output_hidden_states=with_hidden,
            packed_segments=layout.segments,
        )
    if layout.segments.calls == 0:  # its attention never saw the layout: rows would mix
        raise RuntimeError("the model's attention ignored the padding-free layout")
    hidden = out.hidden_states[-1][0, layout.predict_at] if with_hidden else None
    return Outputs(out.logits[0], hidden)
