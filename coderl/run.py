"""One training run's plumbing: the accelerator, logs and resume point, the checks a resume makes
(settings that would change the run, intact checkpoints), checkpoints written from the main
process, and the final export. Every training script starts with :func:`start_run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coderl.checkpoint import (
    checkpoint_folders,
    clean_leftovers,
    export_final,
    load_trainer_state,
    resumable_checkpoint,
    save_checkpoint,
)
from coderl.cli import seed_everything
from coderl.errors import UserError
from coderl.runlog import RunLogger
from coderl.training import TrainArgs, trainable_parameters


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
    """Do the processes' replicas hold the same trainable values? None for one process (FSDP and
    DeepSpeed, whose processes hold different shards by design, are refused at start).

    Replicas stay equal only if every process applies the same averaged gradient to every
    trainable tensor (DDP's, or the RL loop's explicit average); a tensor DDP does not see (made
    trainable after wrapping) or a process that skips a step makes them drift apart silently. Every process receives the main process's
    values and measures its largest difference from them; ``max_abs_diff`` is the largest over
    processes (0.0 when all agree) and ``checksums`` each process's sum of its values, in
    process order. Costs one broadcast of the trainable values (small for adapters).
    """
    from accelerate.utils import broadcast

    if accelerator.num_processes == 1:
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


def record_computed(run: Run, computed: dict[str, Any]) -> None:
    """Add values computed after parsing to the run's config (``config.json`` and every later
    checkpoint's ``meta.json``), and print the plain ones."""
    run.config["computed"].update(computed)
    if run.is_main:
        write_json(run.run_dir / "config.json", run.config)
    plain = [f"{k}={v}" for k, v in computed.items() if not isinstance(v, dict)]
    run.print("computed: " + ", ".join(plain))


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str))
