"""The RL scripts' log-probs on the real model (SmolLM2-135M-Instruct, fp32): normalised on the
completion positions only, they are the full-vocabulary numbers. The tiny model's vocabulary of
1024 cannot show the 49152 of a real one (a wider row, another matrix-product blocking)."""

from __future__ import annotations

import pytest
import torch

import train_ppo_lora as ppo
import train_rl_lora as rl
from coderl.models import add_adapter, load_model
from coderl.training import pack_sequences
from tests.helpers import full_vocab_logprobs, move_lora_b_off_zero

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
    """Two right-padded rows whose prompts and completions differ in length."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return pack_sequences(
        [encode(p) for p in PROMPTS], [encode(c) for c in COMPLETIONS], tokenizer.pad_token_id
    )


def assert_on_mask(value, reference, mask):
    """Equal to ``reference`` where ``mask`` is 1 (fp32 tolerance), 0 elsewhere."""
    keep = mask.bool()
    torch.testing.assert_close(value[keep], reference[keep], rtol=1e-6, atol=1e-5)
    assert torch.equal(value[~keep], torch.zeros_like(value[~keep]))


def test_completion_logprobs_are_the_full_vocabulary_ones(policy):
    model, tokenizer = policy
    ids, att, mask = packed_rows(tokenizer)
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]
    assert model.config.vocab_size > 40_000
    head = ppo.ValueHead(model.config.hidden_size)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        logprobs, entropy = rl.sampling_logprobs(
            model, ids, att, TEMPERATURE, return_entropy=True, completion_mask=mask
        )
        ref_logprobs, ref_entropy, hidden = full_vocab_logprobs(
            model, ids, att, TEMPERATURE, hidden=True
        )
        with_value = ppo.PolicyWithValue(model, head)
        ppo_logprobs, ppo_entropy, values = with_value(ids, att, TEMPERATURE, mask=mask)
        base = with_value.reference_logprobs(ids, att, TEMPERATURE, mask=mask)
        with model.disable_adapter():
            ref_base, _ = full_vocab_logprobs(model, ids, att, TEMPERATURE)
    assert_on_mask(logprobs, ref_logprobs, mask)  # REINFORCE
    assert_on_mask(entropy, ref_entropy, mask)
    assert_on_mask(ppo_logprobs, ref_logprobs, mask)  # PPO
    assert_on_mask(ppo_entropy, ref_entropy, mask)
    assert_on_mask(base, ref_base, mask)
    assert not torch.allclose(ref_base * mask, ref_logprobs * mask)  # the adapter does matter
    torch.testing.assert_close(values, head(hidden[:, :-1]), rtol=0, atol=0)  # every position
