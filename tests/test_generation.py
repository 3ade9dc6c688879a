"""Generation: pure functions (stops, sampling, code extraction), prompts, and stops, end tokens
and truncation on the tiny model. Batching, greedy equality with ``model.generate``, seeds,
sampling, log-probs and the cache are in tests/test_generation_decode.py.

Several tests script the model (``tests.helpers.scripted``): the next token follows a given id
sequence, so a stop string, an end token or a fenced answer appears exactly where the test wants it.
"""

from __future__ import annotations

import pytest
import torch

from coderl.errors import UserError
from coderl.generation import (
    BASE_STOP_SEQUENCES,
    SamplingConfig,
    end_token_ids,
    generate,
    inverse_cdf_sample,
    row_uniforms,
    sampling_probs,
    truncate_at_stop,
)
from coderl.prompts import (
    completion_for_sandbox,
    encode_prompt,
    encode_prompt_and_completion,
    extract_code,
    render_prompt,
)
from tests.helpers import FUNCTION_TASKS, STDIO_CPP, ids, recorded_inputs, scripted

STDIO_PY = {**STDIO_CPP, "task_id": "s/1", "language": "python"}


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
