"""Seconds per GRPO step: this project's step (train_grpo_lora.py) against TRL's ``GRPOTrainer``.

Both run in this one process, on the same tiny local model, interleaved step by step (TRL's step,
then ours, inside TRL's training loop) so that a change in machine load hits both alike. Printed:
each side's median seconds per step after warm-up, the ratio ours / TRL, where the time goes, and
beside every step's time the peak RSS during it.

Matched settings (both sides):

* model: the tiny Llama of ``coderl.tiny_model`` (tokenizer trained with the toy tasks in its
  corpus), first fully fine-tuned for ``--pretrain_steps`` steps on 256 toy Python tasks, each
  target being the solution followed by a blank line and another task's function (as a base model
  continues a HumanEval prompt), so that some completions pass and groups have unequal rewards (a
  random model fails everything: every advantage is 0 and a step would measure nothing but
  generation); the same 256 tasks are the prompts; ``--model DIR`` instead, when it holds a
  model; weights and compute in ``--dtype`` (float32, or bfloat16 for both, no autocast), CPU,
  ``--threads`` torch threads;
* a fresh LoRA adapter, r=8, alpha=16, dropout 0, on every linear layer but the output head, the
  same initial weights (same seed);
* 8 prompts x 4 generations x exactly 64 new tokens: the end-of-sequence tokens are masked out of
  the logits by a hook on the output head (and TRL also gets ``min_new_tokens=64``), and our
  stop strings are switched off, so every completion is 64 tokens long;
* temperature 1, top-p 1, top-k off; ``loss_type="grpo"``, ``scale_rewards="group"``, beta 0 (no
  reference pass), epsilon 0.2, one iteration: ONE optimizer update per step; AdamW (torch,
  lr 1e-5, no weight decay), gradient clipping at 1.0, constant learning rate;
* the same HumanEval-shaped unit-test reward: the completion is cut at the first base-mode stop
  sequence (``coderl.generation.BASE_STOP_SEQUENCES``, as generation would have) and run with
  ``task["test"]`` and ``check(entry_point)`` in the same warm ``sandbox.Sandbox``; 1 if it
  passes, else 0;
* the whole step's 32 sequences in one forward/backward pass (TRL: per-device batch 32, no
  accumulation; ours: ``--micro_batch_size 32``).

Settings that differ, and why: TRL's defaults of gradient checkpointing and bf16 autocast are
turned off (ours uses neither; the weights' dtype is ``--dtype`` on both sides). Both generate the
32 sequences in one ``generate`` call with the KV cache (ours with its default
``--score_chunk_tasks 0``); ours folds the adapter into a copy of the weights while generating,
TRL runs peft's LoRA layers; ours samples each row from
its own seeded generator (``coderl.generation``: reproducible whatever the batch), TRL samples the
batch at once. Both compute entropies in the loss pass. In the update, ours runs each prompt once
for its 4 completions (the completions continue from the prompt's cached keys/values) where TRL
runs 32 full rows, and ours runs no forward/backward for rows whose advantage is exactly 0 (their
gradient is exactly 0) where TRL runs every row. ``--no_skip`` (in this benchmark only) makes ours
run every row too, to show how much of the difference that is; how many rows ours ran is printed
for every step.

Where the time goes: ours from ``time/generate`` (until the last chunk is handed to the sandbox),
``time/score`` (scoring left after generation ended) and ``time/update`` (forward/backward and the
optimizer); TRL's by wrapping its ``_generate`` (generation), the reward function (scoring) and the
rest of its step (log-prob forward/backward, optimizer, bookkeeping).

Peak RSS (``ru_maxrss``, ``bench/peak_rss.py``): before each side's step, freed memory is handed
back to the system and the high-water mark is reset, so each side's figure is the process's peak
during its own step. Both models stay resident, so that peak holds the other side's weights too;
the part above the step's starting RSS is that side's own working memory.

    python bench/bench_rl_step.py                      # 2 warm-up + 5 measured steps each
    python bench/bench_rl_step.py --steps 9 --threads 2 --output results/bench_rl_step.json
    python bench/bench_rl_step.py --model checkpoints/smollm2-135m-instruct --dtype bfloat16 \\
        --num_prompts 2 --num_generations 2 --max_new_tokens 32 --warmup 1 --steps 2
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
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
from coderl.errors import exit_on_user_error  # noqa: E402


@dataclass
class BenchArgs:
    steps: int = field(default=5, metadata={"help": "Measured steps per side (median reported)."})
    warmup: int = field(default=2, metadata={"help": "Warm-up steps per side, not measured."})
    num_prompts: int = field(default=8, metadata={"help": "Prompts per step."})
    num_generations: int = field(default=4, metadata={"help": "Completions per prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Exact completion length."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights and compute dtype, both sides.",
            "choices": ["float32", "bfloat16"],
        },
    )
    threads: int = field(
        default=1,
        metadata={
            "help": "torch threads for both sides (1 avoids spin-waiting on a shared machine)."
        },
    )
    sandbox_workers: int = field(default=2, metadata={"help": "Sandbox worker processes."})
    pretrain_steps: int = field(
        default=150,
        metadata={"help": "Full fine-tuning steps of the tiny model on toy tasks (0 = random)."},
    )
    model: str = field(
        default="",
        metadata={
            "help": "Model folder: used as it is when it holds a model, else the pre-trained tiny "
            "model is built there (and kept for the next run); empty = a temp folder."
        },
    )
    no_skip: bool = field(
        default=False,
        metadata={"help": "Make ours also run forward/backward on rows whose advantage is 0."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for model, adapters and sampling."})
    output: str = field(default="", metadata={"help": "Write the figures to this JSON file."})


# --------------------------------------------------------------------------- shared setup


# The TRL settings every benchmark shares: fp32 on CPU, no checkpoints, no reporting, no progress
# bar, a log line every step, the data loaded in this process.
TRL_CPU_QUIET = {
    "bf16": False,
    "fp16": False,
    "use_cpu": True,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


def toy_tasks(count: int, seed: int) -> list[dict]:
    from coderl.toy_tasks import generate_toy_python

    train, _ = generate_toy_python(n_train=max(count, 64), n_test=8, seed=seed)
    return train[:count]


def pretraining_examples(tok, tasks: list[dict], rng: random.Random) -> list[tuple[list[int], int]]:
    """prompt -> solution, then a blank line and another task's function: as a base model continues
    a HumanEval prompt, so a completion forced to 64 tokens holds a solution and then the start of
    the next ``def`` (where the reward cuts it) instead of noise."""
    from coderl.prompts import encode_prompt_and_completion

    examples = []
    for task in tasks:
        other = rng.choice(tasks)
        target = task["canonical_solution"] + "\n\n" + other["prompt"] + other["canonical_solution"]
        examples.append(encode_prompt_and_completion(tok, task["prompt"], target))
    return examples


def build_model(folder: Path, tasks: list[dict], pretrain_steps: int, seed: int) -> Path:
    """The tiny model, fully fine-tuned on the toy tasks for a few hundred steps."""
    from coderl.models import load_model
    from coderl.tiny_model import build_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "toy_tasks.txt"
    corpus.write_text("\n".join(t["prompt"] + t["canonical_solution"] for t in tasks))
    build_tiny_model(folder, corpus=[str(corpus)], seed=seed)
    if pretrain_steps <= 0:
        return folder
    model, tok = load_model(str(folder))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    started = time.perf_counter()
    examples: list[tuple[list[int], int]] = []
    for step in range(pretrain_steps):
        if step % 50 == 0:  # new pairings now and then
            examples = pretraining_examples(tok, tasks, rng)
        batch = rng.sample(examples, 16)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            attention[row, : len(ids)] = 1
        for group in optimizer.param_groups:  # linear decay keeps the last steps stable
            group["lr"] = 3e-3 * max(0.05, 1 - step / pretrain_steps)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    print(
        f"pre-trained the tiny model: {pretrain_steps} steps, final loss {float(loss):.3f}, "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    model.save_pretrained(folder)
    return folder


def suppress_end_tokens(model, end_ids: set[int]) -> None:
    """Every completion runs to max_new_tokens: the end tokens get -inf logits."""
    head = model.get_output_embeddings()
    blocked = torch.tensor(sorted(end_ids))

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., blocked] = float("-inf")
        return logits

    head.register_forward_hook(hook)


def cut_at_stop(text: str) -> str:
    from coderl.generation import BASE_STOP_SEQUENCES, truncate_at_stop

    return truncate_at_stop(text, BASE_STOP_SEQUENCES)[0]


class StopCuttingSandbox:
    """The shared reward for our side: cut the completion at the first stop, then the sandbox."""

    def __init__(self, sandbox):
        self.sandbox = sandbox

    def submit_batch(self, jobs):
        return self.sandbox.submit_batch([(task, cut_at_stop(code)) for task, code in jobs])

    def __getattr__(self, name):
        return getattr(self.sandbox, name)


def load_policy_model(model_dir: Path, seed: int, dtype: str):
    """Base + fresh LoRA r=8 on all linear layers, exactly as train_grpo_lora.py builds it."""
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    model, tokenizer = load_model(str(model_dir), quantization="none", dtype=dtype)
    torch.manual_seed(seed)  # identical initial adapter weights on both sides
    model = add_adapter(model, "lora", r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    return model, tokenizer


# --------------------------------------------------------------------------- this project


def build_ours(args: BenchArgs, model_dir: Path, tasks, sandbox, workdir: Path):
    """This project's side: the GRPO trainer's run loop around the benchmark's model and tasks."""
    from coderl.generation import end_token_ids
    from coderl.rewards import RewardArgs
    from coderl.rl_loop import RLLoop, RLModelArgs, RolloutArgs
    from coderl.run import start_run
    from coderl.training import TrainArgs, build_optimizer, trainable_parameters
    from train_grpo_lora import GRPOArgs, Options

    batch = args.num_prompts * args.num_generations
    opts = Options(
        RLModelArgs(model=str(model_dir), quantization="none", dtype=args.dtype),
        TrainArgs(
            output_dir=str(workdir / "ours"),
            logging_dir=str(workdir / "runs"),
            report_to="none",
            seed=args.seed,
            max_steps=args.warmup + args.steps,
            learning_rate=1e-5,
        ),
        RolloutArgs(
            batch_size=args.num_prompts,
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            generation_batch_size=batch,
            micro_batch_size=batch,
        ),
        GRPOArgs(loss_type="grpo", scale_rewards="group", beta=0.0, epsilon=0.2, num_iterations=1),
        RewardArgs(reward="unit_test"),
    )
    run = start_run(opts.train, (opts.model, opts.train, opts.rollout, opts.grpo, opts.reward))
    model, tokenizer = load_policy_model(model_dir, args.seed, args.dtype)
    suppress_end_tokens(model, end_token_ids(model, tokenizer))
    optimizer, _ = build_optimizer(trainable_parameters(model), opts.train)
    loop = RLLoop(
        "grpo", run, opts.train, opts.rollout, opts.reward, tasks, [], model, tokenizer,
        StopCuttingSandbox(sandbox),
    )  # fmt: skip
    loop.sampling = dataclasses.replace(loop.sampling, stop=())  # exactly max_new_tokens each
    return OurStep(loop, opts, optimizer)


@dataclass
class OurStep:
    """One GRPO step of train_grpo_lora.py, with its times and rollout metrics."""

    loop: object
    opts: object
    optimizer: object

    def step(self, step: int) -> dict:
        from coderl.rollouts import rollout_metrics
        from train_grpo_lora import grpo_step

        self.loop.begin_step()
        metrics, drawn = grpo_step(self.loop, self.opts, self.optimizer, step)
        return {**metrics, **rollout_metrics(drawn), **self.loop.step_times()}


@contextlib.contextmanager
def every_row_runs(enabled: bool):
    """``--no_skip``: give zero advantages a negligible nonzero value so every row is run."""
    import train_grpo_lora

    if not enabled:
        yield
        return
    original = train_grpo_lora.group_advantages

    def nudged(*a, **kw):
        adv = original(*a, **kw)
        return torch.where(adv == 0, torch.full_like(adv, 1e-12), adv)

    train_grpo_lora.group_advantages = nudged
    try:
        yield
    finally:
        train_grpo_lora.group_advantages = original


# --------------------------------------------------------------------------- TRL


@dataclass
class TrlTimes:
    generate: float = 0.0
    score: float = 0.0
    step_started: float = 0.0


def build_trl(args: BenchArgs, model_dir: Path, tasks, sandbox, workdir: Path, times: TrlTimes):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from coderl.generation import end_token_ids
    from coderl.prompts import render_prompt

    model, tokenizer = load_policy_model(model_dir, args.seed, args.dtype)
    suppress_end_tokens(model, end_token_ids(model, tokenizer))
    by_id = {t["task_id"]: t for t in tasks}

    def unit_test_reward(prompts, completions, task_id, **_):
        started = time.perf_counter()
        results = sandbox.run_batch(
            [(by_id[tid], cut_at_stop(text)) for tid, text in zip(task_id, completions)]
        )
        times.score += time.perf_counter() - started
        return [1.0 if r.passed else 0.0 for r in results]

    dataset = Dataset.from_list(
        [{"prompt": render_prompt(t, tokenizer, "base"), "task_id": t["task_id"]} for t in tasks]
    )
    batch = args.num_prompts * args.num_generations
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        max_steps=args.warmup + args.steps,
        gradient_checkpointing=False,
        **TRL_CPU_QUIET,
        log_completions=False,
        seed=args.seed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=unit_test_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    original_generate = trainer._generate

    def timed_generate(prompts):
        started = time.perf_counter()
        try:
            return original_generate(prompts)
        finally:
            times.generate += time.perf_counter() - started

    trainer._generate = timed_generate
    return trainer


# --------------------------------------------------------------------------- the race


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_record(start_rss: float) -> dict:
    """The RSS a side's step started from and the process's peak during it."""
    return {"start_rss_mib": start_rss, "peak_rss_mib": peak_rss_mib()}


def interleaved(args: BenchArgs, trainer, loop, trl_times: TrlTimes) -> dict:
    """Run TRL's training loop; after each of its steps, run one of ours."""
    from transformers import TrainerCallback

    records = {"trl": [], "ours": []}
    trl_start_rss = {"mib": 0.0}

    class Race(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            trl_start_rss["mib"] = start_rss_window()
            trl_times.generate = trl_times.score = 0.0
            trl_times.step_started = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            total = time.perf_counter() - trl_times.step_started
            records["trl"].append(
                {
                    "step": total,
                    "generate": trl_times.generate,
                    "score": trl_times.score,
                    "update": total - trl_times.generate - trl_times.score,
                    **rss_record(trl_start_rss["mib"]),
                }
            )
            step = len(records["ours"]) + 1
            start_rss = start_rss_window()
            with every_row_runs(args.no_skip):
                metrics = loop.step(step)
            records["ours"].append(
                {
                    "step": metrics["time/step"],
                    "generate": metrics["time/generate"],
                    "score": metrics["time/score"],
                    "update": metrics["time/update"],
                    "reward_mean": metrics["rollout/reward_mean"],
                    "completion_tokens": metrics["rollout/completion_tokens"],
                    "frac_reward_zero_std": metrics["rollout/frac_reward_zero_std"],
                    "forward_sequences": metrics["train/forward_sequences"],
                    **rss_record(start_rss),
                }
            )
            trl, ours = records["trl"][-1], records["ours"][-1]
            print(
                f"step {step}: TRL {total:.2f} s, peak RSS {trl['peak_rss_mib']:.0f} MiB; "
                f"ours {metrics['time/step']:.2f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
                f"(reward {metrics['rollout/reward_mean']:.2f}, "
                f"rows run {metrics['train/forward_sequences']})",
                file=sys.stderr,
            )

    trainer.add_callback(Race())
    trainer.train()
    trl_logs = [log for log in trainer.state.log_history if "reward" in log]
    for record, log in zip(records["trl"], trl_logs, strict=False):
        record["reward_mean"] = log.get("reward")
        record["frac_reward_zero_std"] = log.get("frac_reward_zero_std")
        record["completion_tokens"] = log.get("completions/mean_length")
    return records


def summarize(args: BenchArgs, records: dict, setup_rss: float, rss_per_step: bool) -> dict:
    out = {"settings": dataclasses.asdict(args), "torch_threads": torch.get_num_threads()}
    for side in ("ours", "trl"):
        measured = records[side][args.warmup :]
        out[side] = {
            key: median([r[key] for r in measured])
            for key in ("step", "generate", "score", "update")
        }
        out[side]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in records[side])
        out[side]["peak_rss_above_start_mib"] = max(
            r["peak_rss_mib"] - r["start_rss_mib"] for r in records[side]
        )
        out[side]["per_step"] = records[side]
    out["ratio_ours_over_trl"] = out["ours"]["step"] / out["trl"]["step"]
    out["rss"] = {
        "after_setup_mib": setup_rss,
        "process_peak_mib": max(setup_rss, out["ours"]["peak_rss_mib"], out["trl"]["peak_rss_mib"]),
        "per_step_peaks": rss_per_step,
    }
    return out


def report(summary: dict) -> str:
    lines = [
        "| seconds per step (median) | step | generate | score (exposed) | update + rest "
        "| peak RSS MiB (above start) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side, name in (("ours", "this project"), ("trl", "TRL GRPOTrainer")):
        s = summary[side]
        lines.append(
            f"| {name} | {s['step']:.3f} | {s['generate']:.3f} | {s['score']:.3f} | "
            f"{s['update']:.3f} | {s['peak_rss_mib']:.0f} ({s['peak_rss_above_start_mib']:.0f}) |"
        )
    lines.append(f"\nratio ours / TRL = {summary['ratio_ours_over_trl']:.3f}")
    if not summary["rss"]["per_step_peaks"]:
        lines.append("peak RSS: the process's peak so far (this system cannot reset it per step)")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> None:
    import trl

    from coderl.errors import UserError
    from sandbox import Sandbox

    (args,) = parse_args((BenchArgs,), argv, description=__doc__)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_everything(args.seed)
    tasks = toy_tasks(256, args.seed)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(workers=args.sandbox_workers) as sandbox:
        workdir = Path(tmp)
        model_dir = Path(args.model) if args.model else workdir / "model"
        if not (model_dir / "config.json").is_file():
            build_model(model_dir, tasks, args.pretrain_steps, args.seed)
        loop = build_ours(args, model_dir, tasks, sandbox, workdir)
        trl_times = TrlTimes()
        trainer = build_trl(args, model_dir, tasks, sandbox, workdir, trl_times)
        setup_rss = peak_rss_mib()
        rss_per_step = reset_peak_rss()
        print(
            f"torch {torch.__version__}, trl {trl.__version__}, threads {args.threads}, "
            f"{args.dtype}, sandbox: {sandbox.describe()}",
            file=sys.stderr,
        )
        records = interleaved(args, trainer, loop, trl_times)
    summary = summarize(args, records, setup_rss, rss_per_step)
    summary["versions"] = {"torch": torch.__version__, "trl": trl.__version__}
    print(report(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
