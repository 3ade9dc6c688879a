"""Shared fixtures: a tiny model built once per test session, offline.

The Hugging Face libraries are put in offline mode before anything imports them, so no test can
reach the network (an unknown hub id fails at once instead of retrying for half a minute).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine's few cores are shared by concurrent test runs; with more than one intra-op thread
# per process OpenMP oversubscribes them (a 256x64 SVD took ~0.4 s with 2 threads under load,
# ~4 ms with 1), so each test process computes on one thread.
torch.set_num_threads(1)

TINY_TEST_MODEL = dict(
    arch="llama", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, seed=0
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a tiny random-init Llama (vocab 1024, hidden 64, 2 layers) and its tokenizer."""
    from coderl.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    return str(build_tiny_model(out, **TINY_TEST_MODEL, max_corpus_bytes=200_000))


@pytest.fixture(scope="session")
def model_and_tokenizer(tiny_model_dir):
    """The tiny model and its tokenizer, loaded once (the generation tests share them)."""
    from coderl.models import load_model

    return load_model(tiny_model_dir)


REAL_MODEL_COMMAND = (
    "python prepare_model.py smollm2-135m-instruct --out_dir checkpoints/smollm2-135m-instruct"
)


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    """The converted SmolLM2-135M-Instruct (``$CODERL_REAL_MODEL`` or checkpoints/ in the repo).

    Missing, it fails under CI (``$CI`` set: .ci/run prepares it, so its absence is a defect) and
    skips elsewhere with the command that gets it.
    """
    from pathlib import Path

    default = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
    folder = Path(os.environ.get("CODERL_REAL_MODEL", default))
    if not (folder / "config.json").is_file():
        message = f"no converted real model at {folder}; get it with: {REAL_MODEL_COMMAND}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(folder)


# Fixtures shared by the training scripts' tests (toy data, an SFT'd tiny adapter).
pytest_plugins = ["tests.training_fixtures"]
