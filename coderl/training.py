"""Plumbing shared by the training scripts: the options every one takes (model and adapter,
run, logging, validation, checkpoints), the policy with its trainable adapter, the optimizer and
its schedule, gradient clipping by parameter group, and the seeded stream of training tasks.

No algorithm lives here: advantages and losses are written out in each ``train_*.py``; the run
itself is coderl/run.py, rollouts coderl/rollouts.py, log-probs coderl/logprobs.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coderl.cli import SEED_RANGE
from coderl.errors import UserError

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
            "help": "Weights dtype; adapters stay float32 (auto: bf16 on CUDA, fp32 on CPU: on a "
            "CPU with AMX-bf16, bf16 weights made an SFT step ~15%% faster but generation with an "
            "adapter slower, as the adapter folds only into fp32 weights; README, Speed).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    adapter: str = field(
        default="lora",
        metadata={
            "help": "Trainable adapter: lora, qlora (LoRA on a 4-bit NF4 base), or tinylora "
            "(peft TinyLoraConfig: --tinylora_u shared scalars, kept in float32).",
            "choices": ["lora", "qlora", "tinylora"],
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
        default=25,
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
    if model_args.adapter == "qlora" and model_args.quantization in ("none", "8bit"):
        raise UserError("--adapter qlora needs a 4-bit base (--quantization 4bit or auto)")


def resolve_quantization(quantization: str) -> str:
    if quantization == "auto":
        return "4bit" if torch.cuda.is_available() else "none"
    return quantization


def load_policy(model_args: ModelArgs, resume_from: Path | None = None):
    """The base model with a trainable adapter: a resumed checkpoint, ``--init_adapter``, or fresh."""
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    quantization = (
        "4bit" if model_args.adapter == "qlora" else resolve_quantization(model_args.quantization)
    )
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


def clip_each_group(optimizer, max_grad_norm: float) -> dict[str, float]:
    """Clip each parameter group's gradients apart, each to ``max_grad_norm`` (0: no clipping),
    so that one group's large gradient (a fresh value head's) does not scale another's step down.
    Returns each group's norm before clipping (``train/grad_norm_<group name>``) and their
    combined norm (``train/grad_norm``)."""
    limit = max_grad_norm or float("inf")
    norms = {}
    for index, group in enumerate(optimizer.param_groups):
        norm = torch.nn.utils.clip_grad_norm_(group["params"], limit)
        norms[f"train/grad_norm_{group.get('name', index)}"] = float(norm)
    norms["train/grad_norm"] = math.hypot(*norms.values())
    return norms


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
