"""Prompts and what the sandbox runs: one rendering of a task for training, generation and
evaluation, and the code taken out of a model's answer.

* base mode, function task: ``task["prompt"]`` exactly (a HumanEval-style signature + docstring).
* base mode, stdio task: the statement as a comment header in the task's language, one comment
  line per statement line (``# `` for Python, ``// `` for C++), each ending in a newline; the model
  writes the program after it. The sandbox gets rendered prompt + text (:func:`completion_for_sandbox`).
* instruct mode: the tokenizer's chat template applied to one user message asking for the function
  or program in a fenced code block; :func:`extract_code` takes the code out of the answer.

Tokenizing for training (:func:`encode_prompt_and_completion`): the prompt and the completion are
tokenized SEPARATELY and their ids concatenated. Tokenizing the joined string lets a token straddle
the boundary (e.g. the prompt's trailing indentation merges with the completion's first word), so the
prompt ids seen in training would differ from those seen at inference and a mask by the prompt's
token count would be off. :func:`encode_prompt` is the one function both training and
:mod:`coderl.generation` use for prompt ids.
"""

from __future__ import annotations

import re

from coderl.errors import UserError
from sandbox import task_kind

PROMPT_MODES = ("base", "instruct")
# Where a base-mode function completion ends: the next top-level statement (coderl.generation).
BASE_STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n```")
LANGUAGE_NAMES = {"python": "Python", "cpp": "C++"}
COMMENT_PREFIXES = {"python": "#", "cpp": "//"}
FENCE_TAGS = {"python": ("python", "py", "python3"), "cpp": ("cpp", "c++", "cc", "cxx")}
# A fenced block: opening ``` with an optional tag, the body, then a closing ``` line or the end.
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_CODE_START = {
    "python": re.compile(r"^(?:def |async def |import |from \S+ import )", re.M),
    "cpp": re.compile(r"^#include", re.M),
}


def task_language(task: dict) -> str:
    return task.get("language") or "python"


def comment_header(statement: str, language: str) -> str:
    """The statement as comment lines of ``language``, each ending in a newline."""
    prefix = COMMENT_PREFIXES.get(language)
    if prefix is None:
        raise UserError(
            f"no comment syntax for language {language!r} (known: {', '.join(COMMENT_PREFIXES)})"
        )
    lines = statement.rstrip("\n").split("\n")
    return "".join(f"{prefix} {line}".rstrip() + "\n" for line in lines)


def instruction(task: dict) -> str:
    """The user message of instruct mode."""
    language = task_language(task)
    if task_kind(task) == "function":
        prompt = task["prompt"] if task["prompt"].endswith("\n") else task["prompt"] + "\n"
        return (
            "Complete the following Python function. Answer with the whole function in one "
            f"```python code block.\n\n```python\n{prompt}```"
        )
    name = LANGUAGE_NAMES.get(language, language)
    tag = FENCE_TAGS.get(language, (language,))[0]
    return (
        f"Solve the following problem in {name}. The program reads standard input and writes standard "
        f"output. Answer with the whole program in one ```{tag} code block.\n\n{task['prompt']}"
    )


def render_prompt(task: dict, tokenizer, prompt_mode: str) -> str:
    """The prompt text the model continues (see the module docstring for each mode and task kind)."""
    check_prompt_mode(prompt_mode)
    if prompt_mode == "instruct":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat template; use prompt_mode=base for this model"
            )
        messages = [{"role": "user", "content": instruction(task)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if task_kind(task) == "function":
        return task["prompt"]
    return comment_header(task["prompt"], task_language(task))


def completion_for_sandbox(task: dict, rendered_prompt: str, text: str, prompt_mode: str) -> str:
    """What to hand the sandbox as the completion of ``task``.

    Function task, base mode: the completion text (the sandbox prepends ``task["prompt"]``).
    stdio task, base mode: rendered prompt + text, the whole program. Instruct mode: the extracted
    code (for a function task the whole function; the sandbox prepends the prompt and the later
    definition wins).
    """
    check_prompt_mode(prompt_mode)
    if prompt_mode == "instruct":
        return extract_code(text, task_language(task))
    if task_kind(task) == "function":
        return text
    return rendered_prompt + text


def extract_code(text: str, language: str) -> str:
    """The code in a chat answer: the first fenced block tagged for ``language`` or untagged (an
    unclosed fence runs to the end); else any fenced block; else the text from the first
    ``#include`` (C++) / top-level ``def`` or ``import`` (Python); else the text itself."""
    blocks = [(m[1].lower(), m[2]) for m in _FENCED_BLOCK.finditer(text)]
    accepted = ("",) + FENCE_TAGS.get(language, (language,))
    for tag, body in blocks:
        if tag in accepted:
            return _with_final_newline(body)
    if blocks:
        return _with_final_newline(blocks[0][1])
    start = _CODE_START.get(language)
    match = start.search(text) if start is not None else None
    return text[match.start() :] if match else text


def _with_final_newline(code: str) -> str:
    return code if code.endswith("\n") or not code else code + "\n"


def check_prompt_mode(prompt_mode: str) -> None:
    if prompt_mode not in PROMPT_MODES:
        raise UserError(
            f"unknown prompt mode {prompt_mode!r} (choose from {', '.join(PROMPT_MODES)})"
        )


# --------------------------------------------------------------------------- prompt + completion ids


def _special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts BEFORE the text when adding special tokens (usually [BOS] or [])."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    return []


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as both training and generation see them: the text, with the BOS prefix once.

    Special-token suffixes (an EOS some tokenizers append) are never added to a prompt. A prompt
    that already starts with the BOS text (chat templates often include it) gets no second BOS.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    prefix = _special_prefix_ids(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


_TURN_MARK = "\x00turn-end-probe\x00"


def chat_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any.

    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for Gemma: the token a
    chat model emits to end its answer, often not the tokenizer's EOS. Found by rendering a
    conversation whose answer is a marker and reading the token after it; None when the template
    has none or puts plain text there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this shape (e.g. demands a system turn)
        return None
    _, found, after = text.partition(_TURN_MARK)
    ids = tokenizer.encode(after, add_special_tokens=False) if found else []
    if ids and _is_special_token(tokenizer, ids[0]):
        return ids[0]
    return None


def _is_special_token(tokenizer, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def completion_end_id(tokenizer, prompt_mode: str) -> int | None:
    """The token that ends a finished answer: the chat template's end-of-turn in instruct mode
    (what the model emits at inference), else EOS."""
    if prompt_mode == "instruct":
        end = chat_end_of_turn_id(tokenizer)
        if end is not None:
            return end
    return tokenizer.eos_token_id


def encode_completion(tokenizer, completion: str, end_id: int | None = None) -> list[int]:
    """Completion ids, tokenized on their own (no BOS), with ``end_id`` appended when given."""
    ids = tokenizer.encode(completion, add_special_tokens=False)
    if end_id is not None:
        ids.append(end_id)
    return ids


def encode_prompt_and_completion(
    tokenizer, prompt: str, completion: str, end_id: int | None = None
) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)``: prompt and completion tokenized SEPARATELY, ids concatenated.

    ``input_ids[:prompt_len]`` equals :func:`encode_prompt` (what generation feeds the model), so a
    loss mask of the first ``prompt_len`` labels masks exactly the prompt. ``end_id`` (see
    :func:`completion_end_id`) ends the completion.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + encode_completion(tokenizer, completion, end_id=end_id), len(prompt_ids)
