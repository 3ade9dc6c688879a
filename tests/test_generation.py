"""Generation: prompts, stops, batching, seeds, log-probs and code extraction, on the tiny model.

Several tests script the model (``tests.helpers.scripted``): the next token follows a given id
sequence, so a stop string, an end token or a fenced answer appears exactly where the test wants it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from coderl.errors import UserError
from coderl.generation import (
    BASE_STOP_SEQUENCES,
    Completion,
    SamplingConfig,
    decode,
    end_token_ids,
    fast_decoder,
    generate,
    inverse_cdf_sample,
    row_uniforms,
    sampling_probs,
    truncate_at_stop,
)
from coderl.models import load_model
from coderl.prompts import (
    completion_for_sandbox,
    encode_prompt,
    encode_prompt_and_completion,
    extract_code,
    render_prompt,
)
from tests.helpers import scripted

FUNCTION_TASKS = [
    {
        "task_id": "t/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "entry_point": "add",
        "test": "",
    },
    {"task_id": "t/1", "prompt": "def f(x):\n", "entry_point": "f", "test": ""},
    {
        "task_id": "t/2",
        "prompt": 'import math\n\n\ndef area(r):\n    """Area of a circle.\n\n    >>> area(1)\n    3.14\n    """\n',
        "entry_point": "area",
        "test": "",
    },
    {"task_id": "t/3", "prompt": "def g():\n    # returns 1\n", "entry_point": "g", "test": ""},
    {"task_id": "t/4", "prompt": "class A:\n    def m(self):\n", "entry_point": "A", "test": ""},
]
STDIO_CPP = {
    "task_id": "s/0",
    "prompt": "Read n.\n\nPrint n + 1.",
    "language": "cpp",
    "tests": [{"input": "1\n", "output": "2\n"}],
}
STDIO_PY = {**STDIO_CPP, "task_id": "s/1", "language": "python"}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model(tiny_model_dir)


@contextlib.contextmanager
def recorded_inputs(model):
    """Collect the input_ids of every forward call."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["input_ids"].clone())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize(
    ("text", "kept", "found"),
    [
        ("    return a\ndef g():\n    pass\n", "    return a", True),
        (
            "    x = 1\n    # indented comment stays\n    return x\n#top\n",
            "    x = 1\n    # indented comment stays\n    return x",
            True,
        ),
        ("    return 1\nclass B:\n", "    return 1", True),
        ("    return 2\n\nif __name__ == '__main__':\n", "    return 2\n", True),
        ("    return 3\nprint(f(1))\n", "    return 3", True),
        ("    return 4\n```\nExplanation", "    return 4", True),
        ("    y = 2\n#a\ndef later():\n", "    y = 2", True),  # the earliest stop wins
        ("print(1)\n", "print(1)\n", False),  # a stop needs its newline: nothing at position 0
        ("    if x:\n        return 5\n", "    if x:\n        return 5\n", False),
        ("    indented\n    def inner():\n", "    indented\n    def inner():\n", False),
    ],
)
def test_truncate_at_base_stop_sequences(text, kept, found):
    assert truncate_at_stop(text, BASE_STOP_SEQUENCES) == (kept, found)


def test_truncate_with_no_stops_keeps_everything():
    assert truncate_at_stop("a\ndef b", ()) == ("a\ndef b", False)
    assert truncate_at_stop("abcabc", ("c", "b")) == ("a", True)


def test_sampling_probs_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(sampling_probs(logits, 1.0, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(
        sampling_probs(logits, 1.0, 0.75), torch.tensor([[0.625, 0.375, 0.0, 0.0]])
    )
    assert torch.allclose(
        sampling_probs(logits, 1.0, 0.85), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95
    )
    assert torch.allclose(sampling_probs(logits, 1.0, 0.01), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    sharpened = sampling_probs(logits, 0.5, 1.0)  # p ** 2, renormalised
    squares = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert torch.allclose(sharpened, (squares / squares.sum())[None])


def test_inverse_cdf_sample_never_draws_a_zero_probability_token_even_at_the_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    # u -> drawn token per row; u is one below 1 in float64 at the end.
    for u, expected in ((0.0, [1, 2]), (0.4999, [1, 2]), (0.5, [3, 2]), (1 - 2**-53, [3, 2])):
        uniforms = torch.full((2,), u, dtype=torch.float64)
        assert inverse_cdf_sample(probs, uniforms).tolist() == expected, u
    # Rows that do not sum to 1 (rounding) are scaled by their own total.
    unnormalised = torch.tensor([[0.2, 0.2, 0.0, 0.2]] * 2)  # thresholds 0.36 and 0.42
    uniforms = torch.tensor([0.6, 0.7], dtype=torch.float64)
    assert inverse_cdf_sample(unnormalised, uniforms).tolist() == [1, 3]


def test_vectorised_sampler_frequencies_match_sampling_probs():
    """20,000 draws per row from two different distributions in one batch (one of them with
    top-p zeros). Each token's frequency f has standard deviation sigma = sqrt(p(1-p)/N) <= 0.0035;
    |f - p| < 4.5 sigma for every token (a false alarm has probability about 1e-4 over the 16
    tokens of nonzero probability), and Pearson's chi-square is below its 0.999 quantile for its
    degrees of freedom. A sampler off by one token, or one ignoring top-p, fails both by far."""
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 1.5, 0.2],
            [0.1, 0.0, -0.1, 0.3, 0.2, -0.2, 0.05, -0.05, 0.0, 0.15],
        ]
    )
    probs = torch.cat([sampling_probs(logits[:1], 0.7, 0.95), sampling_probs(logits[1:], 1.3, 1.0)])
    zero = probs[0] == 0
    assert zero.sum() == 4 and (probs[1] > 0).all()  # top-p removed 4 of row 0's tokens
    draws = 20_000
    uniforms = row_uniforms([11, 12], draws, "cpu")  # (2, draws): row 0's stream, row 1's stream
    tokens = inverse_cdf_sample(probs.repeat_interleave(draws, 0), uniforms.reshape(-1))
    counts = torch.stack([torch.bincount(t, minlength=10) for t in tokens.reshape(2, draws)])
    freq = counts.double() / draws
    p = probs.double()
    assert counts[0][zero].sum() == 0
    sigma = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 4.5 * sigma).all(), (freq - p).abs().max()
    chi2_999 = {5: 20.52, 9: 27.88}  # 0.999 quantiles of chi-square with 5 and 9 d.o.f.
    for row in range(2):
        nonzero = p[row] > 0
        expected = p[row][nonzero] * draws
        chi2 = float(((counts[row][nonzero] - expected) ** 2 / expected).sum())
        assert chi2 < chi2_999[int(nonzero.sum()) - 1], (row, chi2)


def test_row_uniforms_depend_only_on_the_seed():
    streams = row_uniforms([5, 6, 5], 40, "cpu")
    assert streams.dtype == torch.float64 and streams.shape == (3, 40)
    assert torch.equal(streams[0], streams[2]) and not torch.equal(streams[0], streams[1])
    assert torch.equal(row_uniforms([6], 40, "cpu")[0], streams[1])  # alone or in a batch
    assert torch.equal(row_uniforms([5], 7, "cpu")[0], streams[0, :7])  # a prefix of a longer one
    assert 0.0 <= float(streams.min()) and float(streams.max()) < 1.0


@pytest.mark.parametrize(
    ("text", "language", "code"),
    [
        (
            "Sure!\n```python\ndef f():\n    return 1\n```\nDone.",
            "python",
            "def f():\n    return 1\n",
        ),
        ("```cpp\nint main(){}\n```", "cpp", "int main(){}\n"),
        ("```c++\n#include <x>\n```", "cpp", "#include <x>\n"),
        ("```\nx = 1\n```", "python", "x = 1\n"),
        # A block tagged for the language wins over an earlier block for another language.
        ("```bash\nls\n```\n```python\ny = 2\n```", "python", "y = 2\n"),
        # An unclosed fence (the answer hit the token limit) runs to the end.
        ("```python\ndef g():\n    pass", "python", "def g():\n    pass\n"),
        # Only a block for another language: better than nothing.
        ("```java\nclass A {}\n```", "cpp", "class A {}\n"),
        (
            "The answer is\n#include <cstdio>\nint main(){}\n",
            "cpp",
            "#include <cstdio>\nint main(){}\n",
        ),
        (
            "Here you go:\nimport sys\ndef main():\n    pass\n",
            "python",
            "import sys\ndef main():\n    pass\n",
        ),
        ("Explanation first.\ndef h(): return 3\n", "python", "def h(): return 3\n"),
        ("x = 41 + 1", "python", "x = 41 + 1"),
    ],
)
def test_extract_code(text, language, code):
    assert extract_code(text, language) == code


# --------------------------------------------------------------------------------------------------
# Prompts


def test_render_prompt_per_mode_and_task_kind(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert render_prompt(FUNCTION_TASKS[0], tokenizer, "base") == FUNCTION_TASKS[0]["prompt"]
    assert render_prompt(STDIO_CPP, tokenizer, "base") == "// Read n.\n//\n// Print n + 1.\n"
    assert render_prompt(STDIO_PY, tokenizer, "base") == "# Read n.\n#\n# Print n + 1.\n"
    chat = render_prompt(FUNCTION_TASKS[0], tokenizer, "instruct")
    assert chat.startswith("<|im_start|>user\n") and chat.endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert FUNCTION_TASKS[0]["prompt"] in chat and "```python" in chat
    assert "C++" in render_prompt(STDIO_CPP, tokenizer, "instruct")
    with pytest.raises(UserError, match="unknown prompt mode"):
        render_prompt(FUNCTION_TASKS[0], tokenizer, "chat")


def test_completion_for_sandbox_per_mode_and_task_kind():
    rendered = "// Read n.\n"
    assert (
        completion_for_sandbox(FUNCTION_TASKS[0], "ignored", "    return a + b\n", "base")
        == "    return a + b\n"
    )
    assert (
        completion_for_sandbox(STDIO_CPP, rendered, "int main(){}\n", "base")
        == rendered + "int main(){}\n"
    )
    answer = "```python\ndef add(a, b):\n    return a + b\n```"
    assert (
        completion_for_sandbox(FUNCTION_TASKS[0], "chat", answer, "instruct")
        == "def add(a, b):\n    return a + b\n"
    )


def test_generation_feeds_exactly_the_prompt_ids_training_uses(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for task, mode in (
        (FUNCTION_TASKS[2], "base"),
        (STDIO_CPP, "base"),
        (FUNCTION_TASKS[0], "instruct"),
    ):
        with recorded_inputs(model) as seen:
            generate(model, tokenizer, [task], SamplingConfig(max_new_tokens=2, prompt_mode=mode))
        rendered = render_prompt(task, tokenizer, mode)
        training_ids, prompt_len = encode_prompt_and_completion(
            tokenizer, rendered, "    return 1\n"
        )
        assert (
            seen[0][0].tolist() == encode_prompt(tokenizer, rendered) == training_ids[:prompt_len]
        )
        assert seen[0][0].tolist().count(tokenizer.bos_token_id) == 1


# --------------------------------------------------------------------------------------------------
# Stops, EOS, truncation (scripted model)


def test_base_function_completion_stops_early_at_the_next_top_level_def(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    script = ids(tokenizer, "    return a + b\n\ndef other():\n    pass\n" * 3)
    # The stop is complete once the token carrying the space after "def" has been generated.
    needed = next(k for k in range(1, len(script) + 1) if "\ndef " in tokenizer.decode(script[:k]))
    with scripted(model, script) as calls:
        [completion] = generate(
            model, tokenizer, [FUNCTION_TASKS[0]], SamplingConfig(max_new_tokens=40)
        )
    assert completion.text == "    return a + b\n"
    assert completion.finish_reason == "stop" and not completion.truncated
    assert calls["n"] == needed < 40  # the StoppingCriteria ended generation at once
    assert tokenizer.decode(completion.token_ids).startswith(completion.text)
    assert completion.num_tokens == len(completion.token_ids)
    assert (
        completion.token_ids
        == script[: completion.num_tokens]
        == completion.sampled_ids[: completion.num_tokens]
    )
    assert (
        completion_for_sandbox(FUNCTION_TASKS[0], "", completion.text, "base")
        == "    return a + b\n"
    )


def test_stop_inside_a_token_keeps_that_sampled_token_whole(model_and_tokenizer):
    """The text is cut at the stop, the ids are not: re-encoding the kept half (" re") would train
    a token the policy never sampled."""
    model, tokenizer = model_and_tokenizer
    script = ids(tokenizer, "    return value\n")
    pieces = tokenizer.convert_ids_to_tokens(script)
    assert "Ġreturn" in pieces  # " return" is one token, so a stop at "turn" cuts inside it
    with scripted(model, script + [tokenizer.eos_token_id]):
        [completion] = generate(
            model, tokenizer, [FUNCTION_TASKS[1]], SamplingConfig(max_new_tokens=20, stop=("turn",))
        )
    assert completion.text == "    re"
    assert completion.finish_reason == "stop" and completion.end_id is None
    whole = pieces.index("Ġreturn")
    assert completion.token_ids == script[: whole + 1] == completion.sampled_ids[: whole + 1]
    assert tokenizer.decode(completion.token_ids) == "    return"


def test_a_merge_straddling_the_stop_string_is_kept_as_sampled(model_and_tokenizer):
    """The model samples "\n\n" as one token: the base stop "\ndef " begins in its second half.
    The kept text ends after the first newline; the ids keep the merged token as it was sampled
    (re-encoding the kept text would give a single "\n" the policy never drew)."""
    model, tokenizer = model_and_tokenizer
    double_newline = tokenizer.convert_tokens_to_ids("ĊĊ")
    assert double_newline != tokenizer.unk_token_id
    script = ids(tokenizer, "    return a") + [double_newline] + ids(tokenizer, "def other():\n")
    with scripted(model, script):
        [completion] = generate(
            model, tokenizer, [FUNCTION_TASKS[0]], SamplingConfig(max_new_tokens=30)
        )
    assert completion.text == "    return a\n" and completion.finish_reason == "stop"
    cut = script.index(double_newline) + 1
    assert completion.token_ids == script[:cut] == completion.sampled_ids[:cut]
    assert completion.token_ids[-1] == double_newline


def test_stdio_base_stops_at_eos_only_and_the_sandbox_gets_the_whole_program(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    program = "import sys\n\ndef main():\n    print(int(sys.stdin.read()) + 1)\n\nif __name__ == '__main__':\n    main()\n"
    with scripted(model, ids(tokenizer, program) + [tokenizer.eos_token_id]):
        [completion] = generate(model, tokenizer, [STDIO_PY], SamplingConfig(max_new_tokens=200))
    assert completion.text == program  # "\ndef ", "\nif " and "\nprint(" do not stop a program
    assert completion.finish_reason == "eos" and not completion.truncated
    assert tokenizer.eos_token_id not in completion.token_ids
    assert completion.end_id == tokenizer.eos_token_id
    rendered = render_prompt(STDIO_PY, tokenizer, "base")
    assert (
        completion_for_sandbox(STDIO_PY, rendered, completion.text, "base")
        == "# Read n.\n#\n# Print n + 1.\n" + program
    )


def test_hitting_max_new_tokens_is_truncated(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with scripted(model, ids(tokenizer, "    x = 1\n    y = 2\n    z = 3\n    return x + y + z\n")):
        [completion] = generate(
            model, tokenizer, [FUNCTION_TASKS[1]], SamplingConfig(max_new_tokens=5)
        )
    assert completion.truncated and completion.finish_reason == "length"
    assert completion.num_tokens == 5


def test_instruct_answer_ends_at_end_of_turn_and_code_is_extracted(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answer = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with scripted(model, ids(tokenizer, answer) + [end_of_turn]):
        [completion] = generate(
            model,
            tokenizer,
            [FUNCTION_TASKS[0]],
            SamplingConfig(max_new_tokens=100, prompt_mode="instruct"),
        )
    assert completion.text == answer and completion.finish_reason == "eos"
    assert completion.end_id == end_of_turn != tokenizer.eos_token_id
    assert completion.sampled_ids == completion.token_ids + [end_of_turn]
    rendered = render_prompt(FUNCTION_TASKS[0], tokenizer, "instruct")
    sandbox_text = completion_for_sandbox(FUNCTION_TASKS[0], rendered, completion.text, "instruct")
    assert sandbox_text == "def add(a, b):\n    return a + b\n"


def test_the_chat_end_of_turn_ends_a_row_even_when_the_generation_config_omits_it(
    model_and_tokenizer,
):
    model, tokenizer = model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    try:
        assert end_token_ids(model, tokenizer) == {tokenizer.eos_token_id, end_of_turn}
        with scripted(model, ids(tokenizer, "    return 1\n") + [end_of_turn]):
            [completion] = generate(
                model, tokenizer, [FUNCTION_TASKS[1]], SamplingConfig(max_new_tokens=20, stop=())
            )
    finally:
        model.generation_config.eos_token_id = saved
    assert completion.finish_reason == "eos" and completion.end_id == end_of_turn


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


def _hf_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Plain ``model.generate`` greedy on the left-padded batch, each row cut at its first end id."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    end_ids = end_token_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=sorted(end_ids),
    )
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    rows = out[:, width:].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in end_ids), len(row))] for row in rows]


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
    reference = _hf_greedy(model, tokenizer, prompts, steps)
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
    from transformers.cache_utils import DynamicLayer

    from coderl.generation import GrowingCache, GrowingLayer, growing_cache

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
    assert isinstance(next(iter(growing_cache(model).values())), GrowingCache)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, n=3, batch_size=6, stop=())
    with_growing = generate(model, tokenizer, FUNCTION_TASKS[:4], cfg, seed=5)
    import coderl.generation as generation

    original = generation.growing_cache
    generation.growing_cache = lambda model: {}
    try:
        default = generate(model, tokenizer, FUNCTION_TASKS[:4], cfg, seed=5)
    finally:
        generation.growing_cache = original
    assert [c.sampled_ids for c in with_growing] == [c.sampled_ids for c in default]
