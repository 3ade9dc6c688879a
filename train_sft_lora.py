"""Supervised fine-tuning (SFT) of a causal LM with a LoRA / QLoRA / TinyLoRA adapter.

The loss is the causal-LM cross-entropy on ``prompt + target + end token`` with the prompt tokens
masked: only the target and the end token are learned. The end token is the one that ends an
answer at inference: EOS in base mode, the chat template's end-of-turn (e.g. ``<|im_end|>``) in
instruct mode. Examples come from ``coderl.sft_data``: the prompt tokenized exactly as generation
tokenizes it, the target (``canonical_solution`` in base mode; one fenced code block in instruct
mode) separately, the id lists concatenated. The output is a PEFT adapter (step-numbered
checkpoints and ``<output_dir>/final``) that ``eval_humaneval.py --model <dir>/final`` and the RL
scripts (``--init_adapter <dir>/final``) load.

Loss normalisation: per token over the optimizer step. The summed token losses of every
micro-batch of one step (all ``gradient_accumulation_steps`` micro-batches on all processes) are
divided by the number of supervised tokens in the whole step, so a long solution weighs more than
a short one and padding or batch composition never changes the gradient. This is close to what the
Hugging Face Trainer does with ``num_items_in_batch``; a mean per micro-batch (older Trainers, and
the seed's batch of 1) gives every example the same weight whatever its length. ``train/loss`` is
that per-token mean.

How a micro-batch is computed (``summed_token_nll``): one padding-free pass where the model allows
it (``coderl.logprobs``: the rows packed into one sequence, each attending to itself only), the
output head and log-softmax on the target positions only. Without dropout, the prefix every row
shares (a chat template's opening) and repeated prompts run once for the micro-batch; with dropout
each row runs whole, so each draws its own masks as separate passes would. LoRA's dropout is
``coderl.dropout.GapDropout``: the same distribution as torch's, drawn for fewer random numbers.

Seed defaults kept (RL-Code-Agent): LoRA r=8, alpha=16, dropout 0.05 on the attention and MLP
projections, learning rate 5e-5, batch 1 x accumulation 8, one epoch, 4-bit NF4 base on CUDA.
Departures from the seed: the loss is per token over the optimizer step, not a mean of micro-batch
means; prompt and solution are tokenized separately (the seed tokenized the joined string and
masked by the prompt's token count, which can misplace the boundary token); an end token ends
every target, so the model learns to stop; the schedule (unstated in the seed) is linear decay
after warm-up by default; examples over ``--max_length`` are dropped or truncated and counted,
never silently cut; resume restores the adapter, optimizer, scheduler, RNG and data position.

Launch (one GPU, the seed's setting; the tiny CPU preset and several processes are in the
README)::

    python train_sft_lora.py --model deepseek-ai/deepseek-coder-1.3b-base \\
        --train_file data/humaneval_train.jsonl --eval_file data/humaneval_test.jsonl \\
        --eval_tasks 33 --output_dir checkpoints/sft
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from coderl.cli import parse_args
from coderl.dropout import use_gap_dropout
from coderl.errors import UserError, exit_on_user_error
from coderl.logprobs import PackedBatch, completion_logprobs, dropout_active
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
from coderl.sft_data import (
    Example,
    data_fingerprint,
    load_examples,
    pack_examples,
    resolve_max_steps,
    step_indices,
)
from coderl.tasks import load_tasks
from coderl.training import (
    ModelArgs,
    TaskStream,
    TrainArgs,
    build_optimizer,
    count_trainable,
    load_policy,
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
        metadata={"help": "Passes over the examples (when --max_steps is 0).", "range": "(0, inf)"},
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
    """What to train on and how examples are built (``coderl.sft_data``)."""

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


def check_options(data_args: SFTDataArgs) -> None:
    """What the options' ranges (checked while parsing) cannot say; before anything loads."""
    if not data_args.train_file:
        raise UserError("--train_file is required (a task file with canonical_solution)")


# --------------------------------------------------------------------------- loss


def prepare_model(model) -> int:
    """What training changes in the loaded policy: LoRA's dropouts drawn as gaps (the same
    distribution, fewer random numbers). Returns how many dropouts were replaced."""
    return use_gap_dropout(model)


def summed_token_nll(model, batch: PackedBatch) -> torch.Tensor:
    """Sum over the batch of -log p(target token | everything before it), prompts masked out.

    Sharing a prefix or a prompt between rows would also share its dropout masks, where separate
    rows draw one mask each: with dropout active every row runs whole.
    """
    share = not dropout_active(model)
    out = completion_logprobs(
        model, batch, share_prompts=share, padding_free=True, share_prefix=share
    )
    return -out.logprobs.sum()


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
    for examples in local:
        batch = pack_examples(examples, pad_id, accelerator.device)
        input_tokens += sum(ex.num_tokens for ex in examples)
        with accelerator.accumulate(model):
            nll = summed_token_nll(model, batch)
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


def load_eval_tasks(train_args: SFTTrainArgs) -> list[dict]:
    if not train_args.eval_file:
        return []
    return load_tasks(train_args.eval_file)[: train_args.eval_tasks]


def run_validation(run, model, tokenizer, eval_tasks, sandbox, train_args, data_args) -> dict:
    """Greedy pass@1 on the held-out tasks, computed on the main process only."""
    metrics: dict = {}
    if run.is_main:
        metrics, _ = evaluate(
            run.accelerator.unwrap_model(model),
            tokenizer,
            eval_tasks,
            sandbox,
            max_new_tokens=train_args.eval_max_new_tokens,
            prompt_mode=data_args.prompt_mode,
        )
        run.print(f"eval/pass@1 = {metrics['eval/pass@1']:.4f} on {len(eval_tasks)} tasks")
    run.accelerator.wait_for_everyone()
    return metrics


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    model_args, train_args, data_args = parse_args(
        (ModelArgs, SFTTrainArgs, SFTDataArgs), argv, description=__doc__.split("\n\n")[0]
    )
    check_options(data_args)
    # validate_common wants a positive max_steps; the real one is known once the data is tokenized.
    validate_common(model_args, dataclasses.replace(train_args, max_steps=1))
    tasks = load_tasks(data_args.train_file)
    if not any(task.get("canonical_solution") for task in tasks):
        raise UserError(f"{data_args.train_file}: no task has a canonical_solution to learn")
    eval_tasks = load_eval_tasks(train_args)

    accumulation = train_args.gradient_accumulation_steps
    run = start_run(
        train_args, (model_args, train_args, data_args), gradient_accumulation_steps=accumulation
    )
    model, tokenizer = load_policy(model_args, run.resume_from)
    prepare_model(model)
    data = load_examples(tasks, tokenizer, data_args, log=run.print)
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
    validation = functools.partial(
        run_validation, run, model, tokenizer, eval_tasks, sandbox, train_args, data_args
    )
    pad_id = tokenizer.pad_token_id
    model.train()
    last_checkpoint = run.resume_from
    metrics: dict = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="sft", unit="step", disable=not run.is_main)
    try:
        while step < max_steps:
            batch_size, processes = (
                train_args.per_device_train_batch_size,
                accelerator.num_processes,
            )
            indices = step_indices(stream, batch_size, accumulation, processes)
            micro_batches = [[data.examples[i] for i in batch] for batch in indices]
            metrics = train_step(
                run, model, optimizer, scheduler, micro_batches, pad_id, train_args.max_grad_norm
            )
            step += 1
            tokens_seen += metrics.pop("input_tokens")
            metrics.update({"train/tokens": tokens_seen, "train/epoch": stream.epoch})
            due = train_args.eval_every and step % train_args.eval_every == 0
            if due or (eval_tasks and step == max_steps):  # and always after the last step
                metrics.update(validation())
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
