"""The run loop every RL trainer shares: options for what is sampled, and :class:`RLLoop`, which
does the plumbing around an algorithm's update so that a trainer's ``main`` reads as the
algorithm (rollouts, advantages, loss, update)::

    with RLLoop.start("grpo", opts.model, opts.train, opts.rollout, opts.reward, options) as loop:
        optimizer, scheduler = build_optimizer(trainable_parameters(loop.policy), opts.train)
        state = loop.attach(loop.policy, optimizer, scheduler)   # resumes when asked
        for step in loop.steps():
            rollouts = loop.rollouts(step)                        # this process's share, scored
            ...advantages, loss, backward...
            loop.reduce_gradients(params)                         # average over processes
            optimizer.step()
            loop.end_step(step, metrics, rollouts, state={...})   # log, validate, checkpoint
        loop.finish()

What the loop decides, the same for every algorithm:

* **Batch and processes.** ``--batch_size`` is the number of prompts per step over all
  processes; with P processes (``accelerate launch``, ``torchrun``) every process reads the same
  seeded task order and takes its contiguous ``batch_size / P`` share. Gradients are averaged over
  processes after the algorithm's backward passes (as DDP would; each process normalises its loss
  over its own share), so every process applies the same update and the replicas stay equal
  (checked at every checkpoint, ``replicas`` in ``meta.json``). Batch statistics an algorithm
  computes (a batch-mean baseline, whitening, a batch std) are per process.
* **Seeds.** Sample ``s`` of the step's ``i``-th prompt is seeded from (seed, step, draw, i, s):
  the same completions whatever the process count or the scoring chunks (up to float rounding).
* **Generation** runs with the adapter folded into a float32 copy of each adapted weight
  (``--merge_for_generation``), scoring overlaps generation with ``--score_chunk_tasks``.
* **Validation** (greedy, main process only, ``eval/`` metrics and ``eval-step<N>.json``): every
  ``--eval_every`` steps and always at the last step, before its checkpoint (so what a resume
  keeps was logged at or before its step); ``--eval_at_start`` adds step 0.
* **Logs**: ``rollout/`` metrics over every process's samples, the algorithm's ``train/`` metrics
  averaged over processes, ``time/generate``, ``time/score`` (scoring not hidden behind
  generation), ``time/update``, ``time/step``, ``train/lr``, ``train/epoch``; every sampled
  completion to ``samples.jsonl``; a progress bar.
* **Checkpoints** every ``--save_every`` steps and at the end: adapter (or whatever module the
  algorithm attached), optimizer, scheduler, data position and the algorithm's own state.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coderl.cli import derive_seed
from coderl.errors import UserError
from coderl.models import disable_dropout
from coderl.rewards import RewardArgs, resolve_reward
from coderl.rollouts import (
    Rollout,
    TimedSandbox,
    adapter_folded,
    collect_rollouts,
    evaluate,
    make_sandbox,
    results_table,
    rollout_metrics,
)
from coderl.run import (
    finish,
    load_optimizer_state,
    record_computed,
    restore,
    save,
    start_run,
    write_json,
)
from coderl.training import (
    ModelArgs,
    TaskStream,
    TrainArgs,
    count_trainable,
    load_policy,
    validate_common,
)


@dataclass
class RLModelArgs(ModelArgs):
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LoRA dropout written into a fresh adapter's config. RL updates run with "
            "every dropout module off (an --init_adapter's too): the policy differentiated is "
            "the one that sampled.",
            "range": "[0, 1)",
        },
    )


@dataclass
class RolloutArgs:
    """What every RL trainer samples and how: the task file, prompts per step, samples per prompt,
    decoding and scoring. Trainers subclass it to change defaults."""

    train_file: str = field(
        default="data/humaneval_train.jsonl",
        metadata={"help": "Training tasks (JSONL in the task schema)."},
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "Prompts per step, over all processes (each process takes an equal share).",
            "range": "[1, inf)",
        },
    )
    num_generations: int = field(
        default=4, metadata={"help": "Completions sampled per prompt.", "range": "[1, inf)"}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation budget per completion.", "range": "[1, inf)"}
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; the loss's log-probs use the same tempered policy.",
            "range": "(0, inf)",
        },
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling threshold (not corrected for).", "range": "(0, 1]"},
    )
    prompt_mode: str = field(
        default="base",
        metadata={
            "help": "base: continue the prompt, cut at stop sequences; instruct: chat template, "
            "code from the first fenced block.",
            "choices": ["base", "instruct"],
        },
    )
    generation_batch_size: int = field(
        default=32, metadata={"help": "Sequences per generate call.", "range": "[1, inf)"}
    )
    score_chunk_tasks: int = field(
        default=0,
        metadata={
            "help": "Prompts per generation chunk, scored while the next chunk generates (0 = "
            "one chunk: generate everything, then score).",
            "range": "[0, inf)",
        },
    )
    micro_batch_size: int = field(
        default=8,
        metadata={
            "help": "Sequences per forward/backward pass of the update (gradients accumulate).",
            "range": "[1, inf)",
        },
    )
    share_prompt_forward: bool = field(
        default=True,
        metadata={
            "help": "In the update, run each distinct prompt once per micro-batch and its "
            "completions on its keys/values (the same numbers as one pass per row)."
        },
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "In the update, pack a micro-batch's rows into one sequence without padding "
            "(padded passes where the model or gradient checkpointing does not allow it)."
        },
    )
    merge_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Generate with the adapter folded into a float32 copy of each adapted weight "
            "(the originals are untouched; skipped for quantized or half-precision bases)."
        },
    )
    eval_at_start: bool = field(
        default=False,
        metadata={"help": "Also validate before the first step (logged at step 0)."},
    )

    def logprob_options(self) -> dict[str, bool]:
        """Computed after parsing: how the update computes log-probs (coderl.logprobs)."""
        return {"share_prompts": self.share_prompt_forward, "padding_free": self.padding_free}

    def sampling(self):
        """Computed after parsing: the sampling configuration of the rollouts."""
        from coderl.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.num_generations,
            batch_size=self.generation_batch_size,
            prompt_mode=self.prompt_mode,
        )


def load_task_files(train_file: str, train_args: TrainArgs, run) -> tuple[list, list]:
    """Training tasks and the first ``--eval_tasks`` validation tasks (a warning names any id the
    two share: eval/ metrics would not be held out)."""
    from coderl.tasks import load_tasks

    train_tasks = load_tasks(train_file)
    eval_tasks = (
        load_tasks(train_args.eval_file)[: train_args.eval_tasks] if train_args.eval_file else []
    )
    overlap = {t["task_id"] for t in train_tasks} & {t["task_id"] for t in eval_tasks}
    if overlap:
        run.print(
            f"warning: {len(overlap)} validation task ids are also training tasks; "
            "eval/ metrics are not held-out"
        )
    return train_tasks, eval_tasks


def advantage_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Mean and std of the advantages of the rollouts in the loss (those the algorithm gave one)."""
    values = [r.advantage for r in rollouts if r.in_loss and r.advantage is not None]
    if not values:
        return {}
    mean = sum(values) / len(values)
    std = (
        (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        if len(values) > 1
        else 0.0
    )
    return {"train/advantage_mean": mean, "train/advantage_std": std}


class Processes:
    """The collective operations an algorithm needs when P processes share a step (under
    ``accelerate launch`` or ``torchrun``); with one process (no accelerator, or P = 1) each is
    the identity."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes (a parameter without a gradient
        counts as zero); nothing to do for one process."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def optimizer_step(self, optimizer, params: Sequence[torch.nn.Parameter], max_norm: float):
        """Average the gradients over processes, clip their norm to ``max_norm`` (0: no
        clipping) and step; returns the norm before clipping."""
        self.reduce_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        optimizer.step()
        return float(norm)

    def total(self, value: float) -> float:
        """The sum of ``value`` over processes."""
        return self._reduce([value], "sum")[0]

    def largest(self, value: int) -> int:
        """The largest ``value`` over processes."""
        if self.world == 1:
            return value
        from accelerate.utils import gather

        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return int(gather(tensor).max())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over processes."""
        keys = sorted(values)
        return dict(zip(keys, self._reduce([values[k] for k in keys], "mean"), strict=True))

    def _reduce(self, values: list[float], reduction: str) -> list[float]:
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction=reduction).tolist()

    def kept_reward_mean(self, rollouts: Sequence[Rollout]) -> float | None:
        """The mean reward of every process's scored (not ``infra_error``) rollouts; None if none."""
        count = self.total(float(sum(r.mask for r in rollouts)))
        return (
            self.total(float(sum(r.reward for r in rollouts if r.mask))) / count if count else None
        )

    def gather(self, items: list) -> list:
        """Every process's items, in process order."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return list(gather_object(items))


class RLLoop:
    """One RL run: its options, tasks, policy, sandbox, data stream, logs and checkpoints.

    A context manager: leaving it closes the progress bar and the sandbox, whatever happened.
    """

    def __init__(
        self,
        algorithm: str,
        run,
        train_args: TrainArgs,
        rollout_args: RolloutArgs,
        reward_args: RewardArgs,
        tasks: list[dict],
        eval_tasks: list[dict],
        policy,
        tokenizer,
        sandbox,
    ):
        self.algorithm = algorithm
        self.run = run
        self.train_args = train_args
        self.args = rollout_args
        self.reward_args = reward_args
        self.tasks, self.eval_tasks = tasks, eval_tasks
        self.policy, self.tokenizer = policy, tokenizer
        self.sandbox = TimedSandbox(sandbox)
        self.processes = Processes(run.accelerator)
        self.rank, self.world = self.processes.rank, self.processes.world
        self.sampling = rollout_args.sampling()
        self.stream = TaskStream(len(tasks), seed=train_args.seed)
        self.model = policy  # what checkpoints save (see attach)
        self.optimizer = self.scheduler = None
        self.start_step = 0
        self.last_checkpoint = run.resume_from  # what finish() exports if no step runs
        self.bar = None
        self.times: dict[str, float] = {}

    @classmethod
    def start(
        cls,
        algorithm: str,
        model_args: ModelArgs,
        train_args: TrainArgs,
        rollout_args: RolloutArgs,
        reward_args: RewardArgs,
        options: Sequence[Any],
    ) -> RLLoop:
        """Start a run from its parsed options: the accelerator and logs (resuming when asked),
        the task files (a bad one fails before any model is loaded), the policy with every
        dropout module off, and the sandbox."""
        validate_common(model_args, train_args)
        run = start_run(train_args, options)
        processes = run.accelerator.num_processes
        if rollout_args.batch_size % processes:
            raise UserError(
                f"--batch_size {rollout_args.batch_size} must be a multiple of the "
                f"{processes} processes"
            )
        tasks, eval_tasks = load_task_files(rollout_args.train_file, train_args, run)
        reward_args = resolve_reward(reward_args, tasks)
        policy, tokenizer = load_policy(model_args, run.resume_from)
        run.print(f"dropout modules disabled: {disable_dropout(policy)}")
        sandbox = make_sandbox(train_args)
        return cls(
            algorithm, run, train_args, rollout_args, reward_args, tasks, eval_tasks, policy,
            tokenizer, sandbox,
        )  # fmt: skip

    # ----------------------------------------------------------------------- set-up

    def __enter__(self) -> RLLoop:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        self.sandbox.close()

    def record(self, **computed: Any) -> None:
        """Values computed after parsing, added to ``config.json`` (and every checkpoint)."""
        record_computed(self.run, computed)

    def attach(self, model, optimizer, scheduler) -> dict[str, Any]:
        """Register what checkpoints save: ``model`` (the policy, or a module holding it, e.g. with
        a value head; its ``save_pretrained`` writes the checkpoint's weights), the optimizer and
        the scheduler. With ``--resume`` they are restored from the checkpoint (the RNG too: call
        this after every random initialisation), and the checkpoint's trainer state is returned
        for the algorithm to take its own entries from; ``{}`` for a fresh run."""
        from coderl.models import describe_model

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.record(
            reward=self.reward_args.reward,
            trainable_params=count_trainable(model),
            model=describe_model(self.policy),
            prompts_per_process=self.args.batch_size // self.world,
        )
        state = restore(self.run.resume_from)
        if state is None:
            return {}
        load_optimizer_state(self.run, optimizer, scheduler, state)
        self.stream.position = state["data_position"]
        self.start_step = state["step"]
        self.run.print(f"resumed from {self.run.resume_from} at step {self.start_step}")
        return state

    # ----------------------------------------------------------------------- one step

    def steps(self) -> Iterator[int]:
        """The steps left to run (after a resume, from the checkpoint's step on)."""
        from tqdm.auto import tqdm

        total = self.train_args.max_steps
        self.bar = tqdm(
            total=total, initial=self.start_step, desc=self.algorithm, disable=not self.run.is_main
        )
        if self.eval_tasks and self.args.eval_at_start and self.start_step == 0:
            self.run.logger.log(self.validate(0), 0)
        for step in range(self.start_step + 1, total + 1):
            self.begin_step()
            yield step

    def begin_step(self) -> None:
        """Start a step's clock (:meth:`steps` does it for every step)."""
        now = time.perf_counter()
        self.times = {"start": now, "rollouts_end": now, "generate": 0.0, "score": 0.0}

    def step_times(self) -> dict[str, float]:
        """The ``time/`` metrics of the step so far: generation, scoring not hidden behind it,
        everything after the last rollouts (the update), the whole step."""
        now = time.perf_counter()
        return {
            "time/generate": self.times["generate"],
            "time/score": self.times["score"],
            "time/update": now - self.times["rollouts_end"],
            "time/step": now - self.times["start"],
        }

    def rollouts(
        self, step: int, prompts: int | None = None, draw: int = 0, keep: int | None = None
    ) -> list[Rollout]:
        """Take ``prompts`` (default ``--batch_size``) prompts from the task stream, which every
        process reads alike, and sample and score this process's share of them (its first
        ``keep`` only, when given). ``draw`` numbers the draws of one step (0 first)."""
        count = prompts or self.args.batch_size
        indices = self.stream.take(count)
        share = count // self.world
        first = self.rank * share
        mine = indices[first : first + share][:keep]
        started = time.perf_counter()
        with adapter_folded(self.policy, self.args.merge_for_generation):
            rollouts = collect_rollouts(
                self.policy,
                self.tokenizer,
                [self.tasks[i] for i in mine],
                self.sampling,
                self.sandbox,
                self.reward_args,
                seed=derive_seed(self.train_args.seed, step, draw) % 2**31,
                first_index=first,
                chunk_tasks=self.args.score_chunk_tasks,
            )
        ended = time.perf_counter()
        handed_over = max(self.sandbox.last_submit, started)
        self.times["generate"] += handed_over - started
        self.times["score"] += ended - handed_over
        self.times["rollouts_end"] = ended
        return rollouts

    def end_step(
        self,
        step: int,
        metrics: dict[str, Any],
        drawn: Sequence[Rollout],
        state: dict[str, Any] | None = None,
    ) -> None:
        """Close one step: advance the schedule, then log (``metrics`` are this process's; the
        rollouts are gathered from every process), validate, and checkpoint with ``state`` (the
        algorithm's own, restored by :meth:`attach`)."""
        times = self.step_times()
        metrics = self.processes.mean(metrics)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        everyone = self.processes.gather(list(drawn))
        metrics = {**rollout_metrics(everyone), **advantage_metrics(everyone), **metrics}
        metrics.update({"train/epoch": self.stream.epoch, **times})
        last = step == self.train_args.max_steps
        every = self.train_args.eval_every
        if self.eval_tasks and (last or (every and step % every == 0)):
            metrics.update(self.validate(step))
        self.run.logger.log(metrics, step)
        self.run.logger.log_samples([r.log_row() for r in everyone], step)
        self.bar.update(1)
        self.bar.set_postfix(
            reward=f"{metrics['rollout/reward_mean']:.3f}",
            pass_rate=f"{metrics['rollout/pass_rate']:.2f}",
        )
        if step % self.train_args.save_every == 0 or last:
            trainer_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data_position": self.stream.position,
                **(state or {}),
            }
            self.last_checkpoint = save(
                self.run, step, self.model, trainer_state, metrics, self.train_args.keep_last
            )

    # ----------------------------------------------------------------------- validation, end

    def validate(self, step: int) -> dict[str, float]:
        """Greedy validation on the held-out tasks, on the main process (the others wait and
        return ``{}``); the per-task rows go to ``eval-step<step>.json`` in the run folder."""
        metrics: dict[str, float] = {}
        if self.run.is_main:
            with adapter_folded(self.policy, self.args.merge_for_generation):
                metrics, rows = evaluate(
                    self.policy,
                    self.tokenizer,
                    self.eval_tasks,
                    self.sandbox,
                    self.train_args.eval_max_new_tokens,
                    self.args.prompt_mode,
                    self.args.generation_batch_size,
                )
            line = f"step {step}: eval/pass@1 = {metrics['eval/pass@1']:.3f}"
            line += f", avg_score = {metrics['eval/avg_score']:.3f}"
            if "eval/compile_rate" in metrics:
                line += f", compile_rate = {metrics['eval/compile_rate']:.3f}"
            self.run.print(f"{line} on {len(self.eval_tasks)} tasks")
            write_json(self.eval_file(step), {"metrics": metrics, "results": rows})
        self.run.accelerator.wait_for_everyone()
        return metrics

    def eval_file(self, step: int):
        return self.run.run_dir / f"eval-step{step}.json"

    def finish(self) -> None:
        """Export the last checkpoint to ``<output_dir>/final``, close the logs and, when the run
        validated, write ``final_eval.json`` (the first and the last validation) and print the
        comparison (the TinyLoRA seed's table)."""
        finish(self.run, self.last_checkpoint)
        last = self.eval_file(self.train_args.max_steps)
        if not (self.run.is_main and self.eval_tasks and last.is_file()):
            return
        first = self.eval_file(0)
        before = None
        if self.args.eval_at_start and first.is_file():
            before = json.loads(first.read_text())["metrics"]
        after = json.loads(last.read_text())["metrics"]
        write_json(self.run.output_dir / "final_eval.json", {"before": before, "after": after})
        print(results_table(before, after, self.algorithm.upper()))
