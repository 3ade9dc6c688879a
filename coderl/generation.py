"""Batched generation of code completions for tasks, with prompts, stops and log-probs pinned down.

Prompts come from :mod:`coderl.prompts` (one rendering for training, generation and evaluation).

Stops. Function tasks in base mode stop at the first of :data:`BASE_STOP_SEQUENCES` in the
completion (the start of the next top-level statement: ``"\\ndef "``, ``"\\nclass "``, ``"\\nif "``,
``"\\nprint("``, ``"\\n#"``, or a closing ``"\\n```"``); the text is cut just before it. stdio tasks
(a program has top-level defs of its own) and instruct mode stop at EOS only.
``SamplingConfig.stop`` given explicitly replaces these defaults for every task. An end token (the
tokenizer's EOS, every id in the model's generation config, and the chat template's end-of-turn,
e.g. ``<|im_end|>``) always ends a completion; it is not part of the text, and
``Completion.end_id`` records which one it was, so that training credits the token sampled.
``truncated`` means the completion hit ``max_new_tokens`` with no EOS and no stop.

Token ids. ``Completion.token_ids`` is always a prefix of the ids the row sampled
(``Completion.sampled_ids``), never a re-encoding: the shortest prefix whose decoding covers the
kept text. When a stop string begins inside a token, that token is kept whole, so
``decode(token_ids)`` starts with ``text`` and may run a few characters past it (into the stop
string); otherwise the two are equal. ``num_tokens == len(token_ids)``. The prompt ids are :func:`coderl.prompts.encode_prompt`, the same function
training uses.

Log-probs (``return_logprobs=True``): per kept token, ``log_softmax`` of the model's raw logits
(temperature 1, no top-p, full vocabulary), computed by one extra batched forward pass over prompt +
kept ids after generation, with dropout off. They are aligned with ``token_ids`` exactly; the end
token is not included.

Sampling. Greedy when ``temperature == 0``. Otherwise each completion owns a stream of uniform
numbers in [0, 1): ``torch.rand(max_new_tokens, dtype=float64)`` from a CPU ``torch.Generator``
seeded with ``derive_seed(seed, task_index, sample_index)``, drawn once when its batch starts. At
step t the row takes the token where its cumulative :func:`sampling_probs` first exceeds u_t times
their total (inverse-CDF sampling, the whole batch in one tensor operation,
:func:`inverse_cdf_sample`). So a completion does not depend on which other completions share its
batch (up to floating-point differences from padding), its uniforms are the same on every device,
and its first k tokens do not depend on ``max_new_tokens``. Greedy results are identical across
batch sizes in float32 (left padding with explicit position ids from the attention mask); in
bfloat16 the CPU's matrix kernels may round a row differently for another number of rows, so
a batch size (and the rows that leave) can flip a near-tie. The model's own generation defaults
(repetition penalty, top-k, ...) play no part (only its end ids are read); the model is put in
eval mode and its mode restored afterwards.

Speed. Our own decode loop over a key/value cache (:class:`GrowingCache`: each step written in
place) runs each batch: one forward pass per step on the rows still running, the output head on
the last position only. A row ends at an end token, at a stop string (each live row's last few
tokens decoded once per step with the tokenizer's Rust backend) or at ``max_new_tokens``; finished
rows leave the batch, and the cache, once they are :data:`DROP_SHARE` of it, so a batch no longer
runs at full width to its longest answer. Greedy rows are ``model.generate``'s token for token
(tested on the tiny and the real model); ``bench/bench_generation.py`` measures the speed against
it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from coderl.cli import derive_seed
from coderl.errors import UserError
from coderl.models import eval_mode, unwrap_model
from coderl.prompts import (
    BASE_STOP_SEQUENCES,
    chat_end_of_turn_id,
    check_prompt_mode,
    encode_prompt,
    render_prompt,
    task_kind,
)


@dataclass
class SamplingConfig:
    """How to sample: lengths, temperature / top-p, samples per task, batch size, prompt mode, stops."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most new tokens per completion."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    n: int = field(default=1, metadata={"help": "Completions per task."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per generate call."})
    prompt_mode: str = field(
        default="base", metadata={"help": "'base' (raw prompt) or 'instruct' (chat template)."}
    )
    stop: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Stop strings; None = the pinned defaults for the mode and task kind."},
    )


@dataclass
class Completion:
    """One generated completion; ``token_ids`` / ``logprobs`` are the sampled ids of ``text``.

    ``token_ids`` is a prefix of ``sampled_ids`` (everything the row drew, its end token
    included); ``end_id`` is the end token that finished the row (None unless
    ``finish_reason == "eos"``).
    """

    task_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    num_tokens: int
    truncated: bool
    logprobs: list[float] | None
    finish_reason: str = "length"  # "eos", "stop" or "length"
    end_id: int | None = None
    sampled_ids: list[int] = field(default_factory=list)


def stop_sequences_for(task: dict, cfg: SamplingConfig) -> tuple[str, ...]:
    """The stop strings for ``task``: ``cfg.stop`` if given, else the pinned default for the mode."""
    if cfg.stop is not None:
        return tuple(s for s in cfg.stop if s)
    if cfg.prompt_mode == "base" and task_kind(task) == "function":
        return BASE_STOP_SEQUENCES
    return ()


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, whether one was found)``."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# --------------------------------------------------------------------------------------------------
# Generation


def _check_config(cfg: SamplingConfig) -> None:
    check_prompt_mode(cfg.prompt_mode)
    if cfg.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise UserError(f"temperature must be >= 0, got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise UserError(
            f"n and batch_size must be at least 1, got n={cfg.n}, batch_size={cfg.batch_size}"
        )


def end_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model generation config's and the
    chat template's end-of-turn (a chat model ends its answer with it, even in base mode)."""
    ids = set()
    end_of_turn = chat_end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    configured = getattr(unwrap_model(model).generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def row_uniforms(seeds: Sequence[int], steps: int, device) -> torch.Tensor:
    """``(rows, steps)`` uniforms in [0, 1) (float64; float32 on Apple GPUs): row i is
    ``torch.rand(steps)`` from a CPU generator seeded with ``seeds[i]``, so it depends on that seed
    only (not on the batch, nor the device; its first k numbers do not depend on ``steps``)."""
    streams = [
        torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in seeds
    ]
    device = torch.device(device)
    return torch.stack(streams).to(device, _cumulative_dtype(device))


def _cumulative_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler's sums, except on Apple GPUs, which have no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B x V, non-negative, rows need not sum to 1), given one
    uniform u in [0, 1) per row: the first index whose cumulative probability exceeds u * total.

    A token of probability 0 is never drawn: its cumulative value equals its predecessor's, so it
    cannot be the first to exceed the threshold. The threshold is kept strictly below the total
    (rounding could make u * total reach it), so some token always exceeds it. The cumulative sum
    is float64 so that rounding over a large vocabulary does not shift the probabilities.
    """
    dtype = _cumulative_dtype(probs.device)
    cdf = probs.cumsum(-1, dtype=dtype)
    total = cdf[:, -1:]
    threshold = torch.minimum(
        uniforms.to(dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
    )
    return torch.searchsorted(cdf, threshold, right=True)[:, 0]  # how many cdf <= threshold


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next-token probabilities after temperature and nucleus (top-p) filtering, per row."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


class _StopStrings:
    """Whether a row's generated text contains one of its stop strings yet.

    Only the row's last few tokens are decoded: a stop string that ends in the newest token starts
    at most ``len(stop in bytes)`` tokens back, since every token is at least one byte. A row is
    decoded once per step whatever its number of stops, with the tokenizer's Rust backend.
    """

    def __init__(self, tokenizer, stops_per_row: list[tuple[str, ...]]):
        longest = max((len(s.encode()) for stops in stops_per_row for s in stops), default=0)
        self.window = longest + 1
        self.decode = fast_decoder(tokenizer)

    def met(self, generated: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        text = self.decode(generated[-self.window :])
        return any(s in text for s in stops)


def fast_decoder(tokenizer) -> Callable[[list[int]], str]:
    """:func:`decode` for one row, calling the Rust tokenizer directly when the tokenizer is a
    plain ``tokenizers``-backed one (the Python layers around it cost more than the decoding of a
    few tokens); any other tokenizer goes through :func:`decode`."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    backend = getattr(tokenizer, "_tokenizer", None)
    plain = (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and type(tokenizer)._decode is TokenizersBackend._decode
        and backend is not None
    )
    if plain:
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: decode(tokenizer, ids)


def decode(tokenizer, ids: list[int]) -> str:
    """Token ids to text exactly: special tokens kept, no "tokenization space" clean-up (that
    rewrites " ," to "," and would change code)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sampled_prefix_covering(tokenizer, ids: list[int], kept: str) -> list[int]:
    """The shortest prefix of the sampled ``ids`` whose decoding starts with ``kept``.

    ``kept`` is a prefix of ``decode(ids)`` (the text before a stop string). A token that straddles
    the cut is kept whole: the policy sampled that token, not a re-encoding of its first half, so
    the ids trained on stay exactly a prefix of the ids sampled.
    """
    lo, hi = 0, len(ids)
    while lo < hi:  # smallest k whose decoding is at least as long as kept
        mid = (lo + hi) // 2
        if len(decode(tokenizer, ids[:mid])) >= len(kept):
            hi = mid
        else:
            lo = mid + 1
    for k in range(lo, len(ids) + 1):  # a partial multi-byte character decodes to U+FFFD
        if decode(tokenizer, ids[:k]).startswith(kept):
            return ids[:k]
    return list(ids)


@dataclass
class FinishedRow:
    """One row of generated ids, cut where it ended (see the module docstring)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    end_id: int | None
    sampled_ids: list[int]


def finish_completion(
    tokenizer, generated: list[int], end_ids: set[int], stops: Sequence[str]
) -> FinishedRow:
    """Cut one row of generated ids at its end token or first stop string."""
    reason, end_id, sampled = "length", None, list(generated)
    for i, token in enumerate(generated):
        if token in end_ids:
            generated, reason, end_id, sampled = generated[:i], "eos", token, sampled[: i + 1]
            break
    text = decode(tokenizer, generated)
    kept, stopped = truncate_at_stop(text, stops)
    if stopped:
        ids = sampled_prefix_covering(tokenizer, generated, kept)
        return FinishedRow(kept, ids, "stop", None, sampled)
    return FinishedRow(text, generated, reason, end_id, sampled)


def new_cache(model) -> Cache:
    """An empty key/value cache for ``model``: a :class:`GrowingCache`, or the default
    ``DynamicCache`` for a model with sliding-window layers (or a transformers whose ``Cache``
    takes no layer class)."""
    config = unwrap_model(model).config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    if not sliding and all(kind == "full_attention" for kind in layer_types):
        try:
            return GrowingCache()
        except TypeError:
            pass
    return DynamicCache(config=config)


class GrowingLayer(DynamicLayer):
    """A decoder layer's keys and values in a buffer with room to grow: a decode step writes its
    column in place instead of copying the whole cache (``DynamicLayer`` concatenates, ~15% of a
    CPU decode step); attention reads the same values in the same shapes."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers = None
        n, length = key_states.shape[-2], self.get_seq_length()
        stale = self.buffers is None or self.keys.data_ptr() != self.buffers[0].data_ptr()
        if stale or length + n > self.buffers[0].shape[-2]:  # grow (or adopt edited keys)
            shape = (*key_states.shape[:-2], max(2 * (length + n), 64))
            keys = key_states.new_empty(*shape, key_states.shape[-1])
            values = value_states.new_empty(*shape, value_states.shape[-1])
            if length:
                keys[..., :length, :], values[..., :length, :] = self.keys, self.values
            self.buffers = (keys, values)
        keys, values = self.buffers
        keys[..., length : length + n, :] = key_states
        values[..., length : length + n, :] = value_states
        self.keys, self.values = keys[..., : length + n, :], values[..., : length + n, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``, with the same room to grow."""
        if self.get_seq_length() == 0 or self.buffers is None:
            return super().batch_select_indices(indices)
        length = self.get_seq_length()
        self.buffers = tuple(buffer[indices] for buffer in self.buffers)
        self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` layers."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


#: A batch drops its finished rows once they are at least this share of it (each drop copies the
#: key/value cache of the rows kept, about what one decode step reads).
DROP_SHARE = 0.125


def _generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    seeds: list[int],
    stops: list[tuple[str, ...]],
    cfg: SamplingConfig,
    end_ids: set[int],
    pad_id: int,
) -> list[FinishedRow]:
    """Decode one left-padded batch: greedy or inverse-CDF sampled from each row's uniforms, each
    row ended by an end token, a stop string or ``max_new_tokens``; finished rows leave the batch
    (and the cache) as soon as they are :data:`DROP_SHARE` of it."""
    from coderl.logprobs import cache_argument

    device = next(model.parameters()).device
    input_ids, mask = _left_pad(prompts, pad_id, device)
    positions = _positions(mask)
    uniforms = None
    if cfg.temperature > 0:
        uniforms = row_uniforms(seeds, cfg.max_new_tokens, device)
    stop_strings = _StopStrings(tokenizer, stops)
    generated: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # batch row -> prompt index
    done = [False] * len(live)
    cache = {cache_argument(model): new_cache(model)}
    step_ids = input_ids
    with torch.no_grad():
        for step in range(cfg.max_new_tokens):
            logits = (
                model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,  # a model trained with gradient checkpointing may have it off
                    logits_to_keep=1,
                    **cache,
                )
                .logits[:, -1, :]
                .float()
            )
            if uniforms is None:
                tokens = logits.argmax(-1)
            else:
                probs = sampling_probs(logits, cfg.temperature, cfg.top_p)
                tokens = inverse_cdf_sample(probs, uniforms[live, step])
            for b, token in enumerate(tokens.tolist()):
                if not done[b]:
                    row = generated[live[b]]
                    row.append(token)
                    done[b] = token in end_ids or stop_strings.met(row, stops[live[b]])
            if all(done):
                break
            if sum(done) >= max(1.0, DROP_SHARE * len(live)):
                keep = [b for b, finished in enumerate(done) if not finished]
                index = torch.tensor(keep, device=device)
                next(iter(cache.values())).batch_select_indices(index)
                mask, positions, tokens = mask[index], positions[index], tokens[index]
                live, done = [live[b] for b in keep], [False] * len(keep)
            step_ids = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return [finish_completion(tokenizer, row, end_ids, s) for row, s in zip(generated, stops)]


def kept_logprobs(model, prompts: list[list[int]], kept: list[list[int]], pad_id: int):
    """Per-token log-probs of each row's kept ids after its prompt (raw logits, temperature 1)."""
    from coderl.logprobs import completion_logprobs, pack_rows

    device = next(model.parameters()).device
    with torch.no_grad():
        batch = pack_rows(prompts, kept, pad_id, device)
        logprobs = completion_logprobs(model, batch, share_prompts=False).logprobs
    return [logprobs[row, : len(ids)].tolist() for row, ids in enumerate(kept)]


@dataclass
class _WorkItem:
    task_index: int
    sample_index: int
    prompt_ids: list[int]
    stops: tuple[str, ...]
    seed: int


def generate(
    model,
    tokenizer,
    tasks: list[dict],
    cfg: SamplingConfig,
    seed: int = 0,
    return_logprobs: bool = False,
    progress: bool = False,
    first_task_index: int = 0,
) -> list[Completion]:
    """``cfg.n`` completions per task, ordered by (task index, sample index).

    Greedy decoding (``temperature == 0``) generates once per task and repeats it ``n`` times.
    Sample ``s`` of ``tasks[t]`` is seeded with ``derive_seed(seed, first_task_index + t, s)``:
    a caller that splits one draw of tasks into parts passes each part's offset.
    """
    from tqdm.auto import tqdm

    _check_config(cfg)
    end_ids = end_token_ids(model, tokenizer)
    if not end_ids:
        raise UserError(
            "the tokenizer has no EOS token and the model's generation config names none"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    copies = sequences_per_task(cfg)
    items = []
    for t, task in enumerate(tasks):
        prompt_ids = encode_prompt(tokenizer, render_prompt(task, tokenizer, cfg.prompt_mode))
        stops = stop_sequences_for(task, cfg)
        items += [
            _WorkItem(t, s, prompt_ids, stops, derive_seed(seed, first_task_index + t, s))
            for s in range(copies)
        ]
    # Longest prompts first: less padding per batch, and an out-of-memory shows up at once.
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    finished: dict[int, tuple[FinishedRow, list[float] | None]] = {}
    with eval_mode(model), tqdm(total=len(items), desc="generate", disable=not progress) as bar:
        for start in range(0, len(order), cfg.batch_size):
            batch = [items[i] for i in order[start : start + cfg.batch_size]]
            prompts = [item.prompt_ids for item in batch]
            outputs = _generate_batch(
                model,
                tokenizer,
                prompts,
                [i.seed for i in batch],
                [i.stops for i in batch],
                cfg,
                end_ids,
                pad_id,
            )
            logprobs = (
                kept_logprobs(model, prompts, [row.token_ids for row in outputs], pad_id)
                if return_logprobs
                else [None] * len(batch)
            )
            for index, row, lp in zip(order[start : start + cfg.batch_size], outputs, logprobs):
                finished[index] = (row, lp)
            bar.update(len(batch))
    return _assemble(items, finished, cfg.n)


def sequences_per_task(cfg: SamplingConfig) -> int:
    """Sequences :func:`generate` decodes per task: ``cfg.n``, or 1 when greedy (its ``n``
    completions are copies of one)."""
    return 1 if cfg.temperature == 0 else cfg.n


def _assemble(items: list[_WorkItem], finished: dict, n: int) -> list[Completion]:
    completions = []
    by_task: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_task.setdefault(item.task_index, []).append(index)
    for task_index in sorted(by_task):
        indices = by_task[task_index]
        for sample_index in range(n):
            # Greedy runs generate one item per task; every sample is a copy of it.
            row, logprobs = finished[indices[min(sample_index, len(indices) - 1)]]
            completions.append(
                Completion(
                    task_index=task_index,
                    sample_index=sample_index,
                    text=row.text,
                    token_ids=list(row.token_ids),
                    num_tokens=len(row.token_ids),
                    truncated=row.finish_reason == "length",
                    logprobs=list(logprobs) if logprobs is not None else None,
                    finish_reason=row.finish_reason,
                    end_id=row.end_id,
                    sampled_ids=list(row.sampled_ids),
                )
            )
    return completions
