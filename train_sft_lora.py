"""Supervised fine-tuning (SFT) of a causal LM with a LoRA / QLoRA / TinyLoRA adapter.

The loss is the causal-LM cross-entropy on ``prompt + canonical_solution + end token`` with the
prompt tokens masked: only the solution and the end token are learned. The end token is the one
that ends an answer at inference: EOS in base mode, the chat template's end-of-turn (e.g.
``<|im_end|>``) in instruct mode (``coderl.prompts.completion_end_id``). The prompt is tokenized exactly
as generation tokenizes it (``coderl.prompts.encode_prompt_and_completion``) and the solution
separately; the two id lists are concatenated, never re-tokenized together, so the boundary
token is the one the model sees at inference. The output is a PEFT adapter (step-numbered
checkpoints and ``<output_dir>/final``) that ``eval_humaneval.py --model <dir>/final`` and the RL
scripts (``--init_adapter <dir>/final``) load.

What is learned, per task kind and ``--prompt_mode``:

* function task (HumanEval shape), base: ``prompt`` -> ``canonical_solution`` (the function body,
  indentation kept exactly);
* stdin/stdout task (C++ or Python), base: the statement rendered as a comment header by
  ``coderl.prompts.render_prompt`` (exactly the inference prompt) -> the canonical program;
* instruct mode: the chat-template prompt of ``render_prompt`` -> the code in one fenced block
  (the whole function for function tasks, the program for stdin tasks), then the end-of-turn.

Loss normalisation: per token over the optimizer step. The summed token losses of every
micro-batch of one step (all ``gradient_accumulation_steps`` micro-batches on all processes) are
divided by the number of supervised tokens in the whole step, so a long solution weighs more than
a short one and padding or batch composition never changes the gradient. This is close to what the
Hugging Face Trainer does with ``num_items_in_batch``; a mean per micro-batch (older Trainers, and
the seed's batch of 1) gives every example the same weight whatever its length. ``train/loss`` is
that per-token mean.

Data order: a seeded, endless stream of shuffled epochs (``coderl.training.TaskStream``); its
position is saved in every checkpoint, so ``--resume`` consumes exactly the batches an
uninterrupted run would. ``--max_steps 0`` (the default) derives the number of optimizer steps
from ``--num_train_epochs`` (``ceil(epochs * examples / (batch * accumulation * processes))``); the
value is recorded under ``computed`` in ``runs/<name>/config.json`` and in every checkpoint.

Logged (``runs/<name>/metrics.jsonl`` and TensorBoard): ``train/loss``, ``train/lr`` (the rate used
by the step), ``train/grad_norm`` (before clipping), ``train/tokens`` (input tokens seen so far,
padding excluded), ``train/loss_tokens`` (supervised tokens in the step), ``train/epoch`` and, with
``--eval_file``, ``eval/pass@1`` (greedy, on the first ``--eval_tasks`` held-out tasks).

Seed defaults kept (RL-Code-Agent): LoRA r=8, alpha=16, dropout 0.05 on the attention and MLP
projections, learning rate 5e-5, batch 1 x accumulation 8, one epoch, 4-bit NF4 base on CUDA.
Departures from the seed:

* the loss is per token over the optimizer step (see above), not a mean of micro-batch means;
* prompt and solution are tokenized separately and their ids concatenated (the seed tokenized the
  joined string and masked by the prompt's token count, which can misplace the boundary token);
* an end token ends every target, so the model learns to stop;
* the seed does not state its schedule; the default here is linear decay after warm-up (the
  Hugging Face Trainer's default), ``--lr_scheduler constant|cosine`` otherwise;
* examples longer than ``--max_length`` are dropped (or truncated, ``--overlong truncate``) and
  counted, never silently cut;
* resume restores the adapter, optimizer, scheduler, RNG and data position.

Launch (one GPU, the seed's setting; validation on the 33 held-out tasks at the end)::

    python train_sft_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \\
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \\
        --eval_tasks 33 --output_dir checkpoints/sft

Tiny CPU run (the tiny preset). The tiny model is random-init, so SFT here is learning from
scratch: it needs a rate about 60x the seed's, no dropout, a larger rank and many epochs.
Measured on the toy Python family (500 train tasks; greedy pass@1 on the 300 held-out tasks):
base 0%; these settings 24% and 26% (seeds 42 and 1) after about 135 CPU-seconds of training;
adding ``lm_head`` to ``--target_modules`` gave 40%, 23%, 23% (seeds 42, 1, 2) for the same cost
and learns faster in short runs (8 epochs: 25% against 11% on 100 tasks; peft then also stores
the frozen ``lm_head`` weight in the adapter). On a machine whose cores are shared,
``OMP_NUM_THREADS=1`` keeps torch's threads from spinning against each other (each step was many
times slower without it)::

    OMP_NUM_THREADS=1 python train_sft_lora.py --model checkpoints/tiny-llama \\
        --quantization none --train_file data/toy_python_train.jsonl \\
        --output_dir checkpoints/tiny-sft --learning_rate 3e-3 --lr_scheduler cosine \\
        --warmup_steps 10 --num_train_epochs 12 --per_device_train_batch_size 16 \\
        --gradient_accumulation_steps 1 --lora_r 16 --lora_alpha 32 --lora_dropout 0

Several processes: ``accelerate launch train_sft_lora.py ...`` (GPUs) or ``torchrun
--nproc_per_node N train_sft_lora.py ...`` with the same flags; each optimizer step then takes
``batch * accumulation * N`` examples, and the loss and gradient equal a one-process run with
that global batch (tested with two CPU processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from coderl.cli import parse_args
from coderl.errors import UserError, exit_on_user_error
from coderl.models import describe_model
from coderl.rollouts import evaluate, make_sandbox
from coderl.run import (
    finish,
    load_optimizer_state,
    record_computed,
    restore,
    save,
    start_run,
)
from coderl.tasks import load_tasks
from coderl.training import (
    ModelArgs,
    TaskStream,
    TrainArgs,
    build_optimizer,
    count_trainable,
    load_policy,
    masked_token_logprobs,
    pack_sequences,
    trainable_parameters,
    validate_common,
)

# --------------------------------------------------------------------------- options


@dataclass
class SFTTrainArgs(TrainArgs):
    """Training options with the seed's SFT defaults."""

    max_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps to run; 0 = derived from --num_train_epochs (recorded as "
            "computed.max_steps).",
            "range": "[0, inf)",
        },
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the training examples (used when --max_steps is 0).",
            "range": "(0, inf)",
        },
    )
    per_device_train_batch_size: int = field(
        default=1,
        metadata={"help": "Examples per micro-batch on each process.", "range": "[1, inf)"},
    )
    gradient_accumulation_steps: int = field(
        default=8,
        metadata={
            "help": "Micro-batches accumulated into one optimizer step.",
            "range": "[1, inf)",
        },
    )
    learning_rate: float = field(
        default=5e-5, metadata={"help": "Peak learning rate.", "range": "(0, inf)"}
    )
    lr_scheduler: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate schedule after warm-up.",
            "choices": ["constant", "linear", "cosine"],
        },
    )


@dataclass
class SFTDataArgs:
    """What to train on and how examples are built."""

    train_file: str = field(
        default="",
        metadata={
            "help": "Training tasks (JSONL, the task schema); every row needs "
            "canonical_solution (rows without one are skipped and counted)."
        },
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: the prompt as generation renders it, target = the solution; "
            "instruct: chat-template prompt, target = one fenced code block.",
            "choices": ["base", "instruct"],
        },
    )
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Longest example in tokens (prompt + solution + end token).",
            "range": "[2, inf)",
        },
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "Examples over --max_length: drop them, or truncate the solution (the "
            "count is printed and logged either way).",
            "choices": ["drop", "truncate"],
        },
    )


def check_options(train_args: SFTTrainArgs, data_args: SFTDataArgs) -> None:
    """Option checks that need no model or data (fail before anything heavy loads)."""
    if not data_args.train_file:
        raise UserError("--train_file is required (a task file with canonical_solution)")
    if train_args.max_steps < 0:
        raise UserError("--max_steps must be 0 (derive from epochs) or positive")
    if train_args.max_steps == 0 and train_args.num_train_epochs <= 0:
        raise UserError("--num_train_epochs must be positive when --max_steps is 0")
    if train_args.per_device_train_batch_size < 1:
        raise UserError("--per_device_train_batch_size must be at least 1")
    if train_args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be at least 1")
    if data_args.max_length < 2:
        raise UserError("--max_length must be at least 2 tokens")
    if train_args.save_every < 1:
        raise UserError("--save_every must be at least 1")
    if train_args.eval_tasks < 1:
        raise UserError("--eval_tasks must be at least 1")


# --------------------------------------------------------------------------- examples


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
    """The text the model learns to produce after the rendered prompt."""
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


def data_fingerprint(examples: Sequence[Example]) -> str:
    """Identifies the tokenized training set, so a resume onto other data is refused."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.task_id}:{len(ex.prompt_ids)}:{len(ex.target_ids)};".encode())
    return digest.hexdigest()[:16]


def collate(examples: Sequence[Example], pad_id: int, device=None):
    """Right-padded ``input_ids``, ``attention_mask`` and the loss mask (B x T-1, targets only)."""
    return pack_sequences(
        [ex.prompt_ids for ex in examples],
        [ex.target_ids for ex in examples],
        pad_id=pad_id,
        device=device,
    )


# --------------------------------------------------------------------------- loss


def summed_token_nll(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Sum over the batch of -log p(target token | everything before it), prompt masked out
    (the output head and the log-softmax run on the target positions only)."""
    return -masked_token_logprobs(model, input_ids, attention_mask, loss_mask).logprobs.sum()


def steps_for_epochs(num_examples: int, epochs: float, examples_per_step: int) -> int:
    return max(1, math.ceil(epochs * num_examples / examples_per_step))


def step_indices(
    stream: TaskStream, batch_size: int, accumulation: int, num_processes: int
) -> list[list[int]]:
    """Example indices of one optimizer step, as micro-batches of every process.

    Every process draws the same indices from the same stream, so each knows the whole step's
    token count without communicating; process ``p`` trains micro-batches ``[p::num_processes]``.
    """
    flat = stream.take(batch_size * accumulation * num_processes)
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def train_step(
    run,
    model,
    optimizer,
    scheduler,
    micro_batches: Sequence[Sequence[Example]],
    pad_id: int,
    max_grad_norm: float,
) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; per-token loss over the whole step.

    ``accelerator.backward`` divides by the accumulation steps and DDP averages over processes;
    scaling each summed loss by ``accumulation * processes / step_tokens`` undoes both, so the
    gradient is that of ``sum(token losses of the step) / step_tokens``.
    """
    accelerator = run.accelerator
    step_tokens = sum(len(ex.target_ids) for batch in micro_batches for ex in batch)
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / step_tokens
    local = micro_batches[accelerator.process_index :: accelerator.num_processes]
    nll_total = torch.zeros((), device=accelerator.device)
    input_tokens = 0
    grad_norm = None
    lr = scheduler.get_last_lr()[0]
    for batch in local:
        input_ids, attention_mask, loss_mask = collate(batch, pad_id, accelerator.device)
        input_tokens += int(attention_mask.sum())
        with accelerator.accumulate(model):
            nll = summed_token_nll(model, input_ids, attention_mask, loss_mask)
            accelerator.backward(nll * scale)
            nll_total += nll.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(
                    trainable_parameters(model), max_grad_norm if max_grad_norm > 0 else math.inf
                )
            optimizer.step()  # the prepared optimizer steps only when gradients sync
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad()
    if grad_norm is None:  # the accumulation counter and our micro-batches went out of step
        raise RuntimeError("optimizer step ended without a gradient sync")
    nll_sum = accelerator.reduce(nll_total, reduction="sum")
    tokens = accelerator.reduce(torch.tensor(input_tokens, device=accelerator.device), "sum")
    return {
        "train/loss": float(nll_sum) / step_tokens,
        "train/lr": lr,
        "train/grad_norm": float(grad_norm),
        "train/loss_tokens": step_tokens,
        "input_tokens": int(tokens),
    }


# --------------------------------------------------------------------------- run


def resolve_max_steps(train_args: SFTTrainArgs, num_examples: int, num_processes: int) -> int:
    if train_args.max_steps > 0:
        return train_args.max_steps
    per_step = (
        train_args.per_device_train_batch_size
        * train_args.gradient_accumulation_steps
        * num_processes
    )
    return steps_for_epochs(num_examples, train_args.num_train_epochs, per_step)


def load_eval_tasks(train_args: SFTTrainArgs) -> list[dict]:
    if not train_args.eval_file:
        return []
    return load_tasks(train_args.eval_file)[: train_args.eval_tasks]


def run_validation(run, model, tokenizer, eval_tasks, sandbox, train_args, prompt_mode) -> dict:
    """Greedy pass@1 on the held-out tasks, computed on the main process only."""
    metrics: dict = {}
    if run.is_main:
        metrics, _ = evaluate(
            run.accelerator.unwrap_model(model),
            tokenizer,
            eval_tasks,
            sandbox,
            max_new_tokens=train_args.eval_max_new_tokens,
            prompt_mode=prompt_mode,
        )
        run.print(f"eval/pass@1 = {metrics['eval/pass@1']:.4f} on {len(eval_tasks)} tasks")
    run.accelerator.wait_for_everyone()
    return metrics


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    model_args, train_args, data_args = parse_args(
        (ModelArgs, SFTTrainArgs, SFTDataArgs), argv, description=__doc__.split("\n\n")[0]
    )
    check_options(train_args, data_args)
    # validate_common wants a positive max_steps; the real one is known once the data is tokenized.
    validate_common(model_args, dataclasses.replace(train_args, max_steps=1))
    tasks = load_tasks(data_args.train_file)
    if not any(task.get("canonical_solution") for task in tasks):
        raise UserError(f"{data_args.train_file}: no task has a canonical_solution to learn")
    eval_tasks = load_eval_tasks(train_args)

    run = start_run(
        train_args,
        (model_args, train_args, data_args),
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
    )
    model, tokenizer = load_policy(model_args, run.resume_from)
    data = build_examples(
        tasks, tokenizer, data_args.prompt_mode, data_args.max_length, data_args.overlong
    )
    if not data.examples:
        raise UserError(
            f"{data_args.train_file}: no usable training example ({data.summary()}); "
            "rows need canonical_solution and must fit --max_length"
        )
    accelerator = run.accelerator
    max_steps = resolve_max_steps(train_args, len(data.examples), accelerator.num_processes)
    fingerprint = data_fingerprint(data.examples)
    record_computed(
        run,
        {
            "max_steps": max_steps,
            "max_steps_from": "max_steps" if train_args.max_steps else "num_train_epochs",
            "trainable_params": count_trainable(model),
            "model": describe_model(model),
            "data_fingerprint": fingerprint,
            **data.summary(),
        },
    )
    if data.dropped_overlong or data.truncated_overlong or data.skipped_no_solution:
        run.print(
            f"{data.dropped_overlong} examples over --max_length {data_args.max_length} dropped, "
            f"{data.truncated_overlong} truncated, {data.skipped_no_solution} without "
            "canonical_solution skipped"
        )

    optimizer, scheduler = build_optimizer(
        trainable_parameters(model), dataclasses.replace(train_args, max_steps=max_steps)
    )
    # The scheduler is not prepared: accelerate's wrapper steps it once per process per step
    # (it assumes a per-process dataloader), while max_steps here already counts every process.
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = TaskStream(len(data.examples), seed=train_args.seed)
    step, tokens_seen = 0, 0
    state = restore(run.resume_from)  # restores the RNG too: do nothing random after this
    if state is not None:
        if state.get("data_fingerprint") != fingerprint:
            raise UserError(
                f"--resume: {run.resume_from} was trained on other data (or another tokenizer) "
                f"than {data_args.train_file}"
            )
        load_optimizer_state(run, optimizer, scheduler, state)
        stream.position = state["data_position"]
        step, tokens_seen = state["step"], state["tokens_seen"]
        run.print(f"resumed from {run.resume_from} at step {step}")

    sandbox = make_sandbox(train_args) if eval_tasks and run.is_main else None
    pad_id = tokenizer.pad_token_id
    model.train()
    last_checkpoint = run.resume_from
    metrics: dict = {}
    evaluated_at = -1
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="sft", unit="step", disable=not run.is_main)
    try:
        while step < max_steps:
            indices = step_indices(
                stream,
                train_args.per_device_train_batch_size,
                train_args.gradient_accumulation_steps,
                accelerator.num_processes,
            )
            micro_batches = [[data.examples[i] for i in batch] for batch in indices]
            metrics = train_step(
                run, model, optimizer, scheduler, micro_batches, pad_id, train_args.max_grad_norm
            )
            step += 1
            tokens_seen += metrics.pop("input_tokens")
            metrics.update({"train/tokens": tokens_seen, "train/epoch": stream.epoch})
            if train_args.eval_every and step % train_args.eval_every == 0:
                metrics.update(
                    run_validation(
                        run,
                        model,
                        tokenizer,
                        eval_tasks,
                        sandbox,
                        train_args,
                        data_args.prompt_mode,
                    )
                )
                evaluated_at = step
            if eval_tasks and step == max_steps and evaluated_at != step:
                metrics.update(
                    run_validation(
                        run,
                        model,
                        tokenizer,
                        eval_tasks,
                        sandbox,
                        train_args,
                        data_args.prompt_mode,
                    )
                )
            run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if step % train_args.save_every == 0 or step == max_steps:
                trainer_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "data_position": stream.position,
                    "data_fingerprint": fingerprint,
                    "tokens_seen": tokens_seen,
                }
                last_checkpoint = save(
                    run, step, model, trainer_state, metrics, train_args.keep_last
                )
    finally:
        bar.close()
        if sandbox is not None:
            sandbox.close()
    if metrics:
        run.print(f"step {step}: train/loss {metrics['train/loss']:.4f}")
    finish(run, last_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
