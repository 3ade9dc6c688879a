"""Plumbing shared by the training scripts: options, run setup, policy loading, optimizer,
log-probs of sequences, rollouts (generate + score + reward), validation, checkpoints and resume.

No algorithm lives here: advantages and losses are written out in each ``train_*.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from coderl.checkpoint import (
    checkpoint_folders,
    clean_leftovers,
    export_final,
    load_trainer_state,
    resumable_checkpoint,
    save_checkpoint,
)
from coderl.cli import SEED_RANGE, seed_everything
from coderl.errors import UserError
from coderl.rewards import RewardArgs, Scored, compute_rewards
from coderl.runlog import RunLogger

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelArgs:
    model: str = field(
        default="deepseek-ai/deepseek-coder-1.3b-base",
        metadata={"help": "Base model: hub id or local folder (the tiny preset builds one)."},
    )
    init_adapter: str = field(
        default="",
        metadata={
            "help": "Start from this adapter folder (e.g. the SFT output) and keep training "
            "it; empty: a fresh adapter of --adapter type."
        },
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": "Base weights: 4bit (NF4, double quant), 8bit, none; auto = 4bit on CUDA, "
            "none on CPU.",
            "choices": ["auto", "none", "4bit", "8bit"],
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype (auto: bf16 on CUDA, fp32 on CPU).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    adapter: str = field(
        default="lora",
        metadata={
            "help": "Trainable adapter: lora, or tinylora (peft TinyLoraConfig: u scalars).",
            "choices": ["lora", "tinylora"],
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank.", "range": "[1, inf)"})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA alpha (scale = alpha / r).", "range": "[1, inf)"}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout.", "range": "[0, 1)"})
    target_modules: str = field(
        default=DEFAULT_TARGETS,
        metadata={
            "help": "Comma-separated module names to adapt (attention and MLP projections by "
            "default), or all-linear."
        },
    )
    tinylora_u: int = field(
        default=32, metadata={"help": "TinyLoRA trainable vector size u.", "range": "[1, inf)"}
    )
    tinylora_r: int = field(
        default=2, metadata={"help": "TinyLoRA frozen SVD rank r.", "range": "[1, inf)"}
    )
    tinylora_weight_tying: float = field(
        default=1.0,
        metadata={
            "help": "TinyLoRA weight tying; 1.0 = one vector of u scalars shared by "
            "every adapted module.",
            "range": "[0, 1]",
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory on long sequences."}
    )


@dataclass
class TrainArgs:
    output_dir: str = field(
        default="", metadata={"help": "Where checkpoints go (checkpoint-<step>/ and final/)."}
    )
    run_name: str = field(
        default="",
        metadata={
            "help": "Name of the run under --logging_dir (default: output folder name + seed)."
        },
    )
    logging_dir: str = field(default="runs", metadata={"help": "Parent folder of run logs."})
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Trackers besides metrics.jsonl: tensorboard, wandb, both "
            "(comma-separated) or none."
        },
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed for everything (also in the run name).", "range": SEED_RANGE},
    )
    max_steps: int = field(
        default=100, metadata={"help": "Optimizer steps to run.", "range": "[1, inf)"}
    )
    learning_rate: float = field(
        default=1e-5, metadata={"help": "Peak learning rate.", "range": "(0, inf)"}
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule after warm-up.",
            "choices": ["constant", "linear", "cosine"],
        },
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Linear warm-up steps.", "range": "[0, inf)"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay.", "range": "[0, inf)"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (0 = off).", "range": "[0, inf)"}
    )
    save_every: int = field(
        default=50,
        metadata={
            "help": "Checkpoint every N steps and at the end (N > --max_steps: only at the end).",
            "range": "[1, inf)",
        },
    )
    keep_last: int = field(
        default=2, metadata={"help": "Checkpoints kept on disk (0 = all).", "range": "[0, inf)"}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue from the last intact checkpoint in --output_dir (adapter, "
            "optimizer, scheduler, RNG, data position); logs are cut back to its step. A "
            "setting that would change the run must equal the checkpoint's (see "
            "--allow_changed); logging, evaluation and checkpoint cadence may change."
        },
    )
    allow_changed: str = field(
        default="",
        metadata={
            "help": "With --resume: comma-separated options that may differ from the "
            "checkpoint's (e.g. max_steps,learning_rate); the new values are used from the "
            "resumed step on and recorded under computed.resumed in config.json."
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Validate every N steps on held-out tasks (0 = only at the end "
            "if --eval_file is set).",
            "range": "[0, inf)",
        },
    )
    eval_file: str = field(default="", metadata={"help": "Held-out task file for validation."})
    eval_tasks: int = field(
        default=32, metadata={"help": "Held-out tasks per validation.", "range": "[1, inf)"}
    )
    eval_max_new_tokens: int = field(
        default=256,
        metadata={"help": "Generation budget for validation (greedy).", "range": "[1, inf)"},
    )
    sandbox_timeout: float = field(
        default=3.0,
        metadata={
            "help": "Seconds per task run in the sandbox (per test for stdin).",
            "range": "(0, inf)",
        },
    )
    sandbox_workers: int = field(
        default=0, metadata={"help": "Sandbox workers (0 = CPU count).", "range": "[0, inf)"}
    )

    def resolved_run_name(self) -> str:
        """Computed after parsing: the run's name, with its seed."""
        return self.run_name or f"{Path(self.output_dir).name}-seed{self.seed}"


def validate_common(model_args: ModelArgs, train_args: TrainArgs) -> None:
    if not train_args.output_dir:
        raise UserError("--output_dir is required")
    if train_args.max_steps < 1:
        raise UserError("--max_steps must be at least 1")
    if train_args.learning_rate <= 0:
        raise UserError("--learning_rate must be positive")
    if train_args.eval_every and not train_args.eval_file:
        raise UserError("--eval_every needs --eval_file (held-out tasks)")
    if (
        model_args.init_adapter
        and not (Path(model_args.init_adapter) / "adapter_config.json").is_file()
    ):
        raise UserError(f"--init_adapter {model_args.init_adapter}: no adapter_config.json there")


# --------------------------------------------------------------------------- run setup


@dataclass
class Run:
    """What a training script holds on to for the whole run."""

    accelerator: Any
    logger: RunLogger
    output_dir: Path
    run_dir: Path
    resume_from: Path | None
    config: dict

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, file=sys.stderr)


def start_run(
    train_args: TrainArgs, all_args: Sequence[Any], gradient_accumulation_steps: int = 1
) -> Run:
    """Seed, create the accelerator, the logger and decide where to resume from."""
    from accelerate import Accelerator

    seed_everything(train_args.seed)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )
    warn_if_launched_as_one_cpu_process(accelerator)
    refuse_sharded_training(accelerator)
    output_dir = Path(train_args.output_dir)
    config = {type(a).__name__: dataclasses.asdict(a) for a in all_args}
    config["computed"] = {
        "run_name": train_args.resolved_run_name(),
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
    }
    allowed = parse_allow_changed(train_args.allow_changed, config)
    resume_from, resume_step = find_resume_point(accelerator, train_args, output_dir)
    if resume_from is not None:
        changes = check_resume_settings(resume_from, config, allowed)
        config["computed"]["resumed"] = {
            "from": str(resume_from),
            "step": resume_step,
            "changed": {k: {"checkpoint": old, "now": new} for k, (old, new) in changes.items()},
        }
    run_dir = Path(train_args.logging_dir) / train_args.resolved_run_name()
    logger = RunLogger(
        run_dir,
        config=config,
        report_to=train_args.report_to,
        enabled=accelerator.is_main_process,
        resume_step=resume_step,
    )
    return Run(accelerator, logger, output_dir, run_dir, resume_from, config)


def find_resume_point(accelerator, train_args: TrainArgs, output_dir: Path):
    """(checkpoint, its step) to resume from, or (None, None) for a fresh start.

    What killed runs left (dot-named temporary folders) is removed first, by the main process."""
    if accelerator.is_main_process:
        removed = clean_leftovers(output_dir)
        if removed:
            print(f"removed leftovers of a killed run: {', '.join(removed)}", file=sys.stderr)
    accelerator.wait_for_everyone()
    if not train_args.resume:
        if checkpoint_folders(output_dir):
            raise UserError(
                f"{output_dir} already holds checkpoints; pass --resume to continue or "
                "choose another --output_dir"
            )
        return None, None

    def warn(line: str) -> None:
        if accelerator.is_main_process:
            print(line, file=sys.stderr)

    resume_from = resumable_checkpoint(output_dir, warn=warn)
    if resume_from is None:
        warn(f"--resume: no checkpoint in {output_dir}, starting fresh")
        return None, None
    return resume_from, int(json.loads((resume_from / "meta.json").read_text())["step"])


# Settings that do not change what a run computes: where and how it logs, how often it evaluates
# and checkpoints, how many sandbox workers score (verdicts do not depend on it), memory knobs.
FREE_ON_RESUME = frozenset(
    {
        "output_dir",
        "run_name",
        "logging_dir",
        "report_to",
        "resume",
        "allow_changed",
        "save_every",
        "keep_last",
        "eval_every",
        "eval_file",
        "eval_tasks",
        "eval_max_new_tokens",
        "eval_at_start",
        "sandbox_workers",
        "gradient_checkpointing",
    }
)
# Settings the checkpoint itself decides (the adapter's shape and config, the saved RNG): a new
# value would be ignored, so it is refused even with --allow_changed.
FIXED_ON_RESUME = frozenset(
    {
        "model",
        "init_adapter",
        "adapter",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "tinylora_u",
        "tinylora_r",
        "tinylora_weight_tying",
        "seed",
        "variant",
        "kl_reference",
    }
)
# Settings the saved optimizer or scheduler state would silently override.
OPTIMIZER_SETTINGS = frozenset(
    {
        "learning_rate",
        "value_learning_rate",
        "weight_decay",
        "lr_scheduler",
        "warmup_steps",
        "max_steps",
        "num_train_epochs",
    }
)


# How long the run is: extending a run changes nothing before the old end unless the learning-rate
# schedule is stretched with it.
LENGTH_SETTINGS = frozenset({"max_steps", "num_train_epochs"})


def _constant_schedule(old_values: dict, values: dict) -> bool:
    return old_values.get("lr_scheduler") == values.get("lr_scheduler") == "constant"


def parse_allow_changed(text: str, config: dict) -> set[str]:
    names = {name.strip().lstrip("-") for name in text.split(",") if name.strip()}
    known = {key for section in config.values() for key in section} | {"num_processes"}
    unknown = sorted(names - known)
    if unknown:
        raise UserError(f"--allow_changed: no option named {', '.join(unknown)}")
    fixed = sorted(names & FIXED_ON_RESUME)
    if fixed:
        raise UserError(
            f"--allow_changed: {', '.join(fixed)} cannot change on resume (the checkpoint "
            "decides it); start a new run in another --output_dir"
        )
    return names


def _same_setting(old: Any, new: Any) -> bool:
    if old == new:
        return True
    # One file named two ways (relative and absolute) is the same setting.
    return (
        isinstance(old, str)
        and isinstance(new, str)
        and bool(old)
        and os.path.exists(new)
        and os.path.realpath(old) == os.path.realpath(new)
    )


def resume_changes(saved: dict, config: dict) -> dict[str, tuple[Any, Any]]:
    """Options whose value differs from the one ``saved`` (a checkpoint's ``args``) recorded,
    as name -> (checkpoint's value, new value); free settings and options the checkpoint
    predates are left out. The process count counts as a setting."""
    changes = {}
    for section, values in config.items():
        old_values = saved.get(section)
        if section == "computed" or not isinstance(old_values, dict):
            continue
        for name, new in values.items():
            if name in FREE_ON_RESUME or name not in old_values:
                continue
            if name in LENGTH_SETTINGS and _constant_schedule(old_values, values):
                continue  # a constant schedule does not depend on the run's length
            if not _same_setting(old_values[name], new):
                changes[name] = (old_values[name], new)
    old_processes = (saved.get("computed") or {}).get("num_processes")
    new_processes = config["computed"]["num_processes"]
    if old_processes is not None and old_processes != new_processes:
        changes["num_processes"] = (old_processes, new_processes)
    return changes


def check_resume_settings(checkpoint: Path, config: dict, allowed: set[str]) -> dict:
    """The changes ``--allow_changed`` lets through; a UserError naming each other change."""
    saved = json.loads((checkpoint / "meta.json").read_text()).get("args") or {}
    changes = resume_changes(saved, config)

    def listing(names) -> str:
        return ", ".join(
            f"--{n} {json.dumps(changes[n][0])} -> {json.dumps(changes[n][1])}" for n in names
        )

    fixed = [n for n in changes if n in FIXED_ON_RESUME]
    if fixed:
        raise UserError(
            f"--resume: {listing(fixed)} differs from {checkpoint} and cannot change on resume "
            "(the checkpoint decides it); pass the old value or start a new run in another "
            "--output_dir"
        )
    refused = [n for n in changes if n not in allowed]
    if refused:
        raise UserError(
            f"--resume: {listing(refused)} differs from {checkpoint} and would change the run; "
            f"pass the old value, or --allow_changed {','.join(refused)} to continue with the "
            "new one"
        )
    return changes


def load_optimizer_state(run: Run, optimizer, scheduler, state: dict[str, Any]) -> None:
    """The optimizer and scheduler as saved. ``load_state_dict`` keeps the saved learning rates
    and weight decay; when ``--allow_changed`` let one of :data:`OPTIMIZER_SETTINGS` change,
    the values the new settings gave (the freshly built optimizer's) replace them, and the
    current learning rate is recomputed from the new schedule at the resumed step."""
    fresh_lrs = list(scheduler.base_lrs)
    fresh_decay = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    changed = run.config["computed"].get("resumed", {}).get("changed", {})
    if not changed.keys() & OPTIMIZER_SETTINGS:
        return
    scheduler.base_lrs = fresh_lrs
    groups = optimizer.param_groups
    for group, base, decay, factor in zip(
        groups, fresh_lrs, fresh_decay, scheduler.lr_lambdas, strict=True
    ):
        group["initial_lr"] = base
        group["weight_decay"] = decay
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def warn_if_launched_as_one_cpu_process(accelerator) -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process whatever N is: accelerate
    (1.15) starts several CPU processes only through MPI (``--mpirun_hostfile``). Its launcher still sets
    ``MASTER_ADDR`` for the N processes asked for, which is how the mismatch shows here."""
    if (
        accelerator.num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        and "MASTER_ADDR" in os.environ
    ):
        print(
            "warning: running as 1 process (`accelerate launch --cpu` starts one without MPI); "
            "for several CPU processes use `CUDA_VISIBLE_DEVICES= accelerate launch "
            "--config_file configs/accelerate/cpu_2proc.yaml ...` or `torchrun "
            "--nproc_per_node N ...`",
            file=sys.stderr,
        )


def refuse_sharded_training(accelerator) -> None:
    """FSDP / DeepSpeed shard the weights; these scripts save, generate and validate on single
    processes, which would hang or save one shard. Refuse at once rather than part-way."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED"):
        raise UserError(
            f"{kind} is not supported by these scripts yet (they save and generate on single "
            "processes); use DDP (configs/accelerate/multi_gpu.yaml) with a 4-bit base per GPU"
        )


def resolve_quantization(quantization: str) -> str:
    if quantization == "auto":
        return "4bit" if torch.cuda.is_available() else "none"
    return quantization


def load_policy(model_args: ModelArgs, run: Run | None = None, resume_from: Path | None = None):
    """The base model with a trainable adapter: a resumed checkpoint, ``--init_adapter``, or fresh."""
    from coderl.models import add_adapter, load_model

    quantization = resolve_quantization(model_args.quantization)
    source = resume_from or (Path(model_args.init_adapter) if model_args.init_adapter else None)
    if source is not None:
        model, tokenizer = load_model(
            str(source),
            quantization=quantization,
            dtype=model_args.dtype,
            trainable_adapter=True,
            base_model=model_args.model,
        )
    else:
        model, tokenizer = load_model(
            model_args.model, quantization=quantization, dtype=model_args.dtype
        )
        targets: list[str] | str = model_args.target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        model = add_adapter(
            model,
            adapter_type=model_args.adapter,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=targets,
            tinylora_u=model_args.tinylora_u,
            tinylora_r=model_args.tinylora_r,
            tinylora_weight_tying=model_args.tinylora_weight_tying,
        )
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def build_optimizer(params, train_args: TrainArgs):
    """AdamW + the chosen schedule (warm-up, then constant / linear / cosine to max_steps)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay
    )
    scheduler = get_scheduler(
        train_args.lr_scheduler
        if train_args.lr_scheduler != "constant"
        else "constant_with_warmup",
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_steps,
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------- data position


class TaskStream:
    """An endless, seeded stream of task indices: shuffled epochs, resumable by position."""

    def __init__(self, num_tasks: int, seed: int, shuffle: bool = True):
        if num_tasks < 1:
            raise UserError("no training tasks")
        self.num_tasks = num_tasks
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_tasks))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.num_tasks)
            out.append(self._epoch_order(epoch)[offset])
            self.position += 1
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.num_tasks


# --------------------------------------------------------------------------- sequences


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_entropy: bool = False
):
    """log p(x_t | x_<t) for t = 1..T-1 (shape B x T-1): logits shifted before gathering.

    With ``return_entropy`` also the entropy of each next-token distribution (B x T-1).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :].float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    logprobs = logprobs_all.gather(-1, targets).squeeze(-1)
    if not return_entropy:
        return logprobs
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return logprobs, entropy


class MaskedLogprobs(NamedTuple):
    """What :func:`masked_token_logprobs` returns: one entry per masked token, row-major."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None  # of each masked position's next-token distribution
    hidden: torch.Tensor | None = None  # the last hidden state, B x T x H, every position


def masked_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_hidden: bool = False,
) -> MaskedLogprobs:
    """log p_T(x_t | x_<t) of the tokens where ``mask`` (B x T-1, as :func:`token_logprobs`;
    None: every position) is 1, under logits divided by ``temperature``.

    The same numbers as ``token_logprobs(...)[mask.bool()]``, for less: the output head runs only
    from the first column any row needs (``logits_to_keep``; the prompt, most of each row, needs
    none), and only the masked positions are upcast to float32 and normalised over the
    vocabulary. The model always runs, even when nothing is masked, so every process does the
    same passes and a loss built on the result can always be backpropagated.
    """
    width = input_ids.shape[1]
    needed = (all_positions(input_ids) if mask is None else mask).bool()
    columns = needed.any(dim=0).nonzero()
    first = int(columns[0]) if len(columns) else width - 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if return_hidden:
        inputs["output_hidden_states"] = True
    try:
        output = model(**inputs, logits_to_keep=width - first)
        logits = output.logits
    except TypeError:  # a model whose forward has no logits_to_keep
        output = model(**inputs)
        logits = output.logits[:, first:]
    needed = needed[:, first:]
    selected = logits[:, :-1][needed].float()  # (tokens, vocabulary)
    if temperature != 1.0:
        selected = selected / temperature
    logprobs_all = torch.log_softmax(selected, dim=-1)
    targets = input_ids[:, first + 1 :][needed]
    logprobs = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1) if return_entropy else None
    hidden = output.hidden_states[-1] if return_hidden else None
    return MaskedLogprobs(logprobs, entropy, hidden)


def all_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """A B x T-1 mask of ones: every next-token position of ``input_ids``."""
    batch, width = input_ids.shape
    return torch.ones((batch, width - 1), dtype=torch.float32, device=input_ids.device)


def spread_over_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The flat ``values`` of :func:`masked_token_logprobs` back in their B x T-1 places, zero
    where ``mask`` is 0 (a loss that multiplies by the mask sees the same numbers)."""
    out = values.new_zeros(mask.shape)
    out[mask.bool()] = values
    return out


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion`` batches, ids concatenated (never re-tokenized).

    Returns ``input_ids``, ``attention_mask`` (B x T) and ``completion_mask`` (B x T-1), the latter
    aligned with :func:`token_logprobs`: position t-1 is 1 where token t belongs to the completion.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    comp_mask = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, p) in enumerate(zip(rows, prompt_ids, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        comp_mask[i, len(p) - 1 : len(row) - 1] = 1.0
    if device is not None:
        input_ids, attention, comp_mask = (
            input_ids.to(device),
            attention.to(device),
            comp_mask.to(device),
        )
    return input_ids, attention, comp_mask


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One sampled completion with its verdict and reward."""

    task_index: int
    sample_index: int
    task: dict
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    code: str
    num_tokens: int
    truncated: bool
    result: Any
    reward: float = 0.0
    mask: bool = True  # False: infra_error, left out of the loss

    def log_row(self) -> dict:
        return {
            "task_id": self.task["task_id"],
            "sample": self.sample_index,
            "reward": self.reward,
            "status": self.result.status,
            "passed": self.result.passed,
            "num_tokens": self.num_tokens,
            "truncated": self.truncated,
            "completion": self.text,
        }


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids exactly as generation encodes them (shared with SFT)."""
    from coderl.models import encode_prompt

    return list(encode_prompt(tokenizer, prompt))


def action_ids(completion) -> list[int]:
    """The sampled tokens the policy is credited with: the kept ids, plus the end token when the
    sample ended by emitting one (stopping is an action too), the very id it sampled: a chat
    model's ``<|im_end|>`` is not its EOS. Always a prefix of the ids the row sampled."""
    ids = list(completion.token_ids)
    if completion.end_id is not None:
        ids.append(completion.end_id)
    if ids != list(completion.sampled_ids[: len(ids)]):
        raise RuntimeError("internal error: the ids to train on are not the ids sampled")
    return ids


def collect_rollouts(
    model,
    tokenizer,
    tasks: Sequence[dict],
    sampling,
    sandbox,
    reward_args: RewardArgs,
    seed: int,
    chunk_tasks: int | None = None,
) -> list[Rollout]:
    """Sample ``sampling.n`` completions per task, score them, compute rewards.

    Generation runs in chunks of tasks; each chunk is scored in the sandbox while the next one
    generates, so the two overlap without going off-policy.
    """
    from coderl.generation import completion_for_sandbox, generate, render_prompt

    chunk_tasks = chunk_tasks or max(1, len(tasks) // 2)
    was_training = model.training
    model.eval()
    pending: list[tuple[Any, list[Rollout]]] = []
    with torch.no_grad():
        for start in range(0, len(tasks), chunk_tasks):
            part = list(tasks[start : start + chunk_tasks])
            completions = generate(model, tokenizer, part, sampling, seed=seed + start)
            rollouts = []
            for c in completions:
                task = part[c.task_index]
                prompt = render_prompt(task, tokenizer, sampling.prompt_mode)
                code = completion_for_sandbox(task, prompt, c.text, sampling.prompt_mode)
                rollouts.append(
                    Rollout(
                        task_index=start + c.task_index,
                        sample_index=c.sample_index,
                        task=task,
                        prompt_ids=prompt_token_ids(tokenizer, prompt),
                        completion_ids=action_ids(c),
                        text=c.text,
                        code=code,
                        num_tokens=c.num_tokens,
                        truncated=c.truncated,
                        result=None,
                    )
                )
            future = sandbox.submit_batch([(r.task, r.code) for r in rollouts])
            pending.append((future, rollouts))
    if was_training:
        model.train()
    out: list[Rollout] = []
    for future, rollouts in pending:
        for r, result in zip(rollouts, future.result(), strict=True):
            r.result = result
        out.extend(rollouts)
    rewards, mask = compute_rewards(
        [Scored(task=r.task, code=r.code, num_tokens=r.num_tokens, result=r.result) for r in out],
        reward_args,
    )
    for r, reward, m in zip(out, rewards, mask, strict=True):
        r.reward, r.mask = reward, m
    return out


def rollout_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """``rollout/`` metrics: reward, pass rate, length, verdict fractions."""
    n = len(rollouts)
    kept = [r for r in rollouts if r.mask]
    metrics = {
        "rollout/reward_mean": sum(r.reward for r in kept) / max(len(kept), 1),
        "rollout/pass_rate": sum(r.result.passed for r in rollouts) / n,
        "rollout/completion_tokens": sum(r.num_tokens for r in rollouts) / n,
        "rollout/truncated_frac": sum(r.truncated for r in rollouts) / n,
        "rollout/infra_error_frac": 1 - len(kept) / n,
    }
    if len(kept) > 1:
        mean = metrics["rollout/reward_mean"]
        metrics["rollout/reward_std"] = (
            sum((r.reward - mean) ** 2 for r in kept) / (len(kept) - 1)
        ) ** 0.5
    compiled = [r.result.compiled for r in rollouts if r.result.compiled is not None]
    if compiled:
        metrics["rollout/compile_rate"] = sum(compiled) / len(compiled)
    return metrics


# --------------------------------------------------------------------------- validation


def validate(
    model,
    tokenizer,
    tasks: Sequence[dict],
    sandbox,
    max_new_tokens: int,
    prompt_mode: str = "base",
    batch_size: int = 8,
) -> dict[str, float]:
    """Greedy pass@1 on held-out tasks (``eval/`` metrics)."""
    from coderl.generation import SamplingConfig, completion_for_sandbox, generate, render_prompt

    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        n=1,
        batch_size=batch_size,
        prompt_mode=prompt_mode,
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        completions = generate(model, tokenizer, list(tasks), cfg, seed=0)
    if was_training:
        model.train()
    jobs = []
    for c in completions:
        task = tasks[c.task_index]
        prompt = render_prompt(task, tokenizer, prompt_mode)
        jobs.append((task, completion_for_sandbox(task, prompt, c.text, prompt_mode)))
    results = sandbox.run_batch(jobs)
    n = len(results)
    return {
        "eval/pass@1": sum(r.passed for r in results) / n,
        "eval/completion_tokens": sum(c.num_tokens for c in completions) / n,
        "eval/num_tasks": n,
    }


# --------------------------------------------------------------------------- checkpoints


def save(
    run: Run,
    step: int,
    model,
    trainer_state: dict[str, Any],
    metrics: dict[str, Any],
    keep_last: int,
) -> Path | None:
    """Checkpoint from the main process only (other processes wait).

    Under DDP every process first compares its trainable values with the main process's; the
    result goes to ``meta.json`` as ``replicas`` (see :func:`replica_agreement`).
    """
    run.accelerator.wait_for_everyone()
    meta: dict[str, Any] = {"args": run.config, "metrics": metrics}
    replicas = replica_agreement(run.accelerator, model)
    if replicas is not None:
        meta["replicas"] = replicas
        if replicas["max_abs_diff"] > 0:
            run.print(
                f"warning: step {step}: the {replicas['processes']} processes hold different "
                f"adapter values (largest difference {replicas['max_abs_diff']:.3g})"
            )
    path = None
    if run.is_main:
        unwrapped = run.accelerator.unwrap_model(model)
        path = save_checkpoint(
            run.output_dir, step, unwrapped, trainer_state, meta, keep_last=keep_last
        )
    run.accelerator.wait_for_everyone()
    return path


def replica_agreement(accelerator, model) -> dict[str, Any] | None:
    """Do the DDP replicas hold the same trainable values? None unless ``model`` is DDP-wrapped
    (one process, or FSDP / DeepSpeed, whose processes hold different shards by design).

    DDP keeps replicas equal only if every process applies the same averaged gradient to every
    trainable tensor; a tensor DDP does not see (made trainable after wrapping) or a process that
    skips a step makes them drift apart silently. Every process receives the main process's
    values and measures its largest difference from them; ``max_abs_diff`` is the largest over
    processes (0.0 when all agree) and ``checksums`` each process's sum of its values, in
    process order. Costs one broadcast of the trainable values (small for adapters).
    """
    from accelerate.utils import broadcast

    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    values = torch.cat(
        [p.detach().reshape(-1).float() for p in trainable_parameters(model)]
        or [torch.zeros(0, device=accelerator.device)]
    )
    reference = broadcast(values.clone(), from_process=0)
    largest = (values - reference).abs().max() if values.numel() else values.new_zeros(())
    local = torch.stack([largest.double(), values.double().sum()]).unsqueeze(0)
    per_process = accelerator.gather(local).cpu()  # processes x 2
    return {
        "processes": per_process.shape[0],
        "max_abs_diff": float(per_process[:, 0].max()),
        "checksums": [float(c) for c in per_process[:, 1]],
    }


def finish(run: Run, last_checkpoint: Path | None) -> None:
    """Export the last checkpoint's adapter to ``<output_dir>/final`` and close the logs."""
    if run.is_main and last_checkpoint is not None:
        final = export_final(run.output_dir, last_checkpoint)
        run.print(f"adapter: {final}")
    run.logger.close()


def restore(resume_from: Path | None) -> dict[str, Any] | None:
    """Trainer state of a checkpoint (restores the RNG as a side effect), or None."""
    if resume_from is None:
        return None
    return load_trainer_state(resume_from)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str))
