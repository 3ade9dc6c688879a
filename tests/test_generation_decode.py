"""Generation on the tiny random model: results that do not depend on batching, greedy equal to
``model.generate`` token for token, the ids kept at a stop, seeded sampling that replays from its
documented uniforms, the fast decoder, log-probs against a manual forward pass, an attached
adapter, training mode, bad sampling configs, and the growing key/value cache."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from coderl.errors import UserError
from coderl.generation import (
    Completion,
    SamplingConfig,
    decode,
    fast_decoder,
    generate,
    inverse_cdf_sample,
    row_uniforms,
    sampling_probs,
    truncate_at_stop,
)
from coderl.models import load_model
from coderl.prompts import encode_prompt, render_prompt
from tests.helpers import FUNCTION_TASKS, STDIO_CPP, hf_greedy, ids, recorded_inputs

# --------------------------------------------------------------------------------------------------
# Batching, seeds, log-probs (the real random model)


def test_greedy_results_do_not_depend_on_batch_size(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tasks = FUNCTION_TASKS + [STDIO_CPP]
    runs = {
        size: generate(
            model,
            tokenizer,
            tasks,
            SamplingConfig(max_new_tokens=24, batch_size=size, n=2),
            return_logprobs=True,
        )
        for size in (1, 3, 6)
    }
    reference = runs[1]
    assert [(c.task_index, c.sample_index) for c in reference] == [
        (t, s) for t in range(len(tasks)) for s in range(2)
    ]
    assert len(
        {len(encode_prompt(tokenizer, render_prompt(t, tokenizer, "base"))) for t in tasks}
    ) == len(tasks)
    for size, completions in runs.items():
        assert [c.token_ids for c in completions] == [c.token_ids for c in reference], size
        assert [c.text for c in completions] == [c.text for c in reference], size
        for got, want in zip(completions, reference):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert all(c.num_tokens > 0 for c in reference)
    # Greedy samples of one task are copies of each other.
    assert reference[0].token_ids == reference[1].token_ids


def _plain_substring(text: str, start: int, size: int = 3) -> str:
    """The first ``size`` characters of ``text`` from ``start`` on without a replacement char."""
    for i in range(start, len(text) - size + 1):
        if "\ufffd" not in text[i : i + size]:
            return text[i : i + size]
    raise AssertionError(f"no plain substring in {text!r}")


def test_greedy_equals_hf_generate_token_for_token_and_stops_end_it_in_time(model_and_tokenizer):
    """Five prompts of five different lengths in one batch: the greedy completions are exactly
    Hugging Face's greedy ``generate`` on the same left-padded batch. Then with stop strings taken
    from the middle of those very completions (one per row, at different depths), each row's text
    is the reference text cut before the earliest stop, and generation runs exactly as many
    forward passes as the row that meets its stop last needs."""
    model, tokenizer = model_and_tokenizer
    tasks = FUNCTION_TASKS
    prompts = [encode_prompt(tokenizer, t["prompt"]) for t in tasks]
    assert len({len(p) for p in prompts}) == len(tasks)
    steps = 24
    reference = hf_greedy(model, tokenizer, prompts, steps)
    cfg = SamplingConfig(max_new_tokens=steps, batch_size=len(tasks), stop=())
    ours = generate(model, tokenizer, tasks, cfg)
    assert [c.token_ids for c in ours] == reference
    assert sum(c.finish_reason == "length" and c.num_tokens == steps for c in ours) >= 3

    texts = [decode(tokenizer, row) for row in reference]
    stops = tuple(_plain_substring(text, 6 + 4 * r) for r, text in enumerate(texts))
    needed = [  # tokens each row generates until a stop is complete in its text
        next(
            k for k in range(1, steps + 1) if truncate_at_stop(decode(tokenizer, row[:k]), stops)[1]
        )
        for row in reference
    ]
    assert len(set(needed)) >= 3 and max(needed) < steps
    cfg = SamplingConfig(max_new_tokens=steps, batch_size=len(tasks), stop=stops)
    with recorded_inputs(model) as forward_calls:
        stopped = generate(model, tokenizer, tasks, cfg)
    assert len(forward_calls) == max(needed)
    for completion, text in zip(stopped, texts):
        assert completion.text == truncate_at_stop(text, stops)[0]
        assert completion.finish_reason == "stop"
        assert decode(tokenizer, completion.token_ids).startswith(completion.text)
        assert completion.token_ids == completion.sampled_ids[: completion.num_tokens]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_leave_the_batch_without_changing_any_row(
    model_and_tokenizer, monkeypatch, temperature
):
    """Rows that end at different depths (stop strings taken from each row's own free-running
    text) leave the batch as they finish: the forward passes see fewer and fewer rows, and every
    row's tokens are what it generates when no row ever leaves (greedy and sampled)."""
    import coderl.generation as generation

    model, tokenizer = model_and_tokenizer
    free_cfg = SamplingConfig(
        max_new_tokens=24, temperature=temperature, n=2, batch_size=10, stop=()
    )
    free = generate(model, tokenizer, FUNCTION_TASKS, free_cfg, seed=4)
    texts = [c.text for c in free]
    stops = tuple(_plain_substring(text, 5 + 2 * (r % 6)) for r, text in enumerate(texts))
    cfg = dataclasses.replace(free_cfg, stop=stops)
    with recorded_inputs(model) as forward_calls:
        dropping = generate(model, tokenizer, FUNCTION_TASKS, cfg, seed=4)
    rows = len(FUNCTION_TASKS) * (1 if temperature == 0 else 2)  # greedy: one row per task
    rows_per_pass = [call.shape[0] for call in forward_calls]
    assert rows_per_pass[0] == rows and len(set(rows_per_pass)) >= 3
    assert rows_per_pass == sorted(rows_per_pass, reverse=True)
    monkeypatch.setattr(generation, "DROP_SHARE", 2.0)  # never drop
    with recorded_inputs(model) as forward_calls:
        keeping = generate(model, tokenizer, FUNCTION_TASKS, cfg, seed=4)
    assert {call.shape[0] for call in forward_calls} == {rows}
    assert sum(c.finish_reason == "stop" for c in dropping) >= 8  # greedy: 5 rows, each twice
    assert [c.sampled_ids for c in dropping] == [c.sampled_ids for c in keeping]
    assert [(c.text, c.finish_reason) for c in dropping] == [
        (c.text, c.finish_reason) for c in keeping
    ]
    for cut, whole in zip(dropping, free):
        assert cut.sampled_ids == whole.sampled_ids[: len(cut.sampled_ids)]


def test_ids_kept_at_a_stop_are_the_ids_sampled_without_stops(model_and_tokenizer):
    """Sampled rows cut at stop strings keep exactly a prefix of what the same seeds draw when
    nothing stops them (a row's stream does not depend on where it ends). Stops of one letter
    often begin inside a token: those rows keep the straddling token whole."""
    model, tokenizer = model_and_tokenizer
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, n=8, batch_size=40, stop=("e", "t"))
    stopped = generate(model, tokenizer, FUNCTION_TASKS, cfg, seed=3)
    free = generate(model, tokenizer, FUNCTION_TASKS, dataclasses.replace(cfg, stop=()), seed=3)
    assert sum(c.finish_reason == "stop" for c in stopped) >= 10
    straddling = 0
    for cut, whole in zip(stopped, free):
        n = cut.num_tokens
        assert cut.token_ids == whole.token_ids[:n] == cut.sampled_ids[:n]
        kept = decode(tokenizer, cut.token_ids)
        assert kept.startswith(cut.text)
        straddling += kept != cut.text
    assert straddling >= 3


def test_sampling_is_reproducible_per_seed_and_independent_of_batching(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tasks = FUNCTION_TASKS[:3]

    def sample(seed: int, batch_size: int) -> list[Completion]:
        cfg = SamplingConfig(
            max_new_tokens=16, temperature=0.8, top_p=0.95, n=3, batch_size=batch_size
        )
        return generate(model, tokenizer, tasks, cfg, seed=seed)

    first = sample(seed=7, batch_size=4)
    assert [c.token_ids for c in sample(seed=7, batch_size=4)] == [c.token_ids for c in first]
    assert [c.token_ids for c in sample(seed=7, batch_size=1)] == [c.token_ids for c in first]
    assert [c.token_ids for c in sample(seed=8, batch_size=4)] != [c.token_ids for c in first]
    for task_index in range(len(tasks)):
        distinct = {tuple(c.token_ids) for c in first if c.task_index == task_index}
        assert len(distinct) == 3  # the n samples of a task differ from each other


def test_a_seeded_row_samples_the_same_tokens_whatever_its_batch(model_and_tokenizer):
    """Task 0's samples alone, and beside longer and shorter prompts (other padding, other rows),
    with or without the others' samples: same seeds, same tokens. The first 8 tokens of a
    16-token run are the 8-token run's."""
    model, tokenizer = model_and_tokenizer

    def sample(tasks, max_new_tokens=16, batch_size=8):
        cfg = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=1.0, n=2, batch_size=batch_size, stop=()
        )
        return generate(model, tokenizer, tasks, cfg, seed=21)

    alone = sample(FUNCTION_TASKS[:1])
    crowded = sample(FUNCTION_TASKS[:1] + [STDIO_CPP] + FUNCTION_TASKS[1:])
    assert [c.token_ids for c in crowded[:2]] == [c.token_ids for c in alone]
    assert alone[0].token_ids != alone[1].token_ids
    assert all(c.num_tokens == 16 for c in alone)
    short = sample(FUNCTION_TASKS[:1], max_new_tokens=8, batch_size=1)
    assert [c.token_ids for c in short] == [c.token_ids[:8] for c in alone]


def test_sampled_tokens_replay_from_the_documented_uniform_stream(model_and_tokenizer):
    """Token t of a sampled completion is ``inverse_cdf_sample(sampling_probs(logits_t), u_t)``
    with u the row's ``row_uniforms`` stream from ``derive_seed(seed, task, sample)``: replayed
    here from one full forward pass over prompt + completion."""
    from coderl.cli import derive_seed

    model, tokenizer = model_and_tokenizer
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, n=2, stop=())
    completions = generate(model, tokenizer, FUNCTION_TASKS[1:3], cfg, seed=5)
    for c in completions:
        assert c.num_tokens == 12
        prompt = encode_prompt(tokenizer, FUNCTION_TASKS[1 + c.task_index]["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
        probs = sampling_probs(logits, cfg.temperature, cfg.top_p)
        uniforms = row_uniforms([derive_seed(5, c.task_index, c.sample_index)], 12, "cpu")[0]
        assert inverse_cdf_sample(probs, uniforms).tolist() == c.token_ids


def test_fast_decoder_equals_decode(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    fast = fast_decoder(tokenizer)
    generator = torch.Generator().manual_seed(0)
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    rows = [torch.randint(0, len(tokenizer), (n,), generator=generator).tolist() for n in range(9)]
    rows += [specials + ids(tokenizer, "é\n#x"), ids(tokenizer, "€")[:1]]
    for row in rows:
        assert fast(row) == decode(tokenizer, row), row

    class Lowercasing(type(tokenizer)):  # a tokenizer with its own decode goes through it
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).lower()

    custom = copy.copy(tokenizer)
    custom.__class__ = Lowercasing
    assert fast_decoder(custom)(ids(tokenizer, "ABC")) == "abc"


def test_logprobs_equal_a_manual_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=2, batch_size=4)
    completions = generate(model, tokenizer, FUNCTION_TASKS[:3], cfg, seed=3, return_logprobs=True)
    for completion in completions:
        prompt = encode_prompt(tokenizer, FUNCTION_TASKS[completion.task_index]["prompt"])
        sequence = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
        predicted_by = torch.arange(len(prompt) - 1, sequence.shape[1] - 1)  # logits shifted by one
        manual = log_probs[predicted_by, torch.tensor(completion.token_ids)]
        assert len(completion.logprobs) == completion.num_tokens
        assert torch.allclose(torch.tensor(completion.logprobs), manual, atol=1e-4)
        assert all(lp < 0 for lp in completion.logprobs)
    # Uniform-ish random model: log-probs near log(1 / vocab), far from 0.
    mean = sum(sum(c.logprobs) for c in completions) / sum(c.num_tokens for c in completions)
    assert abs(mean - math.log(1 / len(tokenizer))) < 1.0


def test_generation_uses_the_attached_adapter(tiny_model_dir):
    from coderl.adapters import add_adapter

    model, tokenizer = load_model(tiny_model_dir, quantization="4bit")
    shipped_config = model.generation_config
    peft_model = add_adapter(model, "tinylora")
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.linspace(-2.0, 2.0, param.numel()))
    cfg = SamplingConfig(max_new_tokens=12, batch_size=3)
    adapted = generate(peft_model, tokenizer, FUNCTION_TASKS[:3], cfg, return_logprobs=True)
    with peft_model.disable_adapter():
        plain = generate(peft_model, tokenizer, FUNCTION_TASKS[:3], cfg)
    assert [c.token_ids for c in adapted] != [c.token_ids for c in plain]
    assert model.generation_config is shipped_config  # the plain config was swapped back out
    first = adapted[0]
    prompt = encode_prompt(tokenizer, FUNCTION_TASKS[0]["prompt"])
    with torch.no_grad():
        log_probs = torch.log_softmax(
            peft_model(torch.tensor([prompt + first.token_ids])).logits[0], -1
        )
    manual = log_probs[
        torch.arange(len(prompt) - 1, len(prompt) - 1 + first.num_tokens), first.token_ids
    ]
    assert torch.allclose(torch.tensor(first.logprobs), manual, atol=1e-4)


def test_generate_restores_training_mode_and_shows_progress(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    model.train()
    try:
        generate(
            model, tokenizer, FUNCTION_TASKS[:2], SamplingConfig(max_new_tokens=2), progress=True
        )
        assert model.training
    finally:
        model.eval()
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (SamplingConfig(prompt_mode="chat"), "unknown prompt mode"),
        (SamplingConfig(temperature=-1.0), "temperature"),
        (SamplingConfig(top_p=0.0), "top_p"),
        (SamplingConfig(n=0), "n and batch_size"),
        (SamplingConfig(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_config_is_a_user_error(model_and_tokenizer, cfg, message):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserError, match=message):
        generate(model, tokenizer, FUNCTION_TASKS[:1], cfg)


def test_the_growing_cache_holds_what_concatenation_holds(model_and_tokenizer):
    """GrowingLayer step by step against DynamicLayer's concatenation: a prefill, single decode
    steps past two reallocations, a batch selection (what beam search does to a cache), more
    steps; the keys and values read back are equal every time. ``generate`` gives the model one,
    and its completions are the default cache's, token for token."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from coderl.generation import GrowingCache, GrowingLayer, new_cache

    g = torch.Generator().manual_seed(0)
    ours, reference = GrowingLayer(), DynamicLayer()

    def step(tokens: int, rows: int = 3):
        k, v = (torch.randn(rows, 2, tokens, 4, generator=g) for _ in range(2))
        got, want = ours.update(k, v), reference.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    step(5)
    for _ in range(140):  # capacity 64, then 132, then 268
        step(1)
    for layer in (ours, reference):
        layer.batch_select_indices(torch.tensor([2, 0]))
    for _ in range(3):
        step(1, rows=2)
    assert ours.get_seq_length() == reference.get_seq_length() == 148

    model, tokenizer = model_and_tokenizer
    assert isinstance(new_cache(model), GrowingCache)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, n=3, batch_size=6, stop=())
    with_growing = generate(model, tokenizer, FUNCTION_TASKS[:4], cfg, seed=5)
    import coderl.generation as generation

    original = generation.new_cache
    generation.new_cache = lambda model: DynamicCache()
    try:
        default = generate(model, tokenizer, FUNCTION_TASKS[:4], cfg, seed=5)
    finally:
        generation.new_cache = original
    assert [c.sampled_ids for c in with_growing] == [c.sampled_ids for c in default]
