"""The trainers' log-probs on the real model (SmolLM2-135M-Instruct, fp32): the one log-prob function
(``coderl.logprobs.completion_logprobs``, the head and the log-softmax on completion positions
only) gives the full-vocabulary numbers, for the policy, PPO's policy with a value head and the
reference. The tiny model's vocabulary of 2048 cannot show the 49152 of a real one (a wider row,
another matrix-product blocking)."""

from __future__ import annotations

import pytest
import torch

from coderl.adapters import add_adapter
from coderl.logprobs import completion_logprobs, pack_rows
from coderl.models import load_model
from coderl.value_model import PolicyWithValue, ValueHead
from tests.helpers import full_vocab_logprobs_of_batch, move_lora_b_off_zero

PROMPTS = ["def add(a, b):\n", "# Return the largest item of a list.\ndef largest(xs):\n"]
COMPLETIONS = [
    "    return a + b\n",
    "    best = xs[0]\n    for x in xs:\n        best = max(best, x)\n",
]
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def policy(real_model_dir):
    """The real model with a LoRA adapter moved off its identity (B != 0), dropout off."""
    model, tokenizer = load_model(real_model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    move_lora_b_off_zero(model)
    model.eval()
    return model, tokenizer


def packed_rows(tokenizer):
    """Two rows whose prompts and completions differ in length."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return pack_rows(
        [encode(p) for p in PROMPTS], [encode(c) for c in COMPLETIONS], tokenizer.pad_token_id
    )


def assert_on_mask(value, reference, mask, atol=1e-5):
    """Equal to ``reference`` where ``mask`` is 1 (fp32 tolerance), 0 elsewhere."""
    keep = mask.bool()
    torch.testing.assert_close(value[keep], reference[keep], rtol=1e-6, atol=atol)
    assert torch.equal(value[~keep], torch.zeros_like(value[~keep]))


def test_completion_logprobs_are_the_full_vocabulary_ones(policy):
    model, tokenizer = policy
    batch = packed_rows(tokenizer)
    mask = batch.completion_mask
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]
    assert model.config.vocab_size > 40_000
    head = ValueHead(model.config.hidden_size)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        # One pass per row on both sides: what differs is the head and the log-softmax.
        out = completion_logprobs(model, batch, TEMPERATURE, True, share_prompts=False)
        reference = full_vocab_logprobs_of_batch(model, batch, TEMPERATURE, True, False, True)
        with_value = PolicyWithValue(model, head, share_prompts=False)
        ppo_logprobs, ppo_entropy, values = with_value(batch, TEMPERATURE)
        base = with_value.reference_logprobs(batch, TEMPERATURE)
        with model.disable_adapter():
            ref_base = full_vocab_logprobs_of_batch(model, batch, TEMPERATURE).logprobs
    assert_on_mask(out.logprobs, reference.logprobs, mask)  # REINFORCE, GRPO
    assert_on_mask(out.entropy, reference.entropy, mask)
    assert_on_mask(ppo_logprobs, reference.logprobs, mask)  # PPO
    assert_on_mask(ppo_entropy, reference.entropy, mask)
    assert_on_mask(base, ref_base, mask)
    assert not torch.allclose(ref_base * mask, reference.logprobs * mask)  # the adapter matters
    torch.testing.assert_close(values, head(reference.hidden), rtol=0, atol=0)  # every column


def test_shared_prompt_pass_gives_the_same_numbers(policy):
    """Two rows continuing one prompt: the prompt runs once and both rows attend to its cached
    keys/values; the log-probs are those of one pass per row (fp32 rounding)."""
    model, tokenizer = policy
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    batch = pack_rows(
        [encode(PROMPTS[1])] * 2, [encode(c) for c in COMPLETIONS], tokenizer.pad_token_id
    )
    assert batch.prompt_ids.shape[0] == 1
    with torch.no_grad():
        shared = completion_logprobs(model, batch, TEMPERATURE, share_prompts=True).logprobs
        joint = completion_logprobs(model, batch, TEMPERATURE, share_prompts=False).logprobs
    # Two passes (prompt, then completions on its cache) against one sum the attention in another
    # order: log-probs of size ~10 over a 49152-word vocabulary move by up to a few 1e-5 in fp32,
    # depending even on earlier allocations (measured 3e-6 to 2e-5).
    assert_on_mask(shared, joint, batch.completion_mask, atol=5e-5)
