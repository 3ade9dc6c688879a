"""train_grpo_lora.py: advantages, losses and the zero-std logic by hand; gradients against the
policy gradient; end to end on the toy families (Python and C++), resume, TinyLoRA, learning."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Fixtures tiny_model_dir, toy_data_dir and sft_adapter_dir come from conftest (its plugin).
from coderl.logprobs import completion_logprobs, pack_rows
from coderl.rollouts import adapter_folded, foldable_adapter_layers
from tests.helpers import REPO, full_vocab_logprobs, right_padded, run_script, script_env
from train_grpo_lora import (
    assemble_groups,
    group_advantages,
    grpo_loss,
    overlong_penalty,
    zero_std_groups,
)

SCRIPT = REPO / "train_grpo_lora.py"

# Two groups of four: one success in the first, two in the second.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
EPS = 1e-4


# --------------------------------------------------------------------------- advantages


def test_group_scaling_by_hand():
    # group 1: mean 1/4, sample std sqrt((9/16 + 3/16) / 3) = 1/2
    # group 2: mean 1/2, sample std sqrt((4/4) / 3) = 1/sqrt(3)
    s2 = 1 / math.sqrt(3)
    expected = [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3
    expected += [0.5 / (s2 + EPS)] * 2 + [-0.5 / (s2 + EPS)] * 2
    assert group_advantages(REWARDS, 4, "group").tolist() == pytest.approx(expected, rel=1e-6)


def test_batch_scaling_by_hand():
    # batch mean 3/8; squares 3 * (5/8)^2 + 5 * (3/8)^2 = 15/8; sample variance 15/56
    std = math.sqrt(15 / 56)
    centered = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    expected = [c / (std + EPS) for c in centered]
    assert group_advantages(REWARDS, 4, "batch").tolist() == pytest.approx(expected, rel=1e-6)


def test_no_scaling_is_the_group_centred_reward():
    centered = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    assert group_advantages(REWARDS, 4, "none").tolist() == pytest.approx(centered)


def test_unscored_sample_is_left_out_and_gets_zero_advantage():
    rewards = torch.tensor([1.0, 0.0, math.nan, 0.0])
    # mean of (1, 0, 0) = 1/3, the NaN sample gets 0
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx(
        [2 / 3, -1 / 3, 0, -1 / 3]
    )


def test_equal_reward_groups_have_zero_advantage_and_are_flagged():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, math.nan, math.nan])
    assert zero_std_groups(rewards, 4).tolist() == [True, False, True]
    advantages = group_advantages(rewards, 4, "group")
    assert advantages[:4].tolist() == [0.0] * 4 and advantages[8:].tolist() == [0.0] * 4


def test_overlong_penalty_ramp():
    # L = 100, buffer 20: free up to 80 tokens, then linearly to -1 at 100.
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 90, 100)] == pytest.approx(
        [0.0, 0.0, -0.5, -1.0]
    )


# --------------------------------------------------------------------------- losses

NEW = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.3, 0.0]])
OLD = torch.tensor([[-1.4, -0.5, -1.5], [-0.3, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
# Per-token surrogate, eps_low 0.2, eps_high 0.28:
#   row 0 (A = 1):  rho = e^0.4 > 1.28 -> clipped to 1.28;  rho = 1;  rho = e^-0.5 (unclipped, min)
#   row 1 (A = -2): rho = 1 -> 2;  rho = e^-0.3 < 0.8 -> clipped: -min(-2e^-0.3, -1.6) = 1.6
ROW0 = [-1.28, -1.0, -math.exp(-0.5)]
ROW1 = [2.0, 1.6]


def loss_of(loss_type, **kw):
    return grpo_loss(NEW, OLD, None, ADV, MASK, 0.2, 0.28, 0.0, loss_type, 4, **kw)


def test_grpo_aggregation_by_hand():
    loss, stats = loss_of("grpo")
    assert float(loss) == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2, rel=1e-6)
    # one of five tokens clipped low (rho < 0.8, A < 0), one clipped high (rho > 1.28, A > 0)
    assert float(stats["clip_ratio_low"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio_high"]) == pytest.approx(0.2)


def test_dapo_aggregation_by_hand():
    loss, _ = loss_of("dapo")
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 5, rel=1e-6)


def test_dr_grpo_aggregation_by_hand():
    loss, _ = loss_of("dr_grpo")  # 2 sequences x max_completion_length 4
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 8, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_full_batch(loss_type):
    full, _ = loss_of(loss_type)
    parts = [
        grpo_loss(
            NEW[i : i + 1], OLD[i : i + 1], None, ADV[i : i + 1], MASK[i : i + 1],
            0.2, 0.28, 0.0, loss_type, 4, num_sequences=2, num_tokens=5.0,
        )[0]
        for i in range(2)
    ]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)


def test_k3_kl_term_by_hand():
    ref = torch.tensor([[-1.0, -0.7, -2.0], [-0.5, -1.3, 0.0]])
    loss, stats = grpo_loss(NEW, OLD, ref, ADV, MASK, 0.2, 0.28, 0.1, "dapo", 4)
    d = (ref - NEW)[MASK.bool()]
    k3 = torch.exp(d) - d - 1
    assert float(stats["kl"]) == pytest.approx(float(k3.mean()), rel=1e-6)
    assert float(loss) == pytest.approx((sum(ROW0) + sum(ROW1)) / 5 + 0.1 * float(k3.mean()))


def test_clipped_tokens_get_no_gradient():
    new = NEW.clone().requires_grad_(True)
    loss, _ = grpo_loss(new, OLD, None, ADV, MASK, 0.2, 0.28, 0.0, "dapo", 4)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[1, 1] == 0  # the two clipped tokens
    # an unclipped token: d/dnew of -A * exp(new - old) / 5
    assert float(new.grad[0, 1]) == pytest.approx(-1.0 / 5)
    assert float(new.grad[1, 2]) == 0  # masked


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("share_prompts", [True, False])
def test_gradient_equals_reinforce_with_group_mean_baseline(tiny_model_dir, share_prompts):
    """mu = 1, beta = 0: rho = 1, and the GRPO gradient is the policy gradient
    -1/N sum_i A_i * (1/|y_i|) sum_t grad log pi(y_it), computed here through the shared
    right-padded reference (one pass per full row over every position), both when the script
    runs each prompt once for its group and when it runs every row whole."""
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir)
    model = add_adapter(model, "lora", r=4, alpha=8, dropout=0.0)
    for _, p in model.named_parameters():  # LoRA B starts at 0: give A and B real values
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    prompts = [tok.encode("def f(x):\n"), tok.encode("def g(xs):\n    return")]
    completions = [[101, 57, 300], [9, 12], [44, 45, 46, 47], [7]]
    prompt_of = [prompts[0], prompts[0], prompts[1], prompts[1]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 2, "none")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    batch = pack_rows(prompt_of, completions, tok.pad_token_id)
    assert batch.prompt_ids.shape[0] == 2 and batch.row_prompt.tolist() == [0, 0, 1, 1]
    new_lp = completion_logprobs(model, batch, share_prompts=share_prompts).logprobs
    loss, _ = grpo_loss(
        new_lp, new_lp.detach(), None, adv, batch.completion_mask, 0.2, 0.2, 0.0, "grpo", 8
    )
    grads = torch.autograd.grad(loss, params)

    ids, att, cmask = right_padded(prompt_of, completions, tok.pad_token_id)
    lp, _ = full_vocab_logprobs(model, ids, att)
    torch.testing.assert_close(
        new_lp[batch.completion_mask.bool()], lp[cmask.bool()], rtol=1e-5, atol=1e-5
    )
    per_seq = (lp * cmask).sum(1) / cmask.sum(1)
    reinforce = -(adv * per_seq).sum() / 4
    expected = torch.autograd.grad(reinforce, params)
    assert any(float(g.abs().max()) > 1e-6 for g in expected)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_shared_prompt_path_under_kbit_gradient_checkpointing(tiny_model_dir):
    """peft's prepare_model_for_kbit_training (what a 4-bit CUDA base gets) switches gradient
    checkpointing on, which turns the key/value cache off in train mode: the shared-prompt forward
    then had no cache to select rows from (AttributeError at the first update). It must fall back
    to one pass per row and give the same log-probs and gradients as with checkpointing off."""
    from coderl.adapters import add_adapter
    from coderl.models import gradient_checkpointing_on, load_model

    model, tok = load_model(tiny_model_dir, quantization="4bit")
    model = add_adapter(model, "qlora", r=4, alpha=8, dropout=0.0, prepare_kbit=True)
    assert gradient_checkpointing_on(model)
    for _, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    prompts = [tok.encode("def f(x):\n"), tok.encode("def g(xs):\n    return")]
    batch = pack_rows(
        [prompts[0], prompts[0], prompts[1]], [[101, 57], [9], [44, 45, 46]], tok.pad_token_id
    )
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    runs = {}
    for checkpointing in (True, False):
        if not checkpointing:
            model.gradient_checkpointing_disable()
        for share in (True, False):
            lp = completion_logprobs(model, batch, share_prompts=share).logprobs
            model.zero_grad()
            (-(lp * batch.completion_mask).sum()).backward()  # reentrant checkpoints: no .grad()
            kept = lp.detach()[batch.completion_mask.bool()]  # padding columns are no tokens
            runs[checkpointing, share] = (kept, [p.grad.clone() for p in params])
    want_lp, want_grads = runs[False, True]
    assert any(float(g.abs().max()) > 1e-6 for g in want_grads)
    for key, (lp, grads) in runs.items():
        torch.testing.assert_close(lp, want_lp, rtol=1e-4, atol=1e-5, msg=str(key))
        for g, e in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6, msg=str(key))


def test_folded_adapter_gives_the_same_logits_and_leaves_the_adapter_alone(tiny_model_dir):
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir)
    model = add_adapter(model, "lora", r=4, alpha=8, dropout=0.0)
    for _, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with adapter_folded(model):
            assert not any("lora" in n for n, _ in model.named_modules())  # plain linears now
            folded = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert float((plain - again).abs().max()) == 0
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)
    assert float((folded - plain).abs().max()) > 0  # it really ran the folded weights
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    half, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert foldable_adapter_layers(add_adapter(half, "lora", r=4)) == []  # would round dW away


# --------------------------------------------------------------------------- zero-std groups


def fake_group(rewards, masks=None):
    masks = masks or [True] * len(rewards)
    return [SimpleNamespace(reward=r, mask=m) for r, m in zip(rewards, masks, strict=True)]


class ScriptedSource:
    """A fake reward source: hands out pre-made groups in order and records each draw."""

    def __init__(self, groups):
        self.groups = list(groups)
        self.calls = []

    def __call__(self, count, round_index, keep):
        self.calls.append((count, round_index))
        out, self.groups = self.groups[:count], self.groups[count:]
        return out[:keep]


MIXED, FLAT = [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]


def test_keep_returns_every_group_and_counts_the_flat_ones():
    source = ScriptedSource([fake_group(MIXED), fake_group(FLAT), fake_group(FLAT)])
    groups, info = assemble_groups(source, 3, "keep", 5)
    assert len(groups) == 3 and info.first_draw_zero_std == 2 and info.dropped == 0
    assert source.calls == [(3, 0)]


def test_drop_removes_flat_groups_without_drawing_more():
    flat_with_error = fake_group(
        [1.0, 0.0, 1.0, 1.0], [True, False, True, True]
    )  # scored ones equal
    source = ScriptedSource([fake_group(MIXED), fake_group(FLAT), flat_with_error])
    groups, info = assemble_groups(source, 3, "drop", 5)
    assert [[r.reward for r in g] for g in groups] == [MIXED]
    assert info.dropped == 2 and info.first_draw_zero_std == 2 and source.calls == [(3, 0)]


def test_resample_refills_the_batch_within_the_budget():
    source = ScriptedSource(
        [fake_group(MIXED), fake_group(FLAT), fake_group(FLAT)]  # first draw: two flat
        + [fake_group(FLAT), fake_group([0.5, 1.0, 1.0, 1.0])]  # round 1: one flat
        + [fake_group([0.0, 0.0, 0.0, 1.0])]  # round 2: refills
    )
    groups, info = assemble_groups(source, 3, "resample", 3)
    assert len(groups) == 3 and info.dropped == 0
    assert source.calls == [(3, 0), (2, 1), (1, 2)] and info.resample_rounds == 2
    assert info.first_draw_zero_std == 2


def test_resample_gives_up_after_the_budget_and_reports_the_dropped_share():
    source = ScriptedSource([fake_group(FLAT) for _ in range(10)])
    groups, info = assemble_groups(source, 4, "resample", 2)
    assert groups == [] and info.dropped == 4 and info.resample_rounds == 2
    assert source.calls == [(4, 0), (4, 1), (4, 2)]


# --------------------------------------------------------------------------- scripts end to end


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def grpo_args(out: Path, name: str, train_file: Path, *extra: str) -> list[str]:
    return [
        "--train_file", str(train_file),
        "--output_dir", str(out / name),
        "--logging_dir", str(out / "runs"),
        "--run_name", name,
        "--report_to", "none",
        "--quantization", "none",
        "--sandbox_workers", "2",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def check_ran(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_help_lists_every_algorithm_option(capsys):
    import train_grpo_lora

    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--scale_rewards", "--loss_type", "--epsilon_high", "--num_iterations", "--beta",
                 "--zero_std", "--max_resample_rounds", "--mask_truncated", "--overlong_penalty",
                 "--adapter", "--reward", "--prompt_mode", "--merge_for_generation", "--config"):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epsilon", "1.5"], "--epsilon must be in (0, 1), got 1.5"),
        (["--num_generations", "1"], "--num_generations must be in [2, inf), got 1"),
        (["--overlong_penalty", "--overlong_buffer", "0"], "--overlong_buffer must be in"),
        (["--adapter", "qlora", "--quantization", "none"], "--adapter qlora needs a 4-bit base"),
        (["--temperature", "0"], "--temperature must be in (0, inf), got 0.0"),
        (["--no_such_flag", "1"], "unknown option(s): --no_such_flag"),
        (["--init_adapter", "/nonexistent"], "no adapter_config.json"),
        (["--train_file", "/nonexistent.jsonl", "--report_to", "none"], "file not found"),
    ],
)
def test_bad_values_are_one_line_errors_with_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    import train_grpo_lora

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--output_dir", str(tmp_path / "o"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# The runs below share one budget: the SFT'd tiny model samples at temperature 0.6 (its greedy
# output is one repeated line, at 1.0 nearly everything is a syntax error), and the shaped reward
# (-0.5 error, +0.2 runs but fails, +1 pass, + style bonuses) gives its groups unequal rewards.
SHAPED = ["--reward", "shaped", "--temperature", "0.6", "--batch_size", "8",
          "--num_generations", "4", "--max_new_tokens", "32"]  # fmt: skip


def test_ratio_stays_one_until_the_weights_move_with_a_dropout_adapter(
    tiny_model_dir, sft_adapter_dir, toy_data_dir, tmp_path, capsys
):
    """An --init_adapter keeps its own LoRA dropout (here 0.5). Two updates per rollout at a
    learning rate too small to move anything: the second pass must see rho = 1 exactly, so no
    token is clipped. With dropout on in the update, its noise alone clipped most tokens."""
    import train_grpo_lora

    adapter = tmp_path / "dropout-adapter"
    shutil.copytree(sft_adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.5}))
    train_grpo_lora.main(grpo_args(
        tmp_path, "dropout", toy_data_dir / "toy_python_train.jsonl", "--model", tiny_model_dir,
        "--init_adapter", str(adapter), *SHAPED, "--num_iterations", "2", "--max_steps", "1",
        "--learning_rate", "1e-12", "--epsilon", "0.05", "--warmup_steps", "0",
    ))  # fmt: skip
    assert "dropout modules disabled: " in capsys.readouterr().err
    [step] = train_steps(tmp_path / "runs" / "dropout").values()
    assert step["train/loss_sequences"] > 0
    assert step["train/clip_ratio_low"] == step["train/clip_ratio_high"] == 0.0


def start_script(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def merged_sft_model(sft_adapter_dir: Path, out: Path) -> Path:
    """The SFT adapter folded into its base and saved as a plain model (a base for TinyLoRA)."""
    from coderl.models import load_model

    model, tokenizer = load_model(str(sft_adapter_dir))
    model.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sft_adapter_dir, toy_data_dir):
    """Three runs started together (the machine's cores overlap their start-up):

    * ``python``: 8 GRPO steps from the SFT adapter on toy Python, checkpoint at 6, validation;
    * ``cpp``: the random tiny model on toy C++, zero_std=resample (every group is flat);
    * ``tinylora``: 2 steps of TinyLoRA (u=32) on the SFT model merged into its base, with
      zero_std=drop, two updates per rollout, KL to the reference, dapo, clip-higher and the
      overlong penalty.
    """
    out = tmp_path_factory.mktemp("grpo-runs")
    py_train, py_test = (
        toy_data_dir / "toy_python_train.jsonl",
        toy_data_dir / "toy_python_test.jsonl",
    )
    merged = merged_sft_model(sft_adapter_dir, out / "merged-sft")
    commands = {
        "python": grpo_args(
            out, "python", py_train, "--model", tiny_model_dir, "--init_adapter",
            str(sft_adapter_dir), *SHAPED, "--learning_rate", "5e-3", "--max_steps", "8",
            "--save_every", "6", "--keep_last", "3", "--eval_file", str(py_test),
            "--eval_tasks", "8", "--eval_max_new_tokens", "32", "--eval_at_start",
        ),
        "cpp": grpo_args(
            out, "cpp", toy_data_dir / "toy_cpp_train.jsonl", "--model", tiny_model_dir,
            "--max_steps", "1", "--batch_size", "2", "--num_generations", "2",
            "--max_new_tokens", "12", "--zero_std", "resample", "--max_resample_rounds", "1",
            "--eval_file", str(toy_data_dir / "toy_cpp_test.jsonl"), "--eval_tasks", "2",
            "--eval_max_new_tokens", "12",
        ),
        "tinylora": grpo_args(
            out, "tinylora", py_train, "--model", str(merged), "--adapter", "tinylora",
            "--tinylora_u", "32", *SHAPED, "--learning_rate", "0.05", "--max_steps", "2",
            "--save_every", "1", "--keep_last", "5",
            # the other branches of the algorithm, end to end
            "--zero_std", "drop", "--num_iterations", "2", "--beta", "0.05", "--loss_type",
            "dapo", "--epsilon_high", "0.28", "--overlong_penalty", "--overlong_buffer", "8",
        ),
    }  # fmt: skip
    procs = {name: start_script(args, out) for name, args in commands.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[name] = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return SimpleNamespace(out=out, commands=commands, **done)


def test_python_end_to_end(runs):
    check_ran(runs.python)
    steps = train_steps(runs.out / "runs" / "python")
    assert sorted(steps) == list(range(1, 9))
    for rec in steps.values():
        assert 0 <= rec["rollout/frac_reward_zero_std"] <= 1
        assert rec["rollout/frac_dropped"] == 0  # zero_std=keep
        # keep: every scored, non-empty completion of the 8 x 4 is in the loss
        assert rec["train/loss_sequences"] <= 32 and rec["train/trainable_params"] > 0
        assert rec["train/forward_sequences"] <= rec["train/loss_sequences"]
        assert rec["train/clip_ratio_low"] == 0 and rec["train/clip_ratio_high"] == 0  # mu = 1
        assert "train/kl" not in rec  # beta = 0: no reference pass
    samples = (runs.out / "runs" / "python" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8 * 32
    out = runs.out / "python"
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-8").is_dir()
    assert (out / "final" / "adapter_config.json").is_file()
    final = json.loads((out / "final_eval.json").read_text())
    for key in ("eval/pass@1", "eval/avg_score"):
        assert 0 <= final["after"][key] <= 1 and 0 <= final["before"][key] <= 1
    assert "| Pass@1 |" in runs.python.stdout and "| Average Score |" in runs.python.stdout


def test_grpo_raises_the_training_reward(runs):
    """Fixed seed and budget: the SFT'd model's mean shaped reward over its first two steps
    against its last three (measured: about -0.2 -> +0.3, mostly by writing code that runs)."""
    check_ran(runs.python)
    rewards = [
        rec["rollout/reward_mean"]
        for _, rec in sorted(train_steps(runs.out / "runs" / "python").items())
    ]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2, rewards


def test_resume_matches_an_uninterrupted_run(runs):
    """Checkpoint 6 of the 8-step run, resumed to 8, gives steps 7-8 equal to the run itself."""
    import shutil

    check_ran(runs.python)
    resumed = runs.out / "resumed"
    shutil.copytree(runs.out / "python" / "checkpoint-6", resumed / "checkpoint-6")
    args = [a for a in runs.commands["python"]]
    args[args.index("--output_dir") + 1] = str(resumed)
    args[args.index("--run_name") + 1] = "resumed"
    args.remove("--eval_at_start")
    proc = run_script("train_grpo_lora.py", [*args, "--resume"], cwd=runs.out)
    check_ran(proc)
    full = train_steps(runs.out / "runs" / "python")
    again = train_steps(runs.out / "runs" / "resumed")
    assert sorted(again) == [7, 8]
    for step in (7, 8):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/epoch",
                    "rollout/completion_tokens"):  # fmt: skip
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), key


def test_cpp_end_to_end_with_resampling(runs):
    """Random tiny model on C++: every program fails to compile, every group is flat, the
    resample round is spent and the whole batch is dropped, and that is what is logged."""
    check_ran(runs.cpp)
    config = json.loads((runs.out / "runs" / "cpp" / "config.json").read_text())
    assert config["computed"]["reward"] == "partial"  # auto, for stdin/stdout tasks
    (rec,) = train_steps(runs.out / "runs" / "cpp").values()
    assert rec["rollout/compile_rate"] == 0 and rec["rollout/reward_mean"] == 0
    assert rec["rollout/frac_reward_zero_std"] == 1 and rec["rollout/resample_rounds"] == 1
    assert rec["rollout/frac_dropped"] == 1 and rec["train/loss_sequences"] == 0
    samples = (runs.out / "runs" / "cpp" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 2  # the first draw and one resample round, all logged
    final = json.loads((runs.out / "cpp" / "final_eval.json").read_text())["after"]
    assert final["eval/compile_rate"] == 0 and final["eval/avg_score"] == 0
    assert "| Compile Rate | 0.00% |" in runs.cpp.stdout


def test_tinylora_trains_exactly_u_parameters(runs):
    """32 trainable float32 scalars; between two checkpoints they, and nothing else, change."""
    from safetensors.torch import load_file

    check_ran(runs.tinylora)
    steps = train_steps(runs.out / "runs" / "tinylora")
    assert all(rec["train/trainable_params"] == 32 for rec in steps.values())
    assert steps[1]["train/forward_sequences"] > 0  # a gradient to follow
    first = load_file(runs.out / "tinylora" / "checkpoint-1" / "adapter_model.safetensors")
    second = load_file(runs.out / "tinylora" / "checkpoint-2" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert len(changed) == 1 and "tinylora_v" in changed[0]
    assert first[changed[0]].numel() == 32 and first[changed[0]].dtype == torch.float32


def test_value_outside_the_choices_exits_2_naming_the_option(capsys, tmp_path):
    import train_grpo_lora

    with pytest.raises(SystemExit) as exit_info:
        train_grpo_lora.main(["--output_dir", str(tmp_path), "--loss_type", "ppo"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--loss_type" in last and "invalid choice" in last


def test_drop_kl_and_several_iterations_end_to_end(runs):
    """The tinylora run: dropped groups are out of the loss, the KL to the reference (the base,
    adapter off) is logged and positive, and the second update of a rollout sees rho != 1."""
    check_ran(runs.tinylora)
    steps = train_steps(runs.out / "runs" / "tinylora")
    for rec in steps.values():
        assert rec["rollout/frac_dropped"] == rec["rollout/frac_reward_zero_std"]
        kept_groups = round(8 * (1 - rec["rollout/frac_dropped"]))
        assert rec["train/loss_sequences"] <= 4 * kept_groups
        assert rec["train/forward_sequences"] == rec["train/loss_sequences"]  # beta > 0: all run
        assert rec["train/kl"] > 0
    config = json.loads((runs.out / "runs" / "tinylora" / "config.json").read_text())
    assert config["computed"]["epsilon_high"] == 0.28
    rows = [json.loads(x) for x in (runs.out / "runs" / "tinylora" / "samples.jsonl").open()]
    assert len(rows) == 2 * 32  # dropped groups are logged too, without an advantage
    for step, rec in steps.items():
        unscored = [r for r in rows if r["step"] == step and r["advantage"] is None]
        assert len(unscored) == round(32 * rec["rollout/frac_dropped"])
