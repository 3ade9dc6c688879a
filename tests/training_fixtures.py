"""Session fixtures shared by the training tests: toy task files and a tiny SFT adapter.

* ``toy_data_dir``: ``toy_python_{train,test}.jsonl`` and ``toy_cpp_{train,test}.jsonl`` written
  once by ``prepare_data.py``'s own functions (the default counts, so tests see the files the
  tiny preset trains on).
* ``sft_run``: one short SFT run of the conftest tiny model on the toy Python family, as a
  subprocess (the script exactly as a user runs it); ``sft_adapter_dir`` is its ``final/``
  adapter, the ``--init_adapter`` of the RL tests.

The SFT run goes through ``tests.helpers.run_script`` (one thread, offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import run_args, run_script

# Cheap on purpose (seconds of training on one core): enough for the loss to fall well below its
# start and for the adapter to move, not a tuned model (greedy pass@1 on held-out toy tasks is
# still 0; about 40% of its completions run and fail). lm_head is adapted too: on a random-init
# model that learns faster in short runs (see train_sft_lora.py's docstring).
SFT_FIXTURE_ARGS = (
    "--learning_rate", "3e-3",
    "--lr_scheduler", "constant",
    "--per_device_train_batch_size", "8",
    "--gradient_accumulation_steps", "1",
    "--max_steps", "40",
    "--save_every", "20",
    "--lora_dropout", "0.0",
    "--lora_r", "16",
    "--lora_alpha", "32",
    "--target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head",
)  # fmt: skip


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """Folder with the toy task files (Python and C++, train and test), made once per session."""
    from coderl.tasks import write_jsonl
    from prepare_data import PrepareDataOptions, prepare_toy

    out = tmp_path_factory.mktemp("toy-data")
    for name, tasks in prepare_toy(PrepareDataOptions(output_dir=str(out))).items():
        write_jsonl(out / f"{name}.jsonl", tasks)
    return out


@dataclass(frozen=True)
class SFTRun:
    output_dir: Path  # checkpoint-<step>/ and final/
    run_dir: Path  # metrics.jsonl, config.json
    stderr: str

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "final"


@pytest.fixture(scope="session")
def sft_run(tiny_model_dir, toy_data_dir, tmp_path_factory) -> SFTRun:
    """A tiny model SFT'd on the toy Python family (LoRA, fp32, CPU)."""
    root = tmp_path_factory.mktemp("sft-fixture")
    args = [
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        "--train_file", str(toy_data_dir / "toy_python_train.jsonl"),
        *run_args(root, "sft"),
        *SFT_FIXTURE_ARGS,
    ]  # fmt: skip
    proc = run_script("train_sft_lora.py", args, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"SFT fixture run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return SFTRun(output_dir=root / "sft", run_dir=root / "runs" / "sft", stderr=proc.stderr)


@pytest.fixture(scope="session")
def sft_adapter_dir(sft_run) -> Path:
    """The ``final/`` adapter folder of :func:`sft_run` (load it with ``--init_adapter``)."""
    return sft_run.adapter_dir
