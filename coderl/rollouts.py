"""Rollouts: sample completions of training prompts, score them in the sandbox, turn verdicts
into rewards; and greedy validation on held-out tasks. Shared by the RL scripts (and validation by
SFT); no algorithm lives here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coderl.rewards import RewardArgs, Scored, compute_rewards, reward_partial


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
    mask: bool = True  # False: infra_error, never scored as the model's fault
    # Set by the algorithm: the row's advantage, and whether it is in the loss.
    advantage: float | None = None
    in_loss: bool = False

    def log_row(self) -> dict:
        """The row of ``samples.jsonl``."""
        return {
            "task_id": self.task["task_id"],
            "sample": self.sample_index,
            "reward": self.reward,
            "status": self.result.status,
            "passed": self.result.passed,
            "num_tokens": self.num_tokens,
            "truncated": self.truncated,
            "completion": self.text,
            "advantage": self.advantage,
            "in_loss": self.in_loss,
        }


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids exactly as generation encodes them (shared with SFT)."""
    from coderl.prompts import encode_prompt

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


class TimedSandbox:
    """Passes work to the sandbox and notes when generation handed over its last chunk.

    :func:`collect_rollouts` submits each chunk right after generating it, so the last submission
    marks the end of generation; what is left after it is scoring not hidden behind generation.
    """

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.last_submit = time.perf_counter()

    def submit_batch(self, jobs):
        self.last_submit = time.perf_counter()
        return self.sandbox.submit_batch(jobs)

    def __getattr__(self, name):
        return getattr(self.sandbox, name)


def make_sandbox(train_args):
    """The sandbox a training run scores with (``--sandbox_workers``, ``--sandbox_timeout``)."""
    from sandbox import Sandbox

    return Sandbox(workers=train_args.sandbox_workers or None, timeout=train_args.sandbox_timeout)


def collect_rollouts(
    model,
    tokenizer,
    tasks: Sequence[dict],
    sampling,
    sandbox,
    reward_args: RewardArgs,
    seed: int,
    first_index: int = 0,
    chunk_tasks: int = 0,
) -> list[Rollout]:
    """Sample ``sampling.n`` completions per task, score them, compute rewards.

    Task ``i`` of ``tasks`` is task ``first_index + i`` of the step's draw: its samples are seeded
    from (``seed``, that index, sample index), so they do not depend on how the draw is split
    into chunks or over processes. With ``chunk_tasks`` > 0 generation runs in chunks of that many
    tasks, each scored in the sandbox while the next one generates (0: one chunk).
    """
    from coderl.generation import generate
    from coderl.prompts import completion_for_sandbox, render_prompt

    chunk_tasks = chunk_tasks or max(len(tasks), 1)
    pending: list[tuple[Any, list[Rollout]]] = []
    with torch.no_grad():
        for start in range(0, len(tasks), chunk_tasks):
            part = list(tasks[start : start + chunk_tasks])
            first = first_index + start
            completions = generate(model, tokenizer, part, sampling, seed, first_task_index=first)
            rollouts = []
            for c in completions:
                task = part[c.task_index]
                prompt = render_prompt(task, tokenizer, sampling.prompt_mode)
                code = completion_for_sandbox(task, prompt, c.text, sampling.prompt_mode)
                rollouts.append(
                    Rollout(
                        task_index=first + c.task_index,
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


def group_by_prompt(rollouts: Sequence[Rollout]) -> list[list[Rollout]]:
    """The rollouts of each prompt together (in the draw's order), each group by sample index."""
    groups: dict[int, list[Rollout]] = {}
    for r in sorted(rollouts, key=lambda r: (r.task_index, r.sample_index)):
        groups.setdefault(r.task_index, []).append(r)
    return list(groups.values())


def rollout_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """``rollout/`` metrics: reward, pass rate, length, verdict fractions."""
    n = max(len(rollouts), 1)
    kept = [r for r in rollouts if r.mask]
    metrics = {
        "rollout/reward_mean": sum(r.reward for r in kept) / max(len(kept), 1),
        "rollout/pass_rate": sum(r.result.passed for r in rollouts) / n,
        "rollout/completion_tokens": sum(r.num_tokens for r in rollouts) / n,
        "rollout/truncated_frac": sum(r.truncated for r in rollouts) / n,
        "rollout/infra_error_frac": 1 - len(kept) / n if rollouts else 0.0,
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


# --------------------------------------------------------------------------- the folded adapter


def foldable_adapter_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, adapter layer) for every peft adapter layer, or [] when any one of them
    cannot be folded exactly: a quantized or half-precision base weight (a bfloat16 sum would
    round a small update away), DoRA, or an already merged layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, BaseTunerLayer):
                continue
            base = child.get_base_layer()
            weight = getattr(base, "weight", None)
            foldable = (
                type(base) is torch.nn.Linear
                and weight is not None
                and weight.dtype == torch.float32
                and not child.merged
                and not any(
                    getattr(child, "use_dora", {}).get(a, False) for a in child.active_adapters
                )
            )
            if not foldable:
                return []
            found.append((parent, name, child))
    return found


@contextlib.contextmanager
def adapter_folded(model, enabled: bool = True):
    """Inside: each adapted linear layer is replaced by a plain ``nn.Linear`` holding
    ``W + delta W`` (a new tensor), so generation skips peft's per-layer adapter branch (one
    matmul per layer instead of three); on exit the adapter layers go back, their weights never
    touched. For inference only (no gradient)."""
    layers = foldable_adapter_layers(model) if enabled else []
    with torch.no_grad():
        for parent, name, layer in layers:
            base = layer.get_base_layer()
            folded = torch.nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device="meta"
            )
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            folded.weight = torch.nn.Parameter(base.weight + delta, requires_grad=False)
            folded.bias = base.bias
            setattr(parent, name, folded)
    try:
        yield
    finally:
        for parent, name, layer in layers:
            setattr(parent, name, layer)


# --------------------------------------------------------------------------- validation


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[dict],
    sandbox,
    max_new_tokens: int,
    prompt_mode: str = "base",
    batch_size: int = 8,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy pass@1, compile rate (C++) and average score (the mean ``partial`` reward) on
    held-out tasks (``eval/`` metrics), and one row per task (its verdict and score)."""
    from coderl.generation import SamplingConfig, generate
    from coderl.prompts import completion_for_sandbox, render_prompt

    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        n=1,
        batch_size=batch_size,
        prompt_mode=prompt_mode,
    )
    with torch.no_grad():
        completions = generate(model, tokenizer, list(tasks), cfg, seed=0)
    jobs = []
    for c in completions:
        task = tasks[c.task_index]
        prompt = render_prompt(task, tokenizer, prompt_mode)
        jobs.append((task, completion_for_sandbox(task, prompt, c.text, prompt_mode)))
    results = sandbox.run_batch(jobs)
    scores = reward_partial(
        [
            Scored(task=t, code=code, num_tokens=c.num_tokens, result=res)
            for (t, code), c, res in zip(jobs, completions, results, strict=True)
        ],
        RewardArgs(reward="partial"),
    )
    n = len(results)
    metrics = {
        "eval/pass@1": sum(r.passed for r in results) / n,
        "eval/avg_score": sum(scores) / n,
        "eval/completion_tokens": sum(c.num_tokens for c in completions) / n,
        "eval/num_tasks": n,
    }
    compiled = [r.compiled for r in results if r.compiled is not None]
    if compiled:
        metrics["eval/compile_rate"] = sum(compiled) / len(compiled)
    rows = [
        {"task_id": t["task_id"], "status": r.status, "passed": r.passed, "score": s}
        for (t, _), r, s in zip(jobs, results, scores, strict=True)
    ]
    return metrics, rows


def results_table(before: dict | None, after: dict, method: str) -> str:
    """Validation before and after training as a markdown table (the TinyLoRA seed's)."""

    def cells(m: dict) -> list[str]:
        n = int(m["eval/num_tasks"])
        out = [str(n), f"{m['eval/pass@1']:.2%} ({round(m['eval/pass@1'] * n)}/{n})"]
        rate = m.get("eval/compile_rate")
        out.append("-" if rate is None else f"{rate:.2%}")
        out.append(f"{m['eval/avg_score']:.4f}")
        return out

    names = ["Total Samples", "Pass@1", "Compile Rate", "Average Score"]
    columns = [cells(after)] if before is None else [cells(before), cells(after)]
    header = ["Metric"] + (["Before"] if before is not None else []) + [f"After {method}"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for index, name in enumerate(names):
        lines.append("| " + " | ".join([name] + [c[index] for c in columns]) + " |")
    return "\n".join(lines)
