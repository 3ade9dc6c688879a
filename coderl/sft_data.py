"""Supervised fine-tuning data: tasks to token ids, batches, and the examples of each step.

An example is the prompt exactly as generation tokenizes it (masked) and the target tokenized on
its own, then the token that ends an answer at inference (learned); the two id lists are
concatenated, never re-tokenized together, so the boundary token is the one the model sees at
inference. What the target is, per task kind and prompt mode, is :func:`target_text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coderl.errors import UserError
from coderl.logprobs import PackedBatch, pack_rows
from coderl.training import TaskStream


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt ids (masked) and target ids (learned, end token last)."""

    task_id: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def target_text(task: dict, prompt_mode: str) -> str:
    """The text the model learns to produce after the rendered prompt: in base mode the canonical
    solution as it is (a function body keeps its indentation); in instruct mode one fenced block
    with the whole function (function tasks) or the program (stdin tasks)."""
    from coderl.prompts import task_kind

    solution = task["canonical_solution"]
    if prompt_mode == "base":
        return solution
    if task_kind(task) == "function":
        # Instruct answers carry the whole function: the sandbox gets the fenced code as it is.
        code, language = task["prompt"] + solution, "python"
    else:
        code, language = solution, task["language"]
    if not code.endswith("\n"):
        code += "\n"
    return f"```{language}\n{code}```"


def encode_example(task: dict, tokenizer, prompt_mode: str) -> Example:
    """Prompt ids exactly as generation encodes them, the target tokenized on its own, then the
    token that ends an answer at inference (the chat template's end-of-turn in instruct mode, such
    as ``<|im_end|>``, else EOS)."""
    from coderl.prompts import completion_end_id, encode_prompt_and_completion, render_prompt

    prompt = render_prompt(task, tokenizer, prompt_mode)
    end_id = completion_end_id(tokenizer, prompt_mode)
    ids, prompt_len = encode_prompt_and_completion(
        tokenizer, prompt, target_text(task, prompt_mode), end_id=end_id
    )
    return Example(task["task_id"], tuple(ids[:prompt_len]), tuple(ids[prompt_len:]))


@dataclass
class ExampleSet:
    examples: list[Example]
    skipped_no_solution: int = 0
    dropped_overlong: int = 0
    truncated_overlong: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "examples": len(self.examples),
            "skipped_no_solution": self.skipped_no_solution,
            "dropped_overlong": self.dropped_overlong,
            "truncated_overlong": self.truncated_overlong,
        }


def build_examples(
    tasks: Sequence[dict], tokenizer, prompt_mode: str, max_length: int, overlong: str
) -> ExampleSet:
    """Tokenize every task with a solution; drop or truncate those over ``max_length``."""
    out = ExampleSet(examples=[])
    for task in tasks:
        if not task.get("canonical_solution"):
            out.skipped_no_solution += 1
            continue
        example = encode_example(task, tokenizer, prompt_mode)
        if example.num_tokens > max_length:
            room = max_length - len(example.prompt_ids)
            if overlong == "drop" or room < 1:
                out.dropped_overlong += 1
                continue
            example = dataclasses.replace(example, target_ids=example.target_ids[:room])
            out.truncated_overlong += 1
        out.examples.append(example)
    return out


def load_examples(tasks: Sequence[dict], tokenizer, data_args, log=print) -> ExampleSet:
    """:func:`build_examples` with the script's data options (``prompt_mode``, ``max_length``,
    ``overlong``, ``train_file``); what was skipped, dropped or truncated is logged, and a set
    with no usable example is refused."""
    data = build_examples(
        tasks, tokenizer, data_args.prompt_mode, data_args.max_length, data_args.overlong
    )
    if not data.examples:
        raise UserError(
            f"{data_args.train_file}: no usable training example ({data.summary()}); "
            "rows need canonical_solution and must fit --max_length"
        )
    if data.dropped_overlong or data.truncated_overlong or data.skipped_no_solution:
        log(
            f"{data.dropped_overlong} examples over --max_length {data_args.max_length} dropped, "
            f"{data.truncated_overlong} truncated, {data.skipped_no_solution} without "
            "canonical_solution skipped"
        )
    return data


def data_fingerprint(examples: Sequence[Example]) -> str:
    """Identifies the tokenized training set, so a resume onto other data is refused."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.task_id}:{len(ex.prompt_ids)}:{len(ex.target_ids)};".encode())
    return digest.hexdigest()[:16]


def pack_examples(examples: Sequence[Example], pad_id: int, device=None) -> PackedBatch:
    """The micro-batch as ``coderl.logprobs`` takes it: prompts (masked) and targets (learned)."""
    return pack_rows(
        [ex.prompt_ids for ex in examples],
        [ex.target_ids for ex in examples],
        pad_id=pad_id,
        device=device,
    )


def collate(examples: Sequence[Example], pad_id: int, device=None):
    """Whole rows, right-padded: ``input_ids``, ``attention_mask`` (B x T) and the loss mask
    (B x T-1; position t-1 is 1 where token t is a target), the layout of a trainer that runs
    every position (and of the reference computations in the tests)."""
    rows = [ex.prompt_ids + ex.target_ids for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        loss_mask[i, len(ex.prompt_ids) - 1 : len(row) - 1] = 1.0
    tensors = (input_ids, attention, loss_mask)
    return tuple(t.to(device) for t in tensors) if device is not None else tensors


def steps_for_epochs(num_examples: int, epochs: float, examples_per_step: int) -> int:
    return max(1, math.ceil(epochs * num_examples / examples_per_step))


def resolve_max_steps(train_args, num_examples: int, num_processes: int) -> int:
    """``--max_steps``, or when it is 0 the steps ``--num_train_epochs`` take with
    ``batch * accumulation * processes`` examples a step."""
    if train_args.max_steps > 0:
        return train_args.max_steps
    per_step = (
        train_args.per_device_train_batch_size
        * train_args.gradient_accumulation_steps
        * num_processes
    )
    return steps_for_epochs(num_examples, train_args.num_train_epochs, per_step)


def step_indices(
    stream: TaskStream, batch_size: int, accumulation: int, num_processes: int
) -> list[list[int]]:
    """Example indices of one optimizer step, as micro-batches of every process.

    Every process draws the same indices from the same stream, so each knows the whole step's
    token count without communicating; process ``p`` trains micro-batches ``[p::num_processes]``.
    """
    flat = stream.take(batch_size * accumulation * num_processes)
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
