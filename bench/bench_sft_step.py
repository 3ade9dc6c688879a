"""Seconds per SFT step: this project's step (train_sft_lora.py) against TRL's ``SFTTrainer``.

Both run in this one process, interleaved step by step (TRL's step, then ours, inside TRL's
training loop) so that a change in machine load hits both alike. Printed: each side's median
seconds per optimizer step and per example after warm-up, the ratio ours / TRL, the peak RSS during
each side's steps, both sides' loss at every step, and where the time goes.

Matched settings (both sides):

* model: ``--model DIR`` as it is when it holds a model, else the tiny Llama of
  ``coderl.tiny_model`` built there (random init: SFT needs no pre-training to be measured);
  ``--dtype`` weights and compute (float32 or bfloat16), CPU, ``--threads`` torch threads; no
  autocast or gradient checkpointing;
* a fresh LoRA adapter (r=16, alpha=32, ``--lora_dropout``, default 0.05 as the project's) on every
  linear layer but the output head, built by the project's ``load_policy`` with the same seed
  (initial adapter weights checked equal); both reseed torch with the same value every step;
* the same examples in the same order: toy Python function tasks (``coderl.toy_tasks``) encoded by
  ``coderl.sft_data.build_examples`` in ``--prompt_mode`` (default instruct: chat-template prompt,
  the whole function in one fenced block, then the end-of-turn token); TRL gets the same ids as a
  pre-tokenized dataset (``input_ids`` + ``completion_mask``, ``completion_only_loss``, a
  sequential sampler over the rows in the order ``train_sft_lora``'s ``TaskStream`` draws them; its
  labels are checked to mark exactly our target tokens), so both learn the solution tokens only;
* ``--batch_size`` examples per micro-batch, ``--accumulation`` micro-batches per optimizer step;
  AdamW (torch, lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0,
  constant learning rate, no warm-up.

Loss: both sides divide the step's summed token NLL by its number of supervised tokens (ours in
``train_step``; TRL divides each micro-batch's sum by the Trainer's ``num_items_in_batch``, the
step's label count), so the sum of TRL's micro-batch losses is our ``train/loss``; the run fails if
the first step's differ by more than a relative 1e-4 (float32: far above the rounding of a sum of a
few thousand terms) or 2e-2 (bfloat16, 8 significant bits: ours rounds the logits to bfloat16
before its float32 log-softmax, TRL's head accumulates in float32).

What differs is each side's own machinery. Ours (``train_sft_lora.summed_token_nll``) packs the
micro-batch into one sequence without padding (segment attention, ``coderl.logprobs``), runs the
output head and log-softmax on the target positions only, draws LoRA's dropout as gaps between
dropped elements (``coderl.dropout``), and without dropout runs the chat template's opening once
per micro-batch. TRL right-pads the rows; its fused head (``add_fused_lm_head``) on CPU scores
every position in vocabulary chunks and also computes entropy and top-1 accuracy. Both drop each
element of every LoRA input independently with the same probability, but not with the same masks
(ours draws none for padding, and other random numbers): from the second step on the losses differ
by that noise (a fresh LoRA's B is zero: the first step's forward does not depend on dropout). With
``--lora_dropout 0`` both compute the same function at every step and all steps' losses agree (the
largest relative difference is printed).

Where the time goes: forward (ours: ``summed_token_nll``; TRL: ``compute_loss``, metrics included),
backward (``accelerator.backward``) and the rest (collation, clipping, the optimizer, bookkeeping;
for TRL its data loading and logging too, see ``interleaved``).

Peak RSS (``ru_maxrss``, ``bench/peak_rss.py``): before each side's step freed memory goes back to
the system (glibc ``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``), so
each side's figure is the process's peak during its own steps, which holds the other side's
resident weights too; the part above the step's starting RSS is that side's own working memory
(activations, logits, gradients).

    python bench/bench_sft_step.py                          # tiny model, 2 warm-up + 5 steps each
    python bench/bench_sft_step.py --model checkpoints/smollm2-135m-instruct --steps 5 \\
        --warmup 1 --batch_size 8 --output results/bench_sft_step.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (ROOT, BENCH):  # the project, and the benchmark modules beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from peak_rss import peak_rss_mib, reset_peak_rss, start_rss_window  # noqa: E402

from coderl.cli import parse_args, seed_everything  # noqa: E402
from coderl.errors import UserError, exit_on_user_error  # noqa: E402

LORA_R, LORA_ALPHA = 16, 32
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclass
class BenchArgs:
    steps: int = field(
        default=5,
        metadata={"help": "Measured steps per side (median reported).", "range": "[1, inf)"},
    )
    warmup: int = field(
        default=2, metadata={"help": "Warm-up steps per side, not measured.", "range": "[0, inf)"}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Examples per micro-batch.", "range": "[1, inf)"}
    )
    accumulation: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step.", "range": "[1, inf)"}
    )
    prompt_mode: str = field(
        default="instruct",
        metadata={
            "help": "How examples are built (train_sft_lora.py's --prompt_mode).",
            "choices": ["base", "instruct"],
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights and compute dtype, both sides.",
            "choices": ["float32", "bfloat16"],
        },
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "LoRA dropout, both sides.", "range": "[0, 1)"}
    )
    num_tasks: int = field(
        default=256,
        metadata={"help": "Toy tasks the examples are drawn from.", "range": "[1, inf)"},
    )
    threads: int = field(
        default=2, metadata={"help": "torch threads for both sides.", "range": "[1, inf)"}
    )
    model: str = field(
        default="",
        metadata={
            "help": "Model folder: used as it is when it holds a model, else the tiny model is "
            "built there (and kept for the next run); empty = a temp folder."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for the model, adapters, data order and dropout."}
    )
    output: str = field(default="", metadata={"help": "Write the figures to this JSON file."})


# --------------------------------------------------------------------------- shared setup


def load_sft_policy(model_dir: Path, args: BenchArgs):
    """Base + fresh LoRA on all linear layers but the head, as train_sft_lora.py builds it."""
    from coderl.training import ModelArgs, load_policy

    model_args = ModelArgs(
        model=str(model_dir),
        quantization="none",
        dtype=args.dtype,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
    )
    torch.manual_seed(args.seed)  # identical initial adapter weights on both sides
    return load_policy(model_args)


def total_steps(args: BenchArgs) -> int:
    return args.warmup + args.steps


def step_batches(args: BenchArgs, examples) -> list[list[list]]:
    """Every optimizer step's micro-batches, drawn as train_sft_lora.py draws them."""
    from coderl.sft_data import step_indices
    from coderl.training import TaskStream

    stream = TaskStream(len(examples), seed=args.seed)
    return [
        [
            [examples[i] for i in batch]
            for batch in step_indices(stream, args.batch_size, args.accumulation, 1)
        ]
        for _ in range(total_steps(args))
    ]


def dropout_seed(seed: int, step: int) -> int:
    """Both sides reseed torch with this before step ``step`` (the same random state; with
    dropout, each side draws its own masks from it)."""
    return seed * 1_000_003 + step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


@dataclass
class StepClock:
    """Seconds of one side's step spent in the forward and the backward passes, and its loss."""

    forward: float = 0.0
    backward: float = 0.0
    loss: float = 0.0

    def reset(self) -> None:
        self.forward = self.backward = self.loss = 0.0

    def timed(self, fn, slot: str):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                setattr(self, slot, getattr(self, slot) + time.perf_counter() - started)

        return wrapper


# --------------------------------------------------------------------------- this project


@dataclass
class Ours:
    run: object
    model: object
    optimizer: object
    scheduler: object
    pad_id: int
    clock: StepClock

    def step(self, micro_batches) -> dict:
        from train_sft_lora import train_step

        self.clock.reset()
        state = (self.run, self.model, self.optimizer, self.scheduler)
        metrics = train_step(*state, micro_batches, self.pad_id, MAX_GRAD_NORM)
        self.clock.loss = metrics["train/loss"]
        return metrics


def build_ours(args: BenchArgs, model_dir: Path, workdir: Path):
    import train_sft_lora
    from coderl.run import start_run
    from coderl.training import build_optimizer, trainable_parameters

    train_args = train_sft_lora.SFTTrainArgs(
        output_dir=str(workdir / "ours"),
        logging_dir=str(workdir / "runs"),
        report_to="none",
        seed=args.seed,
        max_steps=total_steps(args),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=LEARNING_RATE,
        lr_scheduler="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
    )
    run = start_run(train_args, (train_args,), gradient_accumulation_steps=args.accumulation)
    model, tokenizer = load_sft_policy(model_dir, args)
    train_sft_lora.prepare_model(model)  # what train_sft_lora.main does after loading
    optimizer, scheduler = build_optimizer(trainable_parameters(model), train_args)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    model.train()
    clock = StepClock()
    run.accelerator.backward = clock.timed(run.accelerator.backward, "backward")
    return Ours(run, model, optimizer, scheduler, tokenizer.pad_token_id, clock), tokenizer


@contextlib.contextmanager
def forward_timed(clock: StepClock):
    """train_step looks ``summed_token_nll`` up at call time: time it there, then put it back."""
    import train_sft_lora

    original = train_sft_lora.summed_token_nll
    train_sft_lora.summed_token_nll = clock.timed(original, "forward")
    try:
        yield
    finally:
        train_sft_lora.summed_token_nll = original


# --------------------------------------------------------------------------- TRL


def trl_rows(steps: list[list[list]]) -> list[dict]:
    """The examples in the order our steps take them: prompt + target ids, the target marked."""
    return [
        {
            "input_ids": list(ex.prompt_ids) + list(ex.target_ids),
            "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.target_ids),
        }
        for step in steps
        for batch in step
        for ex in batch
    ]


def build_trl(args: BenchArgs, model_dir: Path, rows: list[dict], workdir: Path):
    from bench_rl_step import TRL_CPU_QUIET
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_sft_policy(model_dir, args)
    config = SFTConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        max_steps=total_steps(args),
        train_sampling_strategy="sequential",
        completion_only_loss=True,
        max_length=None,
        packing=False,
        padding_free=False,
        loss_type="nll",
        activation_checkpointing=False,
        **TRL_CPU_QUIET,
        seed=args.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-step lines below say it all
    clock = StepClock()
    compute_loss = trainer.compute_loss

    def compute_loss_and_keep_it(*a, **kw):
        loss = compute_loss(*a, **kw)
        clock.loss += float(loss.detach())
        return loss

    trainer.compute_loss = clock.timed(compute_loss_and_keep_it, "forward")
    trainer.accelerator.backward = clock.timed(trainer.accelerator.backward, "backward")
    return trainer, clock


# --------------------------------------------------------------------------- checks


class Mismatch(Exception):
    """The two sides were not given, or did not compute, the same thing."""


def check_same_adapters(ours_model, trl_model) -> None:
    ours = {n: p for n, p in ours_model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in trl_model.named_parameters() if p.requires_grad}
    if ours.keys() != theirs.keys():
        raise Mismatch("the two sides train different parameters")
    differing = [n for n in ours if not torch.equal(ours[n].detach(), theirs[n].detach())]
    if differing:
        raise Mismatch(
            f"initial adapter weights differ ({len(differing)} tensors, e.g. {differing[0]})"
        )


def check_no_checkpointing(*models) -> None:
    from coderl.models import gradient_checkpointing_on

    if any(gradient_checkpointing_on(model) for model in models):
        raise Mismatch("activation checkpointing is on for one side")


def check_same_labels(trainer, rows: list[dict]) -> None:
    """TRL's prepared dataset holds our ids, its labels exactly our target tokens, in our order."""
    prepared = trainer.train_dataset
    if len(prepared) != len(rows):
        raise Mismatch(f"TRL kept {len(prepared)} of the {len(rows)} examples")
    for index, (row, mine) in enumerate(zip(prepared, rows, strict=True)):
        expected = [t if m else -100 for t, m in zip(mine["input_ids"], mine["completion_mask"])]
        if row["input_ids"] != mine["input_ids"] or row["labels"] != expected:
            raise Mismatch(f"TRL's example {index} differs from ours (ids or loss mask)")


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


# --------------------------------------------------------------------------- the race


def side_record(total: float, clock: StepClock, start_rss: float) -> dict:
    return {
        "step": total,
        "forward": clock.forward,
        "backward": clock.backward,
        "rest": total - clock.forward - clock.backward,
        "loss": clock.loss,
        "start_rss_mib": start_rss,
        "peak_rss_mib": peak_rss_mib(),
    }


def interleaved(args: BenchArgs, trainer, trl_clock: StepClock, ours: Ours, steps) -> dict:
    """Run TRL's training loop; after each of its steps, run ours on the same micro-batches.

    TRL's step is timed from the end of our previous step (or the start of its training loop) to
    its ``on_step_end``: its data loading and logging count, as our collation does.
    """
    from transformers import TrainerCallback

    records = {"trl": [], "ours": []}
    mark = {"t": 0.0, "rss": 0.0}

    def start_trl_window() -> None:
        trl_clock.reset()
        mark["rss"] = start_rss_window()
        mark["t"] = time.perf_counter()

    class Race(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            start_trl_window()

        def on_step_begin(self, _args, state, _control, **_k):
            torch.manual_seed(dropout_seed(args.seed, state.global_step + 1))

        def on_step_end(self, _args, state, _control, **_k):
            records["trl"].append(
                side_record(time.perf_counter() - mark["t"], trl_clock, mark["rss"])
            )
            step = state.global_step
            start_rss = start_rss_window()
            started = time.perf_counter()
            torch.manual_seed(dropout_seed(args.seed, step))
            ours.step(steps[step - 1])
            records["ours"].append(
                side_record(time.perf_counter() - started, ours.clock, start_rss)
            )
            print(
                f"step {step}: TRL {records['trl'][-1]['step']:.3f} s (loss {trl_clock.loss:.5f}), "
                f"ours {records['ours'][-1]['step']:.3f} s (loss {ours.clock.loss:.5f})",
                file=sys.stderr,
            )
            start_trl_window()

    trainer.add_callback(Race())
    with forward_timed(ours.clock):
        trainer.train()
    return records


def summarize(args: BenchArgs, records: dict, setup_rss: float, rss_per_step: bool) -> dict:
    from bench_rl_step import median  # the same median (NaN for no values)

    examples_per_step = args.batch_size * args.accumulation
    out = {"settings": dataclasses.asdict(args), "torch_threads": torch.get_num_threads()}
    for side in ("ours", "trl"):
        measured = records[side][args.warmup :]
        out[side] = {
            key: median([r[key] for r in measured])
            for key in ("step", "forward", "backward", "rest")
        }
        out[side]["seconds_per_example"] = out[side]["step"] / examples_per_step
        out[side]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in records[side])
        out[side]["peak_rss_above_start_mib"] = max(
            r["peak_rss_mib"] - r["start_rss_mib"] for r in records[side]
        )
        out[side]["per_step"] = records[side]
    out["ratio_ours_over_trl"] = out["ours"]["step"] / out["trl"]["step"]
    first_ours, first_trl = records["ours"][0]["loss"], records["trl"][0]["loss"]
    rtol = LOSS_RTOL[args.dtype]
    out["first_step_loss"] = {
        "ours": first_ours,
        "trl": first_trl,
        "relative_difference": relative_difference(first_ours, first_trl),
        "rtol": rtol,
        "agree": relative_difference(first_ours, first_trl) <= rtol,
    }
    out["max_relative_loss_difference_any_step"] = max(
        relative_difference(o["loss"], t["loss"]) for o, t in zip(records["ours"], records["trl"])
    )
    out["rss"] = {
        "after_setup_mib": setup_rss,
        "process_peak_mib": max(setup_rss, out["ours"]["peak_rss_mib"], out["trl"]["peak_rss_mib"]),
        "per_step_peaks": rss_per_step,
    }
    return out


def report(summary: dict) -> str:
    lines = [
        "| median | s/step | s/example | forward | backward | rest | peak RSS MiB (above start) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, name in (("ours", "this project"), ("trl", "TRL SFTTrainer")):
        s = summary[side]
        lines.append(
            f"| {name} | {s['step']:.3f} | {s['seconds_per_example']:.4f} | {s['forward']:.3f} | "
            f"{s['backward']:.3f} | {s['rest']:.3f} | {s['peak_rss_mib']:.0f} "
            f"({s['peak_rss_above_start_mib']:.0f}) |"
        )
    loss = summary["first_step_loss"]
    lines.append(
        f"\nratio ours / TRL = {summary['ratio_ours_over_trl']:.3f}\n"
        f"first-step loss: ours {loss['ours']:.6f}, TRL {loss['trl']:.6f} "
        f"(relative difference {loss['relative_difference']:.2e}, tolerance {loss['rtol']:.0e}); "
        f"largest relative difference over all steps {summary['max_relative_loss_difference_any_step']:.2e}"
    )
    if not summary["rss"]["per_step_peaks"]:
        lines.append("peak RSS: the process's peak so far (this system cannot reset it per step)")
    return "\n".join(lines)


def example_stats(examples) -> dict:
    return {
        "examples": len(examples),
        "mean_prompt_tokens": statistics.mean(len(ex.prompt_ids) for ex in examples),
        "mean_target_tokens": statistics.mean(len(ex.target_ids) for ex in examples),
    }


@exit_on_user_error
def main(argv=None) -> None:
    import trl

    (args,) = parse_args((BenchArgs,), argv, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench_rl_step import build_model, toy_tasks
    from datasets.utils.logging import disable_progress_bar

    from coderl.sft_data import build_examples

    disable_progress_bar()
    seed_everything(args.seed)
    tasks = toy_tasks(args.num_tasks, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = Path(args.model) if args.model else workdir / "model"
        if not (model_dir / "config.json").is_file():
            if args.model and model_dir.exists() and any(model_dir.iterdir()):
                raise UserError(
                    f"--model {model_dir}: a folder without config.json that is not empty"
                )
            # random init: SFT needs no pre-training
            build_model(model_dir, tasks, 0, seed=args.seed)
        ours, tokenizer = build_ours(args, model_dir, workdir)
        data = build_examples(tasks, tokenizer, args.prompt_mode, max_length=1024, overlong="drop")
        if not data.examples:
            raise UserError(f"no toy task fits 1024 tokens with {model_dir}'s tokenizer")
        steps = step_batches(args, data.examples)
        rows = trl_rows(steps)
        trainer, trl_clock = build_trl(args, model_dir, rows, workdir)
        try:
            check_same_adapters(ours.model, trainer.model)
            check_same_labels(trainer, rows)
            setup_rss = peak_rss_mib()
            rss_per_step = reset_peak_rss()
            print(
                f"torch {torch.__version__}, trl {trl.__version__}, threads {args.threads}, "
                f"{args.dtype}, {cpu_name()}; {example_stats(data.examples)}",
                file=sys.stderr,
            )
            records = interleaved(args, trainer, trl_clock, ours, steps)
            check_no_checkpointing(ours.model, trainer.model)  # the Trainer decides at train()
        except Mismatch as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
    summary = summarize(args, records, setup_rss, rss_per_step)
    summary["examples"] = example_stats(data.examples)
    summary["model"] = str(model_dir) if args.model else "tiny (temporary)"
    summary["cpu"] = cpu_name()
    summary["versions"] = {"torch": torch.__version__, "trl": trl.__version__}
    print(report(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))
    if not summary["first_step_loss"]["agree"]:
        loss = summary["first_step_loss"]
        print(
            f"error: first-step losses differ: ours {loss['ours']:.6f}, TRL {loss['trl']:.6f} "
            f"(relative {loss['relative_difference']:.2e} > {loss['rtol']:.0e})",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
