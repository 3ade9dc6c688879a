"""coderl.dropout: GapDropout drops each element independently with probability p (rate,
neighbours, halves), scales the kept ones as torch's dropout does, masks the gradient the same
way, is reproducible under a seed, and replaces LoRA's dropouts without touching the weights."""

from __future__ import annotations

import math

import pytest
import torch

from coderl.dropout import GapDropout, dropped_positions, use_gap_dropout

N = 1_000_000


def sigmas(observed: float, p: float, n: int) -> float:
    """How many standard deviations a Binomial(n, p) frequency ``observed`` is from p."""
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_each_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    dropped = torch.zeros(N, dtype=torch.bool)
    dropped[dropped_positions(N, p)] = True
    assert sigmas(dropped.float().mean().item(), p, N) < 6
    halves = dropped.view(2, -1).float().mean(dim=1)
    assert all(sigmas(h.item(), p, N // 2) < 6 for h in halves)  # no drift along the tensor
    both = (dropped[:-1] & dropped[1:]).float().mean().item()  # neighbours: p^2 if independent
    assert sigmas(both, p * p, N - 1) < 6
    after_drop = dropped[1:][dropped[:-1]].float().mean().item()  # P(drop | previous dropped)
    assert sigmas(after_drop, p, int(dropped[:-1].sum())) < 6


def test_forward_scales_kept_elements_and_backward_masks_the_gradient():
    torch.manual_seed(1)
    drop = GapDropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights * kept * (1 / 0.75), rtol=0, atol=0)


def test_non_contiguous_input_and_same_masks_for_the_same_seed():
    x = torch.randn(40, 50).t()  # a transposed view
    drop = GapDropout(0.1).train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    second = drop(x)
    assert torch.equal(first, second)
    kept = first != 0
    torch.testing.assert_close(first[kept], x[kept] * (1 / 0.9), rtol=0, atol=0)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(8, 8)
    assert GapDropout(0.5).eval()(x) is x
    assert GapDropout(0.0).train()(x) is x


def test_use_gap_dropout_replaces_lora_dropouts_and_keeps_the_outputs_in_eval():
    from transformers import LlamaConfig, LlamaForCausalLM

    from coderl.adapters import add_adapter

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = add_adapter(LlamaForCausalLM(config), r=2, alpha=4, dropout=0.1)
    lora_dropouts = [m for n, m in model.named_modules() if "lora_dropout." in n]
    assert lora_dropouts and all(type(m) is torch.nn.Dropout for m in lora_dropouts)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_gap_dropout(model) == len(lora_dropouts)
    swapped = [m for n, m in model.named_modules() if "lora_dropout." in n]
    assert all(isinstance(m, GapDropout) and m.p == 0.1 for m in swapped)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert model.state_dict().keys() == state.keys()
    assert use_gap_dropout(model) == 0  # nothing plain left
