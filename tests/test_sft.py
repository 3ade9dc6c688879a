"""train_sft_lora.py: options and errors, tokenization, the masked loss by hand, and the per-token
gradient over an accumulation window. The runs end to end (LoRA fp32, QLoRA 4-bit, TinyLoRA, exact
resume, learning the toy family, two processes) are in tests/test_sft_runs.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import train_sft_lora as sft
from coderl import sft_data
from coderl.adapters import add_adapter
from coderl.models import load_model, load_tokenizer
from coderl.prompts import completion_for_sandbox, encode_prompt, render_prompt
from coderl.rollouts import prompt_token_ids
from coderl.tasks import load_tasks, write_jsonl
from coderl.training import ModelArgs
from tests.helpers import (
    fake_run,
    full_vocab_logprobs,
    move_lora_b_off_zero,
    record_packed_layouts,
    run_script,
    tiny_lora_model,
)

FIXTURES = Path(__file__).parent / "fixtures"


def python_task(toy_data_dir, index: int = 0) -> dict:
    return load_tasks(toy_data_dir / "toy_python_train.jsonl")[index]


def cpp_task(toy_data_dir, index: int = 0) -> dict:
    return load_tasks(toy_data_dir / "toy_cpp_train.jsonl")[index]


# --------------------------------------------------------------------------- options and errors


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for args_type in (ModelArgs, sft.SFTTrainArgs, sft.SFTDataArgs):
        for f in dataclasses.fields(args_type):
            assert f"--{f.name}" in out, f.name
            assert f.metadata.get("help"), f"--{f.name} has no help"
    assert "--config" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "missing.jsonl"], "file not found: missing.jsonl"),
        (["--train_file", str(FIXTURES / "tasks_bad_json.jsonl")], "tasks_bad_json.jsonl:"),
        (
            ["--train_file", str(FIXTURES / "tasks_missing_field.jsonl")],
            "tasks_missing_field.jsonl:",
        ),
        ([], "--train_file is required"),
        (["--train_file", "x.jsonl", "--max_length", "1"], "--max_length"),
        (["--train_file", "x.jsonl", "--eval_every", "5"], "--eval_every needs --eval_file"),
        (["--train_file", "x.jsonl", "--adapter", "bogus"], "bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--model", "unused", "--output_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) >= 1 and message in err_lines[-1]
    if "bogus" not in message:  # argparse prints usage first for a bad choice; ours is one line
        assert len(err_lines) == 1 and err_lines[0].startswith("error: ")


def test_bad_input_as_a_user_sees_it(tmp_path):
    proc = run_script(
        "train_sft_lora.py",
        ["--model", "m", "--output_dir", "o", "--train_file", "nope.jsonl"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: file not found: nope.jsonl"]


def test_a_task_file_without_solutions_is_refused(tmp_path, capsys):
    rows = [
        {
            "task_id": "t/0",
            "prompt": "def f():\n",
            "entry_point": "f",
            "test": "def check(candidate):\n    assert candidate() == 1\n",
        }
    ]
    write_jsonl(tmp_path / "nosol.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(
            [
                "--model",
                "unused",
                "--output_dir",
                "o",
                "--train_file",
                str(tmp_path / "nosol.jsonl"),
            ]
        )
    assert exit_info.value.code == 2
    assert "no task has a canonical_solution" in capsys.readouterr().err


# --------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("mode", ["base", "instruct"])
@pytest.mark.parametrize("family", ["python", "cpp"])
def test_prompt_ids_are_generations_and_the_target_ends_as_inference_does(
    tiny_model_dir, toy_data_dir, family, mode
):
    """Base mode ends on EOS; instruct mode on the template's end-of-turn ``<|im_end|>``, which is
    not the tokenizer's EOS here: the token a chat model emits to end its answer."""
    tokenizer = load_tokenizer(tiny_model_dir)
    task = python_task(toy_data_dir) if family == "python" else cpp_task(toy_data_dir)
    example = sft_data.encode_example(task, tokenizer, mode)
    prompt = render_prompt(task, tokenizer, mode)
    assert list(example.prompt_ids) == encode_prompt(tokenizer, prompt)
    assert list(example.prompt_ids) == prompt_token_ids(tokenizer, prompt)
    assert example.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in example.target_ids
    end = "<|endoftext|>" if mode == "base" else "<|im_end|>"
    assert tokenizer.convert_ids_to_tokens(example.target_ids[-1]) == end
    assert tokenizer.eos_token == "<|endoftext|>"
    target = tokenizer.decode(list(example.target_ids[:-1]))
    assert target == sft_data.target_text(task, mode)
    if mode == "base":
        # Exactly the canonical solution: indentation kept, nothing stripped.
        assert target == task["canonical_solution"]
    else:
        assert target.startswith(f"```{task['language']}\n") and target.endswith("```")


def test_batch_masks_the_prompt_and_padding(tiny_model_dir, toy_data_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = [python_task(toy_data_dir, 0), python_task(toy_data_dir, 1), cpp_task(toy_data_dir)]
    examples = [sft_data.encode_example(t, tokenizer, "base") for t in tasks]
    input_ids, attention, loss_mask = sft_data.collate(examples, tokenizer.pad_token_id)
    width = max(ex.num_tokens for ex in examples)
    assert input_ids.shape == (3, width) and loss_mask.shape == (3, width - 1)
    for row, ex in enumerate(examples):
        n, p = ex.num_tokens, len(ex.prompt_ids)
        assert input_ids[row, :n].tolist() == [*ex.prompt_ids, *ex.target_ids]
        assert attention[row].tolist() == [1] * n + [0] * (width - n)
        # loss_mask[t-1] says whether token t is learned: the target tokens only, end token included.
        assert loss_mask[row].tolist() == [0.0] * (p - 1) + [1.0] * (n - p) + [0.0] * (width - n)


@pytest.mark.parametrize("mode", ["base", "instruct"])
def test_loss_on_target_positions_only_equals_the_full_vocabulary_loss(
    tiny_model_dir, toy_data_dir, mode
):
    """The output head and log-softmax run on the target positions only; loss and gradients are
    those of the full computation (every position's log-softmax, masked after)."""
    model, tokenizer = load_model(tiny_model_dir)
    model = add_adapter(model, "lora", r=4, alpha=8, dropout=0.0)
    move_lora_b_off_zero(model, std=0.05)
    tasks = [python_task(toy_data_dir, 0), python_task(toy_data_dir, 1), cpp_task(toy_data_dir)]
    examples = [sft_data.encode_example(t, tokenizer, mode) for t in tasks]
    input_ids, attention, loss_mask = sft_data.collate(examples, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    fast = sft.summed_token_nll(model, sft_data.pack_examples(examples, tokenizer.pad_token_id))
    fast_grads = torch.autograd.grad(fast, params)
    full = -(full_vocab_logprobs(model, input_ids, attention)[0] * loss_mask).sum()
    full_grads = torch.autograd.grad(full, params)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-4)
    for got, want in zip(fast_grads, full_grads, strict=True):
        # The body runs packed here and padded there: float32 rounding differs by ~1e-6 of the
        # gradient's scale, far above an absolute 1e-7 on entries of size ~5.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert fast.item() > 0 and loss_mask.sum() < loss_mask.numel()


def test_overlong_examples_are_dropped_or_truncated_and_counted(tiny_model_dir, toy_data_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:30]
    examples = [sft_data.encode_example(t, tokenizer, "base") for t in tasks]
    limit = sorted(ex.num_tokens for ex in examples)[len(examples) // 2]
    over = [ex for ex in examples if ex.num_tokens > limit]
    # Truncation cuts the target; an example whose prompt alone fills the budget is dropped.
    no_room = sum(len(ex.prompt_ids) >= limit for ex in over)
    assert over and len(over) > no_room
    dropped = sft_data.build_examples(tasks, tokenizer, "base", limit, "drop")
    assert dropped.dropped_overlong == len(over) and len(dropped.examples) == 30 - len(over)
    assert all(ex.num_tokens <= limit for ex in dropped.examples)
    cut = sft_data.build_examples(tasks, tokenizer, "base", limit, "truncate")
    assert cut.truncated_overlong == len(over) - no_room and cut.dropped_overlong == no_room
    assert len(cut.examples) == 30 - no_room
    assert max(ex.num_tokens for ex in cut.examples) == limit


@pytest.mark.parametrize("mode", ["base", "instruct"])
def test_the_target_is_a_program_the_sandbox_passes(tiny_model_dir, toy_data_dir, mode):
    """What SFT teaches, put through the inference path, passes the task's own tests."""
    from sandbox import Sandbox

    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = [python_task(toy_data_dir, 0), python_task(toy_data_dir, 1), cpp_task(toy_data_dir)]
    jobs = []
    for task in tasks:
        example = sft_data.encode_example(task, tokenizer, mode)
        text = tokenizer.decode(list(example.target_ids[:-1]))  # generation drops the end token
        prompt = render_prompt(task, tokenizer, mode)
        jobs.append((task, completion_for_sandbox(task, prompt, text, mode)))
    with Sandbox(workers=1, timeout=10.0) as box:
        results = box.run_batch(jobs)
    assert [r.status for r in results] == ["passed"] * len(tasks)


# --------------------------------------------------------------------------- the loss


def full_token_nll(model, examples, pad_id: int) -> torch.Tensor:
    """The computation the step replaced: right-padded whole rows, the output head and
    log-softmax at every position, the target positions summed."""
    input_ids, attention, loss_mask = sft_data.collate(examples, pad_id)
    return -(full_vocab_logprobs(model, input_ids, attention)[0] * loss_mask).sum()


def test_masked_loss_equals_hand_computation(tiny_model_dir, toy_data_dir):
    model, tokenizer = load_model(tiny_model_dir)
    tasks = [python_task(toy_data_dir, 2), cpp_task(toy_data_dir, 1)]
    examples = [sft_data.encode_example(t, tokenizer, "base") for t in tasks]
    with torch.no_grad():
        got = sft.summed_token_nll(model, sft_data.pack_examples(examples, tokenizer.pad_token_id))
        expected, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([[*ex.prompt_ids, *ex.target_ids]])
            logits = model(input_ids=ids).logits[0].double()  # one unpadded row at a time
            for j, token in enumerate(ex.target_ids):
                position = len(ex.prompt_ids) + j  # token at `position` predicted from position-1
                expected -= torch.log_softmax(logits[position - 1], dim=-1)[token].item()
                count += 1
    assert count == sum(len(ex.target_ids) for ex in examples)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # A random-init model is near-uniform over the vocabulary: a sanity check of the scale.
    assert expected / count == pytest.approx(math.log(len(tokenizer)), rel=0.1)


def make_trainable_model(tiny_model_dir):
    model, tokenizer = tiny_lora_model(tiny_model_dir)
    model.eval()  # no dropout anywhere: the two computations below must see the same function
    return model, tokenizer


def test_step_gradient_is_the_per_token_mean_over_the_whole_step(tiny_model_dir, toy_data_dir):
    """Two micro-batches of different sizes and lengths: the update equals -lr * grad of
    (sum of every target token's loss in the step) / (target tokens in the step)."""
    model, tokenizer = make_trainable_model(tiny_model_dir)
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:3]
    examples = [sft_data.encode_example(t, tokenizer, "base") for t in tasks]
    micro_batches = [examples[:2], examples[2:]]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    total = sum(len(ex.target_ids) for ex in examples)
    loss = full_token_nll(model, examples, tokenizer.pad_token_id) / total
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = {n: -g for n, g in zip(params, grads)}

    run = fake_run(accumulation=2)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared_model, optimizer = run.accelerator.prepare(model, optimizer)
    metrics = sft.train_step(
        run, prepared_model, optimizer, scheduler, micro_batches, tokenizer.pad_token_id, 0.0
    )
    assert metrics["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["train/loss_tokens"] == total
    for name, param in params.items():
        torch.testing.assert_close(
            param.detach() - before[name], expected[name], atol=1e-6, rtol=1e-4
        )


@pytest.fixture
def layouts(monkeypatch) -> list:
    return record_packed_layouts(monkeypatch)


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_instruct_step_runs_the_template_once_and_equals_the_full_computation(
    which, request, toy_data_dir, layouts
):
    """Instruct prompts open with the same chat-template tokens: without dropout that prefix runs
    once per micro-batch and every row attends to it. Loss and update equal the full computation's
    over right-padded rows (float32: gradients within a few 1e-5 of their scale)."""
    model_dir = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "real_model_dir")
    model, tokenizer = load_model(model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.0)
    move_lora_b_off_zero(model)
    model.train()  # dropout 0: train mode is the training path, the same function as eval
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:5]
    examples = [sft_data.encode_example(t, tokenizer, "instruct") for t in tasks]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = sum(len(ex.target_ids) for ex in examples)
    reference = full_token_nll(model, examples, tokenizer.pad_token_id) / total
    expected = torch.autograd.grad(reference, list(params.values()))

    run = fake_run(accumulation=2)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared_model, optimizer = run.accelerator.prepare(model, optimizer)
    micro_batches = [examples[:3], examples[3:]]
    metrics = sft.train_step(
        run, prepared_model, optimizer, scheduler, micro_batches, tokenizer.pad_token_id, 0.0
    )
    assert metrics["train/loss"] == pytest.approx(reference.item(), rel=1e-5)
    for (name, param), grad in zip(params.items(), expected, strict=True):
        update = before[name] - param.detach()
        torch.testing.assert_close(update, grad, rtol=1e-5, atol=5e-5 * float(grad.abs().max()))
    prefix = min(len(ex.prompt_ids) for ex in examples)
    for layout, batch in zip(layouts, micro_batches, strict=True):
        shared = layout.segments.sizes[0]
        assert shared >= 5 and all(
            ex.prompt_ids[:shared] == batch[0].prompt_ids[:shared] for ex in batch
        )
        assert shared < prefix and layout.segments.context[0] == ()
        assert all(0 in context for context in layout.segments.context[1:])
        real = sum(ex.num_tokens - 1 for ex in batch)  # the last target token is never an input
        assert layout.input_ids.shape[1] == real - (len(batch) - 1) * shared


def test_with_dropout_every_row_runs_whole(tiny_model_dir, toy_data_dir, layouts):
    """Rows that shared a prefix would share its dropout masks: with dropout on, nothing is
    shared (each row one segment, its own masks), and still no padding."""
    model, tokenizer = load_model(tiny_model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.1)
    assert sft.prepare_model(model) > 0  # LoRA's dropouts, drawn as gaps
    model.train()
    tasks = load_tasks(toy_data_dir / "toy_python_train.jsonl")[:3]
    examples = [sft_data.encode_example(t, tokenizer, "instruct") for t in tasks]
    nll = sft.summed_token_nll(model, sft_data.pack_examples(examples, tokenizer.pad_token_id))
    nll.backward()
    (layout,) = layouts
    assert layout.segments.context == [(), (), ()]
    assert layout.input_ids.shape[1] == sum(ex.num_tokens - 1 for ex in examples)


def test_training_moves_the_adapter_and_never_the_base(tiny_model_dir, toy_data_dir):
    from coderl.training import build_optimizer

    model, tokenizer = make_trainable_model(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapter and all("lora_" in n for n in adapter)
    examples = [
        sft_data.encode_example(t, tokenizer, "base")
        for t in load_tasks(toy_data_dir / "toy_python_train.jsonl")[:4]
    ]
    args = sft.SFTTrainArgs(output_dir="x", learning_rate=1e-2, weight_decay=0.1, max_steps=2)
    optimizer, scheduler = build_optimizer([p for p in model.parameters() if p.requires_grad], args)
    run = fake_run(accumulation=2)
    prepared_model, optimizer = run.accelerator.prepare(model, optimizer)
    prepared_model.train()
    for _ in range(2):
        sft.train_step(
            run, prepared_model, optimizer, scheduler, [examples[:2], examples[2:]], 0, 1.0
        )
    after = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(after[name].detach(), value), name
    for name, value in adapter.items():
        assert not torch.equal(after[name].detach(), value), name


def test_steps_from_epochs():
    assert sft_data.steps_for_epochs(500, 1.0, 8) == 63
    assert sft_data.steps_for_epochs(500, 2.5, 16) == 79
    assert sft_data.steps_for_epochs(3, 0.1, 8) == 1
    args = sft.SFTTrainArgs(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert sft_data.resolve_max_steps(args, 100, num_processes=2) == 7
    assert sft_data.resolve_max_steps(dataclasses.replace(args, max_steps=5), 100, 2) == 5
