"""Model loading, quantization, adapters (LoRA / QLoRA / TinyLoRA) and prompt + completion encoding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from coderl.adapters import add_adapter, save_adapter
from coderl.errors import UserError
from coderl.models import (
    BASE_FINGERPRINT_FILE,
    count_parameters,
    describe_model,
    load_model,
    load_tokenizer,
    quantized_compute_dtype,
    resolve_dtype,
)
from coderl.prompts import (
    chat_end_of_turn_id,
    completion_end_id,
    encode_prompt,
    encode_prompt_and_completion,
)
from tests.helpers import correlation

TARGETS_PER_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = torch.tensor([[1, 40, 41, 300, 500, 7, 9, 700]])


def linear_targets(model) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS_PER_LAYER and hasattr(module, "in_features")
    }


def perturb_trainable(model, scale: float = 0.5) -> None:
    """Move the adapter off its identity initialisation so loading it back is a real check."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory) -> str:
    """A second tiny model with another hidden size: adapters of the first one do not fit it."""
    from coderl.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("other-base") / "tiny-other"
    return str(
        build_tiny_model(
            out,
            vocab_size=1024,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            max_corpus_bytes=200_000,
        )
    )


# --------------------------------------------------------------------------------------------------
# Loading


def test_dtype_rules_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert quantized_compute_dtype(cpu) == torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)


def test_load_fp32_and_bf16(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    info = describe_model(model)
    assert info["dtype"] == "float32" and info["quantization"] == "none" and info["device"] == "cpu"
    assert info["adapter"] is None and info["trainable_params"] == info["total_params"]
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert not model.training
    assert tokenizer.pad_token_id is not None

    half, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert describe_model(half)["dtype"] == "bfloat16"
    assert_close_at_bf16_precision(logits(half).float(), logits(model))


def assert_close_at_bf16_precision(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 keeps 8 significant bits: each weight and activation is off by up to eps/2 of its size.

    Through a few matmuls and norms the errors add up to a few eps relative to the logits' scale,
    whatever the CPU's kernels (AMX-bf16 accumulates differently from AVX-512); a broken cast or a
    layer left out is off by the scale itself.
    """
    eps = torch.finfo(torch.bfloat16).eps
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 8 * eps * scale
    assert relative_error(got, want) <= 4 * eps


def test_load_4bit_nf4_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    full, _ = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, quantization="4bit")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * len(
        TARGETS_PER_LAYER
    )  # every projection; the output head stays float
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    for layer in quantized:
        assert layer.compute_dtype == torch.float32
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.state2 is not None  # double quantization
    info = describe_model(model)
    assert info["quantization"] == "4bit" and info["compute_dtype"] == "float32"
    # Counting unpacked 4-bit values gives the same total as the float model.
    assert count_parameters(model)[1] == count_parameters(full)[1]
    # NF4 stays close to the float model (random Gaussian weights: measured relative error 0.30,
    # correlation 0.95), and it really is quantized (not a float copy).
    assert 0.01 < relative_error(logits(model), logits(full)) < 0.5
    assert correlation(logits(model), logits(full)) > 0.9


def lora_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(TOKENS, labels=TOKENS).loss.backward()
    model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_4bit_lora_gradients_do_not_change_after_an_eval_forward(tiny_model_dir):
    """An inference forward (generation, validation) must not change what a training step sees.

    bitsandbytes repacks a 4-bit weight for a kernel without backward at the first eval forward on
    CPUs with AVX512-BF16; gradients then stopped at every quantized matmul and only the adapters of
    the last layers trained. The test fails there on a base left repackable.
    """
    model, _ = load_model(tiny_model_dir, quantization="4bit")
    model = add_adapter(model, "qlora", dropout=0.0)
    perturb_trainable(model, scale=0.05)  # B = 0 at init would leave A without gradient
    before = lora_gradients(model)
    with torch.no_grad():
        model(TOKENS)
    after = lora_gradients(model)
    assert before.keys() == after.keys() and len(before) == 2 * 2 * len(TARGETS_PER_LAYER)
    for name, grad in before.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_load_8bit_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    full, _ = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, quantization="8bit")
    # LLM.int8 is much closer than NF4 (measured: relative error 0.03, correlation 0.999).
    assert 0.001 < relative_error(logits(model), logits(full)) < 0.1
    assert correlation(logits(model), logits(full)) > 0.99
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 2 * len(
        TARGETS_PER_LAYER
    )
    assert describe_model(model)["quantization"] == "8bit"


def test_missing_path_and_unknown_hub_id_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model path not found: /no/such/model"):
        load_model("/no/such/model")
    with pytest.raises(UserError, match="not a model directory"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="cannot load model 'no-such-org/no-such-model-xyz'"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(UserError, match="unknown quantization"):
        load_model("/no/such/model-either", quantization="3bit")


def test_load_tokenizer_sets_pad_to_eos_when_missing(tiny_model_dir, tmp_path):
    copy = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, copy)
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token")
    config_file.write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(copy))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------
# Adapters


def test_lora_trains_only_adapter_weights_with_the_expected_count(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    targets = linear_targets(model)
    r = 4
    peft_model = add_adapter(model, "lora", r=r, alpha=8, dropout=0.0)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    expected = sum(r * (m.in_features + m.out_features) for m in targets.values())
    assert (
        sum(p.numel() for p in trainable.values())
        == expected
        == describe_model(peft_model)["trainable_params"]
    )

    # One optimizer step moves the adapter and leaves every base weight where it was.
    base_before = {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad
    }
    lora_b_before = {n: p.detach().clone() for n, p in trainable.items() if ".lora_B." in n}
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.1)
    peft_model.train()
    loss = peft_model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(lora_b_before[n], trainable[n]) for n in lora_b_before)
    assert all(
        torch.equal(base_before[n], p)
        for n, p in peft_model.named_parameters()
        if not p.requires_grad
    )


def test_lora_with_named_targets_and_bad_options(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    peft_model = add_adapter(model, "lora", r=2, target_modules="q_proj,v_proj")
    # 2 layers x (q, v), each 64 -> 64: r * (64 + 64)
    assert describe_model(peft_model)["trainable_params"] == 2 * 2 * 2 * (64 + 64)
    with pytest.raises(UserError, match="already has an adapter"):
        add_adapter(peft_model)
    fresh, _ = load_model(tiny_model_dir)
    with pytest.raises(UserError, match="cannot attach lora adapter"):
        add_adapter(fresh, "lora", target_modules=["no_such_proj"])
    with pytest.raises(UserError, match="qlora needs a 4-bit base"):
        add_adapter(fresh, "qlora")
    with pytest.raises(UserError, match="unknown adapter type"):
        add_adapter(fresh, "ia3")


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_tinylora_u32_r2_full_tying_trains_exactly_32_float32_parameters(
    tiny_model_dir, quantization
):
    model, _ = load_model(tiny_model_dir, quantization=quantization)
    peft_model = add_adapter(
        model, "tinylora", tinylora_u=32, tinylora_r=2, tinylora_weight_tying=1.0
    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert (
        len(trainable) == 1 and trainable[0].numel() == 32 and trainable[0].dtype == torch.float32
    )
    assert describe_model(peft_model)["trainable_params"] == 32
    # Gradients reach the shared vector through every adapted layer.
    peft_model.train()
    peft_model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert trainable[0].grad is not None and trainable[0].grad.abs().sum() > 0


def test_tinylora_without_tying_has_one_vector_per_target(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    peft_model = add_adapter(model, "tinylora", tinylora_u=8, tinylora_weight_tying=0.0)
    assert describe_model(peft_model)["trainable_params"] == 8 * 2 * len(TARGETS_PER_LAYER)


def test_tinylora_on_bf16_base_keeps_the_vector_float32(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    peft_model = add_adapter(model, "tinylora")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert [(p.numel(), p.dtype) for p in trainable] == [(32, torch.float32)]
    assert torch.isfinite(logits(peft_model)).all()


def test_tinylora_on_4bit_base_sits_on_the_quantized_layers_with_svd_of_real_weights(
    tiny_model_dir,
):
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight

    model, _ = load_model(tiny_model_dir, quantization="4bit")
    peft_model = add_adapter(model, "tinylora", tinylora_r=2)
    q_proj = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)  # attached, not merged or replaced
    weight = dequantize_module_weight(q_proj.base_layer).float()
    a, b = q_proj.tinylora_A["default"], q_proj.tinylora_B["default"]
    assert a.shape == (2, 64) and b.shape == (64, 2)
    # B @ A is the best rank-2 approximation of the dequantized weight (truncated SVD).
    u, s, vh = torch.linalg.svd(weight)
    assert torch.allclose(b @ a, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)
    # A zero vector is the identity: the adapted model computes exactly what the 4-bit base does.
    base_only = logits(model)  # peft wraps in place, so compare with adapters disabled
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_only)
    assert torch.allclose(logits(peft_model), base_only, atol=1e-6)


@pytest.mark.parametrize(
    ("quantization", "adapter_type"),
    [("none", "lora"), ("none", "tinylora"), ("4bit", "qlora"), ("4bit", "tinylora")],
)
def test_saved_adapter_loads_back_with_identical_logits(
    tiny_model_dir, tmp_path, quantization, adapter_type
):
    model, _ = load_model(tiny_model_dir, quantization=quantization)
    peft_model = add_adapter(model, adapter_type, r=4, dropout=0.0)
    perturb_trainable(peft_model)
    peft_model.eval()
    expected = logits(peft_model)
    with peft_model.disable_adapter():
        assert not torch.allclose(logits(peft_model), expected, atol=1e-3)  # the adapter matters
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    assert (adapter_dir / BASE_FINGERPRINT_FILE).is_file()

    loaded, tokenizer = load_model(str(adapter_dir), quantization=quantization)
    assert torch.equal(logits(loaded), expected)
    assert describe_model(loaded)["trainable_params"] == 0  # inference by default
    assert tokenizer.eos_token_id is not None
    resumed, _ = load_model(str(adapter_dir), quantization=quantization, trainable_adapter=True)
    assert (
        describe_model(resumed)["trainable_params"]
        == describe_model(peft_model)["trainable_params"]
    )
    # The same adapter attached to an explicitly named base.
    attached, _ = load_model(tiny_model_dir, quantization=quantization, adapter=str(adapter_dir))
    assert torch.equal(logits(attached), expected)


def test_adapter_for_another_base_is_a_user_error(tiny_model_dir, other_base_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    adapter_dir = save_adapter(add_adapter(model, "lora", r=2), tmp_path / "adapter")
    with pytest.raises(UserError, match="was made for base .*hidden_size 64 != 32"):
        load_model(str(adapter_dir), base_model=other_base_dir)
    # Without the fingerprint file the tensor shapes still give it away.
    (adapter_dir / BASE_FINGERPRINT_FILE).unlink()
    with pytest.raises(
        UserError, match="does not fit base .*down_proj has size 128, the adapter expects 256"
    ):
        load_model(str(adapter_dir), base_model=other_base_dir)
    # And a TinyLoRA adapter too (its frozen SVD factors have the base's shapes).
    tiny, _ = load_model(tiny_model_dir)
    tinylora_dir = save_adapter(add_adapter(tiny, "tinylora"), tmp_path / "tinylora")
    (tinylora_dir / BASE_FINGERPRINT_FILE).unlink()
    with pytest.raises(UserError, match="does not fit base"):
        load_model(str(tinylora_dir), base_model=other_base_dir)


def test_adapter_for_another_base_of_the_same_sizes_is_a_user_error(tiny_model_dir, tmp_path):
    """Same architecture and sizes, other weights (another seed): every shape fits, so only the
    embedding probe of the fingerprint tells. The same base in bfloat16 or 4-bit still loads it."""
    from coderl.tiny_model import build_tiny_model
    from tests.conftest import TINY_TEST_MODEL

    twin = build_tiny_model(
        tmp_path / "twin", **{**TINY_TEST_MODEL, "seed": 1}, max_corpus_bytes=200_000
    )
    model, _ = load_model(tiny_model_dir)
    adapter_dir = save_adapter(add_adapter(model, "lora", r=2), tmp_path / "adapter")
    with pytest.raises(UserError, match="same sizes, but other embedding weights"):
        load_model(str(adapter_dir), base_model=str(twin))
    for kwargs in ({"dtype": "bfloat16"}, {"quantization": "4bit"}):
        load_model(str(adapter_dir), **kwargs)


def test_adapter_with_a_module_the_base_lacks_is_a_user_error(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    adapter_dir = save_adapter(
        add_adapter(model, "lora", r=2, target_modules=["q_proj"]), tmp_path / "adapter"
    )
    from safetensors.torch import load_file, save_file

    weights_file = adapter_dir / "adapter_model.safetensors"
    state = load_file(weights_file)
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, weights_file)
    with pytest.raises(UserError, match="adapts module 'model.layers.7.self_attn.q_proj'"):
        load_model(str(adapter_dir))


def test_adapter_whose_recorded_base_is_missing_is_a_user_error(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    adapter_dir = save_adapter(add_adapter(model, "lora", r=2), tmp_path / "adapter")
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="model path not found"):
        load_model(str(adapter_dir))
    loaded, _ = load_model(str(adapter_dir), base_model=tiny_model_dir)  # the override rescues it
    assert describe_model(loaded)["adapter"] == "lora"


# --------------------------------------------------------------------------------------------------
# Prompt + completion encoding


def test_encode_prompt_adds_bos_once(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    bos = tokenizer.bos_token_id
    ids = encode_prompt(tokenizer, "def f():\n")
    assert ids[0] == bos and ids[1:] == tokenizer.encode("def f():\n", add_special_tokens=False)
    # A chat-rendered prompt that already starts with the BOS text gets no second BOS.
    assert encode_prompt(tokenizer, tokenizer.bos_token + "x")[:2] == [
        bos,
        tokenizer.encode("x", add_special_tokens=False)[0],
    ]


CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}",
        "<|im_end|>",
    ),
    "llama3": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}",
        "<|eot_id|>",
    ),
    "plain text after the answer": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_chat_end_of_turn_is_the_special_token_after_an_answer(tiny_model_dir, name):
    template, end = CHAT_TEMPLATES[name]
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.add_tokens(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True
    )
    tokenizer.chat_template = template
    want = tokenizer.convert_tokens_to_ids(end) if end else None
    assert chat_end_of_turn_id(tokenizer) == want
    assert completion_end_id(tokenizer, "instruct") == (want or tokenizer.eos_token_id)
    assert completion_end_id(tokenizer, "base") == tokenizer.eos_token_id
    tokenizer.chat_template = None
    assert chat_end_of_turn_id(tokenizer) is None


def test_prompt_and_completion_are_tokenized_separately(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt, completion = "def f(x):\n    ", "return x + 1\n"
    ids, prompt_len = encode_prompt_and_completion(
        tokenizer, prompt, completion, end_id=tokenizer.eos_token_id
    )
    assert ids[:prompt_len] == encode_prompt(tokenizer, prompt)
    assert ids[prompt_len:-1] == tokenizer.encode(completion, add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + completion
    no_eos, _ = encode_prompt_and_completion(tokenizer, prompt, completion)
    assert no_eos == ids[:-1]

    # Why the rule matters: tokenizing the joined string merges the prompt's last indentation space
    # into " return", so its first prompt_len ids are NOT the prompt ids generation feeds the model.
    joined = encode_prompt(tokenizer, prompt + completion)
    assert tokenizer.decode(joined, skip_special_tokens=True) == prompt + completion  # same text
    assert joined[:prompt_len] != ids[:prompt_len]  # ... yet a different prompt prefix
    assert "Ġreturn" in tokenizer.convert_ids_to_tokens(joined)
    assert "Ġreturn" not in tokenizer.convert_ids_to_tokens(ids)
