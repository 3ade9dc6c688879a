"""train_rl_lora.py end to end on the tiny model (fp32 LoRA with KL, 4-bit LoRA, TinyLoRA), resume
equal to one run, and learning: REINFORCE raises the reward on the toy family from a policy that
solves a few tasks, and a loaded adapter's LoRA dropout is turned off so that train mode is the
sampling policy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import train_rl_lora as rl
from coderl.adapters import add_adapter
from coderl.models import disable_dropout, load_model
from coderl.tasks import load_tasks, write_jsonl
from tests.helpers import (
    RunLogs,
    adapter_tensors,
    move_lora_b_off_zero,
    read_run,
    run_args,
    run_script,
    write_toy_tasks,
)

# Fixture toy_data_dir comes from conftest (its plugin).

# --------------------------------------------------------------------------- end to end

METRIC_KEYS = {
    "rollout/reward_mean", "rollout/pass_rate", "rollout/completion_tokens", "train/loss",
    "train/entropy", "train/kl", "train/grad_norm", "train/lr", "train/advantage_mean",
    "train/advantage_std", "time/generate", "time/score", "time/update",
}  # fmt: skip
SAMPLE_KEYS = {"step", "task_id", "sample", "reward", "advantage", "status", "passed", "completion"}


@pytest.fixture(scope="module")
def small_train_file(toy_data_dir, tmp_path_factory) -> Path:
    return write_toy_tasks(toy_data_dir, tmp_path_factory.mktemp("rl-data") / "train.jsonl", 8)


def rl_args(tiny_model_dir, train_file: Path, tmp_path: Path, name: str) -> list[str]:
    """A random tiny model passes nothing, so the reward is the length penalty alone
    (-tokens / 100 with alpha 1): nonzero, so even baseline none moves the adapter."""
    return [
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        "--train_file", str(train_file),
        *run_args(tmp_path, name),
        "--batch_size", "2",
        "--num_generations", "2",
        "--max_new_tokens", "8",
        "--learning_rate", "1e-2",
        "--length_alpha", "1.0",
        "--sandbox_workers", "1",
        "--save_every", "1",
        "--keep_last", "10",
    ]  # fmt: skip


def assert_only_the_adapter_moved(output_dir: Path, trainable: int) -> dict:
    """From checkpoint-1 to final every trainable value moved; no base tensor is saved.

    By checkpoint-1 LoRA's B is off zero, so every trainable value receives a gradient at every
    later step and Adam moves each one: a value that stays put received none (a broken backward).
    """
    first = adapter_tensors(output_dir / "checkpoint-1")
    final = adapter_tensors(output_dir / "final")
    assert final.keys() == first.keys()
    moved = sum(t.numel() for k, t in final.items() if not torch.equal(t, first[k]))
    assert moved == trainable > 0
    return final


def run_ok(args: list[str], cwd: Path):
    proc = run_script("train_rl_lora.py", args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_logs_are_complete(run: RunLogs, steps: int, per_step: int):
    metrics, samples = run.metrics, run.samples
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert METRIC_KEYS <= m.keys(), METRIC_KEYS - m.keys()
        assert all(math.isfinite(m[k]) for k in METRIC_KEYS)
    assert len(samples) == steps * per_step
    assert all(SAMPLE_KEYS <= s.keys() for s in samples)
    # The reward is the length penalty: -1.0 * tokens / 100 for every sample.
    assert all(s["reward"] == pytest.approx(-s["num_tokens"] / 100) for s in samples)


def test_end_to_end_lora_fp32_with_kl(tiny_model_dir, small_train_file, tmp_path):
    base_files = {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir() if p.is_file()}
    args = rl_args(tiny_model_dir, small_train_file, tmp_path, "fp32")
    args += ["--max_steps", "3", "--baseline", "none", "--kl_coef", "0.1"]
    args += ["--token_aggregation", "mean"]
    proc = run_ok(args, tmp_path)
    run = read_run(tmp_path, "fp32")
    metrics, samples, config = run.metrics, run.samples, run.config
    assert_logs_are_complete(run, steps=3, per_step=4)
    assert [s["advantage"] for s in samples] == pytest.approx([s["reward"] for s in samples])
    assert metrics[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA == reference
    assert metrics[-1]["train/kl"] > 0
    trainable = config["computed"]["trainable_params"]
    assert f"trainable_params={trainable}" in proc.stderr
    final = assert_only_the_adapter_moved(tmp_path / "fp32", trainable)
    assert all("lora_" in k for k in final)
    assert {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir() if p.is_file()} == (
        base_files
    )


# The 4-bit and TinyLoRA runs call main() in this process: the same script end to end, without
# the ~15 s a fresh interpreter spends importing peft (the subprocess path is covered above).


def test_end_to_end_qlora_4bit(tiny_model_dir, small_train_file, tmp_path):
    args = rl_args(tiny_model_dir, small_train_file, tmp_path, "q4")
    rl.main([*args, "--quantization", "4bit", "--max_steps", "2"])
    run = read_run(tmp_path, "q4")
    config = run.config
    assert config["computed"]["model"]["quantization"] == "4bit"
    assert_logs_are_complete(run, steps=2, per_step=4)
    final = assert_only_the_adapter_moved(tmp_path / "q4", config["computed"]["trainable_params"])
    assert all("lora_" in k for k in final)


def test_end_to_end_tinylora_trains_exactly_32_parameters(
    tiny_model_dir, small_train_file, tmp_path, capsys
):
    args = rl_args(tiny_model_dir, small_train_file, tmp_path, "tiny")
    args += ["--adapter", "tinylora", "--tinylora_u", "32", "--max_steps", "2"]
    rl.main([*args, "--learning_rate", "5e-2"])
    run = read_run(tmp_path, "tiny")
    assert run.config["computed"]["trainable_params"] == 32
    assert "trainable_params=32" in capsys.readouterr().err
    assert_logs_are_complete(run, steps=2, per_step=4)
    assert_only_the_adapter_moved(tmp_path / "tiny", 32)


def test_resume_gives_the_same_rollouts_and_losses_as_one_run(
    tiny_model_dir, small_train_file, tmp_path
):
    """2 steps, then --resume to 4, against 4 steps in one go. Sampling on CPU is deterministic
    for a seed (per-sample generators seeded from (seed, step, process, task, sample)), so steps 3
    and 4 must draw the same completions, get the same rewards and losses, and end at the same
    adapter, data position and moving mean."""
    common = ["--baseline", "moving_mean", "--lora_dropout", "0.1"]  # dropout draws from the RNG
    whole = [*rl_args(tiny_model_dir, small_train_file, tmp_path, "whole"), *common]
    rl.main([*whole, "--max_steps", "4"])
    parts = [*rl_args(tiny_model_dir, small_train_file, tmp_path, "parts"), *common]
    rl.main([*parts, "--max_steps", "2"])
    rl.main([*parts, "--max_steps", "4", "--resume"])

    whole_run, parts_run = read_run(tmp_path, "whole"), read_run(tmp_path, "parts")
    m_whole, s_whole = whole_run.metrics, whole_run.samples
    m_parts, s_parts = parts_run.metrics, parts_run.samples
    assert [m["step"] for m in m_parts] == [1, 2, 3, 4]
    # moving_mean: step 1 has no history (b = 0), step 2 subtracts step 1's mean reward.
    assert m_whole[0]["train/baseline"] == 0.0
    assert m_whole[1]["train/baseline"] == pytest.approx(m_whole[0]["rollout/reward_mean"])
    for a, b in zip(m_whole, m_parts):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/entropy",
                    "train/baseline", "train/epoch"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    strip = [{k: v for k, v in s.items() if k != "time"} for s in s_whole]
    assert [{k: v for k, v in s.items() if k != "time"} for s in s_parts] == strip
    state_whole = torch.load(tmp_path / "whole" / "checkpoint-4" / "trainer_state.pt",
                             weights_only=False)  # fmt: skip
    state_parts = torch.load(tmp_path / "parts" / "checkpoint-4" / "trainer_state.pt",
                             weights_only=False)  # fmt: skip
    assert state_parts["step"] == state_whole["step"] == 4
    assert state_parts["data_position"] == state_whole["data_position"] == 8
    assert state_parts["baseline_state"] == state_whole["baseline_state"]
    a = adapter_tensors(tmp_path / "whole" / "final")
    b = adapter_tensors(tmp_path / "parts" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- learning


def pretrain_on_solutions(model_dir: str, tasks: list[dict], out: Path, steps: int, lr: float):
    """Fully fine-tune the random tiny model on prompt -> canonical solution (prompt masked).

    A random-init model passes nothing and LoRA on it learns too slowly for a test, so the policy
    RL starts from is made here: after ~120 steps it writes the toy family's format and gets some
    tasks right, with wrong operations or constants on the others (what RL can fix).
    """
    import random

    from coderl.prompts import encode_prompt_and_completion

    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir)
    examples = [
        encode_prompt_and_completion(tokenizer, t["prompt"], t["canonical_solution"]) for t in tasks
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, 16)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def toy_policy_dir(tiny_model_dir, toy_data_dir, tmp_path_factory) -> Path:
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")
    out = tmp_path_factory.mktemp("toy-policy") / "model"
    return pretrain_on_solutions(tiny_model_dir, tasks, out, steps=120, lr=6e-3)


def single_step_tasks(toy_data_dir, count: int) -> list[dict]:
    """Training tasks of one operation (``x = x + 3`` + ``return x``): short, quick to sample."""
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")
    return [t for t in tasks if t["canonical_solution"].count("\n") == 2][:count]


def pass_rates(model, tokenizer, tasks: list[dict]) -> tuple[float, float]:
    """(mean reward of 16 samples per task at temperature 1, greedy pass@1) on ``tasks``."""
    from coderl.generation import SamplingConfig
    from coderl.rewards import RewardArgs
    from coderl.rollouts import collect_rollouts
    from sandbox import Sandbox

    rates = []
    with Sandbox(workers=2) as box:
        for temperature, n in ((1.0, 8), (0.0, 1)):
            cfg = SamplingConfig(max_new_tokens=32, temperature=temperature, n=n, batch_size=64)
            rollouts = collect_rollouts(model, tokenizer, tasks, cfg, box, RewardArgs(), seed=123)
            rates.append(sum(r.reward for r in rollouts) / len(rollouts))
    return rates[0], rates[1]


def test_reinforce_raises_the_reward_on_the_toy_family(toy_policy_dir, toy_data_dir, tmp_path):
    """24 REINFORCE (RLOO) steps on 16 single-step training tasks, from a policy that solves a
    few of them: the sampled reward on those tasks rises clearly, and greedy pass@1 with it.

    Measured when written (CPU, this seed): sampled reward 0.20 -> 0.68, training reward of the
    first six steps 0.23 -> last six 0.68, greedy pass@1 5/16 -> 12/16.
    """
    tasks = single_step_tasks(toy_data_dir, 16)
    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, tasks)
    base, tokenizer = load_model(str(toy_policy_dir))
    sampled_before, greedy_before = pass_rates(base, tokenizer, tasks)
    assert 0.02 < sampled_before < 0.3  # some signal to learn from, room to improve

    rl.main([
        "--model", str(toy_policy_dir), "--quantization", "none",
        "--train_file", str(train_file),
        "--output_dir", str(tmp_path / "rl"), "--logging_dir", str(tmp_path / "runs"),
        "--run_name", "learn", "--report_to", "none",
        "--baseline", "rloo", "--num_generations", "8", "--batch_size", "8",
        "--max_steps", "12", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--lora_r", "16", "--lora_alpha", "32", "--max_new_tokens", "32",
        "--micro_batch_size", "64", "--generation_batch_size", "64",
        "--sandbox_workers", "2", "--save_every", "100",
    ])  # fmt: skip
    rewards = [m["rollout/reward_mean"] for m in read_run(tmp_path, "learn").metrics]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    trained, _ = load_model(str(tmp_path / "rl" / "final"), base_model=str(toy_policy_dir))
    sampled_after, greedy_after = pass_rates(trained, tokenizer, tasks)
    assert sampled_after > sampled_before + 0.08, (sampled_before, sampled_after)
    assert last > first + 0.03, (first, last)
    assert greedy_after >= greedy_before, (greedy_before, greedy_after)


def test_lora_dropout_of_a_loaded_adapter_is_set_so_train_mode_is_the_sampling_policy(
    tiny_model_dir,
):
    model, _ = load_model(tiny_model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.5)  # as an SFT adapter would bring it
    move_lora_b_off_zero(model)  # a trained adapter: B != 0, so its dropout changes the output
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    model.eval()
    with torch.no_grad():
        sampling = model(input_ids=ids).logits
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(input_ids=ids).logits, sampling)  # dropout 0.5 is active
        assert disable_dropout(model) > 0  # what the RL loop does to every policy it loads
        assert torch.equal(model(input_ids=ids).logits, sampling)
