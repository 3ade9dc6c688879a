"""coderl.logprobs' padding-free pass: the packed layout by hand, and log-probs, entropies, hidden
states and gradients equal to the full-vocabulary computation over padded rows (tiny Llama and
Qwen2 with grouped-query attention, and the real model), whatever is shared."""

from __future__ import annotations

import pytest
import torch

from coderl import logprobs as lp
from coderl.adapters import add_adapter
from tests.helpers import (
    full_vocab_logprobs_of_batch,
    move_lora_b_off_zero,
    record_packed_layouts,
)

TEMPLATE = [5, 6, 7, 8, 9]  # an opening every prompt shares, as a chat template's
# Distinct prompts of several lengths (one right after the template) and completions of 4, 7, 1.
DISTINCT = (
    [TEMPLATE + [11, 12, 13], TEMPLATE + [14, 15, 16, 17, 18, 19], TEMPLATE + [20]],
    [[30, 31, 32, 33], [34, 35, 36, 37, 38, 39, 40], [41]],
)
# Two groups of two rows on one prompt each, one completion empty, one of a single token.
GROUPS = (
    [TEMPLATE + [11, 12], TEMPLATE + [11, 12], TEMPLATE + [21, 22, 23], TEMPLATE + [21, 22, 23]],
    [[30, 31, 32], [], [33, 34, 35, 36, 37], [38]],
)
SHARING = [(False, False), (True, False), (False, True), (True, True)]
LORA_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def random_policy(arch: str, kv_heads: int):
    """A random 2-layer model with a LoRA off identity, dropout off."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**config))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**config))
    model = add_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=LORA_MODULES)
    move_lora_b_off_zero(model, std=0.1)
    return model.eval()


@pytest.fixture(scope="module", params=[("llama", 4), ("qwen2", 2)], ids=["llama", "qwen2-gqa"])
def policy(request):
    return random_policy(*request.param)


@pytest.fixture
def layouts(monkeypatch) -> list:
    return record_packed_layouts(monkeypatch)


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_of(logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every column differently, so a misplaced token changes the gradient."""
    weights = torch.linspace(0.5, 1.5, logprobs.numel()).reshape(logprobs.shape)
    return -(weights * logprobs).sum() + 0.1 * (weights.flip(0) * entropy).sum()


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, scale_rtol: float = 1e-5):
    """float32 sums of many products in another order: each entry within ``scale_rtol`` of the
    tensor's scale (its largest entry), not of its own value (small entries are differences)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=scale_rtol * float(want.abs().max()))


def assert_same_as_reference(model, prompts, completions, share_prompts, share_prefix):
    """Padding-free results and gradients against the full-vocabulary reference."""
    temperature = 0.7
    batch = lp.pack_rows(prompts, completions, pad_id=0)
    got = lp.completion_logprobs(
        model,
        batch,
        temperature,
        with_entropy=True,
        entropy_grad=True,
        with_hidden=True,
        share_prompts=share_prompts,
        padding_free=True,
        share_prefix=share_prefix,
    )
    want = full_vocab_logprobs_of_batch(
        model, batch, temperature, with_entropy=True, entropy_grad=True, with_hidden=True
    )
    mask = batch.completion_mask.bool()
    # Log-probs are differences of logits of size ~10-30: float32 rounds those at a few 1e-6,
    # so a few 1e-5 absolute on the result.
    torch.testing.assert_close(got.logprobs, want[0] * mask, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got.entropy, want[1] * mask, rtol=1e-5, atol=5e-5)
    assert_close_to_scale(got.hidden[mask], want[2][mask])
    params = trainable(model)
    got_grads = torch.autograd.grad(loss_of(got.logprobs, got.entropy), params)
    want_grads = torch.autograd.grad(loss_of(want[0] * mask, want[1] * mask), params)
    for g, w in zip(got_grads, want_grads, strict=True):
        # Gradients pass back through every layer and the vocabulary's softmax: float32 rounding
        # reaches a few 1e-5 of their scale (the padded passes differ from the reference as much).
        assert_close_to_scale(g, w, scale_rtol=5e-5)
    assert any(g.abs().max() > 0 for g in got_grads)
    return got


@pytest.mark.parametrize("rows", [DISTINCT, GROUPS], ids=["distinct", "groups"])
@pytest.mark.parametrize("share_prompts, share_prefix", SHARING)
def test_padding_free_equals_the_full_vocabulary_computation(
    policy, layouts, rows, share_prompts, share_prefix
):
    prompts, completions = rows
    got = assert_same_as_reference(policy, prompts, completions, share_prompts, share_prefix)
    assert not got.hidden[~lp.pack_rows(prompts, completions, 0).completion_mask.bool()].any()
    (layout,) = layouts
    real = sum(len(p) + max(len(c) - 1, 0) for p, c in zip(prompts, completions) if c)
    packed = layout.input_ids.shape[1]
    if share_prefix:  # the template runs once instead of once per row with a completion
        assert packed <= real - (sum(1 for c in completions if c) - 1) * len(TEMPLATE)
    else:
        assert packed <= real
    assert policy.config._attn_implementation != lp.PACKED_ATTENTION  # switched back after


def test_layout_by_hand():
    """Prompts [1 2 3 4] (rows 0 and 2) and [1 2 5] (row 1); completions [7 8], [9], [6 6 6]."""
    batch = lp.pack_rows([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4]], [[7, 8], [9], [6, 6, 6]], 0)
    each = lp.packed_layout(batch, share_prompts=False, share_prefix=False)
    assert each.input_ids.tolist() == [[1, 2, 3, 4, 7, 1, 2, 5, 1, 2, 3, 4, 6, 6]]
    assert each.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert each.segments.sizes == [5, 3, 6] and each.segments.context == [(), (), ()]
    assert each.predict_at.tolist() == [3, 4, 7, 11, 12, 13]  # row 0's two tokens, row 1's, ...

    tree = lp.packed_layout(batch, share_prompts=True, share_prefix=True)
    # [1 2] once; [3 4] and [5] after it; then each completion after its prompt (row 1's single
    # token needs no input: it is predicted by its prompt's last token).
    assert tree.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 6, 6]]
    assert tree.position_ids.tolist() == [[0, 1, 2, 3, 2, 4, 4, 5]]
    assert tree.segments.sizes == [2, 2, 1, 1, 2]
    assert tree.segments.context == [(), (0,), (0,), (0, 1), (0, 1)]
    assert tree.predict_at.tolist() == [3, 5, 4, 3, 6, 7]
    assert tree.segments.masks[0] is None
    assert tree.segments.masks[1].tolist() == [[True, True, True, False], [True] * 4]
    assert tree.segments.masks[4].tolist() == [
        [True, True, True, True, True, False],
        [True] * 6,
    ]


def test_checkpointing_or_an_unsupported_model_takes_the_padded_passes(layouts, monkeypatch):
    model = random_policy("llama", 4)
    prompts, completions = DISTINCT
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0: train mode changes nothing but checkpointing
    assert_same_as_reference(model, prompts, completions, True, True)
    assert layouts == []
    model.gradient_checkpointing_disable()
    base = model.get_base_model()
    monkeypatch.setattr(type(base), "_supports_attention_backend", False)
    assert not lp.padding_free_supported(model)
    assert_same_as_reference(model, prompts, completions, True, True)
    assert layouts == []


def test_attention_is_restored_after_an_error_and_empty_prompts_are_refused(monkeypatch):
    model = random_policy("llama", 4)
    batch = lp.pack_rows(*DISTINCT, pad_id=0)
    before = model.config._attn_implementation

    def broken(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(model.get_base_model().model, "forward", broken)
    with pytest.raises(OSError, match="boom"):
        lp.completion_logprobs(model, batch, padding_free=True)
    assert model.config._attn_implementation == before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="at least one prompt token"):
        lp.completion_logprobs(model, lp.pack_rows([[], [3]], [[4], [5]], 0), padding_free=True)


def test_dropout_active_sees_lora_dropout_in_train_mode_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    with_dropout = add_adapter(LlamaForCausalLM(config), r=2, alpha=4, dropout=0.1)
    without = add_adapter(LlamaForCausalLM(config), r=2, alpha=4, dropout=0.0)
    assert lp.dropout_active(with_dropout.train())
    assert not lp.dropout_active(with_dropout.eval())
    assert not lp.dropout_active(without.train())


def test_real_model_chat_rows_padding_free_with_a_shared_template(real_model_dir, layouts):
    """SmolLM2 (49152 tokens, 9 query heads on 3 key/value heads): chat prompts sharing the
    template's opening, packed with it run once; the same numbers as the full computation."""
    from coderl.models import load_model

    model, tokenizer = load_model(real_model_dir)
    model = add_adapter(model, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj,down_proj")
    move_lora_b_off_zero(model)
    model.eval()
    questions = ["Add two numbers.", "Return the largest item of a list, or None if it is empty."]
    answers = ["def add(a, b):\n    return a + b\n", "def largest(xs):\n    return max(xs)\n"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    completions = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
    assert lp.common_prefix_length(prompts) > 10
    assert_same_as_reference(model, prompts, completions, True, True)
    (layout,) = layouts
    assert layout.segments.context == [(), (0,), (0,), (0, 1), (0, 2)]
