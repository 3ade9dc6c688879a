"""coderl/logprobs.py: the packed batch and the one tempered log-prob function every trainer uses,
against the full-vocabulary computation over whole right-padded rows and against hand numbers."""

from __future__ import annotations

import pytest
import torch

from coderl.logprobs import completion_logprobs, micro_batches, pack_rows, reference_logprobs
from tests.helpers import full_vocab_logprobs, full_vocab_logprobs_of_batch, tiny_lora_model

PROMPTS = [[1, 5, 9], [1, 8, 2, 2, 4], [1, 5, 9]]
COMPLETIONS = [[14, 3, 7], [11], [6, 6, 12, 13]]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, _ = tiny_lora_model(tiny_model_dir)
    model.eval()
    return model


def test_packing_stores_each_prompt_once_left_padded_and_completions_right_padded():
    batch = pack_rows(PROMPTS, COMPLETIONS, pad_id=0)
    assert batch.row_prompt.tolist() == [0, 1, 0]
    assert batch.prompt_ids.tolist() == [[0, 0, 1, 5, 9], [1, 8, 2, 2, 4]]
    assert batch.prompt_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[14, 3, 7, 0], [11, 0, 0, 0], [6, 6, 12, 13]]
    assert batch.completion_positions.tolist() == [[3, 4, 5, 6], [5, 6, 7, 8], [3, 4, 5, 6]]
    part = batch.rows([2, 0])  # only the prompt the rows continue, its padding trimmed
    assert part.prompt_ids.tolist() == [[1, 5, 9]] and part.row_prompt.tolist() == [0, 0]
    assert part.completion_ids.tolist() == [[6, 6, 12, 13], [14, 3, 7, 0]]
    assert micro_batches([4, 7, 9, 12, 15], 2) == [[4, 7], [9, 12], [15]]


def test_log_probs_are_the_tempered_policy_shifted_before_gathering(policy):
    """Column j holds log p_T(y_j | x, y_<j) under softmax(logits / T), by hand on one row."""
    batch = pack_rows(PROMPTS[:1], COMPLETIONS[:1], pad_id=0)
    with torch.no_grad():
        out = completion_logprobs(policy, batch, temperature=0.5, with_entropy=True)
        logits = policy(input_ids=torch.tensor([PROMPTS[0] + COMPLETIONS[0]])).logits.float()
    for j, token in enumerate(COMPLETIONS[0]):
        by_hand = torch.log_softmax(2 * logits[0, len(PROMPTS[0]) - 1 + j], -1)
        assert out.logprobs[0, j].item() == pytest.approx(by_hand[token].item(), abs=1e-5)
        entropy = -(by_hand.exp() * by_hand).sum().item()
        assert out.entropy[0, j].item() == pytest.approx(entropy, abs=1e-5)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_equal_to_the_full_vocabulary_computation_with_gradients(policy, share_prompts):
    """Log-probs, entropies (with gradient), hidden states and every gradient equal those of the
    full-vocabulary pass over each whole row; padding columns are exactly 0."""
    batch = pack_rows(PROMPTS, COMPLETIONS, pad_id=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    results = []
    for compute in (completion_logprobs, full_vocab_logprobs_of_batch):
        out = compute(
            policy, batch, 0.7, with_entropy=True, entropy_grad=True, with_hidden=True,
            share_prompts=share_prompts,
        )  # fmt: skip
        loss = (out.logprobs * torch.arange(1.0, 5.0)).sum() - out.entropy.sum()
        loss = loss + out.hidden.pow(2).mean()
        results.append((out, torch.autograd.grad(loss, params)))
    (ours, grads), (reference, expected) = results
    mask = batch.completion_mask.bool()
    for name in ("logprobs", "entropy"):
        torch.testing.assert_close(
            getattr(ours, name), getattr(reference, name), rtol=1e-5, atol=1e-5
        )
        assert torch.equal(getattr(ours, name)[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(ours.hidden[mask], reference.hidden[mask], rtol=1e-5, atol=1e-5)
    assert any(float(g.abs().max()) > 1e-6 for g in expected)
    for g, e in zip(grads, expected, strict=True):
        # fp32: another summation order (one prompt pass for two rows) moves a sum by a few ulps
        # of its largest terms, so the absolute bound scales with the tensor.
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_reference_is_the_base_model_without_gradient(policy):
    batch = pack_rows(PROMPTS, COMPLETIONS, pad_id=0)
    ref = reference_logprobs(policy, batch, 0.7)
    assert not ref.requires_grad
    with torch.no_grad(), policy.disable_adapter():
        ids = torch.tensor([PROMPTS[1] + COMPLETIONS[1]])
        full, _ = full_vocab_logprobs(policy, ids, torch.ones_like(ids), 0.7)
    assert ref[1, 0].item() == pytest.approx(full[0, -1].item(), abs=1e-5)
    with torch.no_grad():
        adapted = completion_logprobs(policy, batch, 0.7).logprobs
    assert not torch.allclose(ref, adapted)  # the adapter (B off zero) does matter
