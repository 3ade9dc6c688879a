"""Adapters on a base model: LoRA, QLoRA and TinyLoRA attached, saved with a fingerprint of their
base, and loaded back only onto a base they fit.

Adapters (:func:`add_adapter`): LoRA, QLoRA (LoRA on a 4-bit base) and TinyLoRA (peft's
``TinyLoraConfig``: a vector of ``u`` trainable scalars projected through frozen SVD factors of each
target weight; ``weight_tying=1.0`` shares one vector across all targets, so u=32 trains exactly 32
parameters, kept in float32). Adapters are attached, never merged into quantized weights.

peft 0.21's TinyLoRA reads ``weight.data`` for its SVD and ``weight.dtype`` for its vector, which on
a bitsandbytes layer are packed uint8 bytes; on a quantized base we therefore let peft see float
stand-ins holding the dequantized weights while it builds (or loads) the adapter, then put the
quantized layers back under the adapter (:func:`_with_dequantized_stand_ins`).

Saved adapters (:func:`save_adapter`) carry, next to peft's files, ``base_model.json``: a fingerprint
of the base (name, architecture, hidden size, vocabulary size, layer count, and a projection of a
few embedding rows that tells apart bases of the same sizes). Loading an adapter
directory checks that fingerprint and the shapes of the adapter's tensors against the base, so an
adapter made for another base is one clear :class:`~coderl.errors.UserError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from coderl.errors import UserError
from coderl.models import (
    BASE_FINGERPRINT_FILE,
    _check_choice,
    _first_line,
    default_device,
    model_quantization,
    quantized_compute_dtype,
    read_adapter_config,
    unwrap_model,
)

ADAPTER_TYPES = ("lora", "qlora", "tinylora")
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")
EMBEDDING_PROBE_FIELD = "embedding_probe"
EMBEDDING_PROBE_ROWS = 16  # embedding rows spread evenly over the vocabulary
EMBEDDING_PROBE_SIZE = 32  # numbers kept after the random projection
EMBEDDING_PROBE_MIN_COSINE = 0.95

# Tensor names of adapter weights whose shapes tell which base module sizes they were made for.
_ADAPTER_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|tinylora_A|tinylora_B)(?:\.[^.]+)?(?:\.weight)?$"
)


def _normalize_target_modules(target_modules: list[str] | str) -> list[str] | str:
    """Accept "all-linear", a comma-separated string, or a list (a one-item ["all-linear"] too)."""
    if isinstance(target_modules, str):
        names = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in target_modules if str(t).strip()]
    if not names:
        raise UserError("target_modules is empty")
    if names == ["all-linear"]:
        return "all-linear"
    if "all-linear" in names:
        raise UserError("target_modules: 'all-linear' cannot be combined with module names")
    return names


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and type(weight).__name__ in (
        "Params4bit",
        "Int8Params",
    )


def _dequantized_stand_in(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(module).detach().to(dtype)
    stand_in = torch.nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device="meta"
    )
    stand_in.weight = torch.nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        stand_in.bias = module.bias
    return stand_in


def _with_dequantized_stand_ins(model, build: Callable[[], Any]):
    """Run ``build()`` (which wraps ``model`` in TinyLoRA) while quantized linears are float stand-ins.

    peft's TinyLoRA takes the SVD of ``weight.data`` and the dtype of its vector from the target
    layer; for bitsandbytes layers both would be the packed uint8 storage. The stand-ins hold the
    dequantized weights (compute dtype) only while the adapter is built; then every stand-in is
    replaced by its original quantized layer, so the adapter sits on top of the 4-bit weights. The
    dequantized copies are transient (peak memory is about one half-precision copy of the targets).
    """
    device = next(model.parameters()).device
    compute_dtype = quantized_compute_dtype(device)
    originals: dict[int, torch.nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_quantized_linear(child):
                stand_in = _dequantized_stand_in(child, compute_dtype)
                originals[id(stand_in)] = child
                setattr(parent, name, stand_in)
    try:
        wrapped = build()
    finally:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in originals:
                    setattr(parent, name, originals[id(child)])
    return wrapped


def _keep_trainable_in_float32(peft_model) -> None:
    """Trainable adapter weights stay float32 even on a half-precision base (optimizer precision)."""
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def add_adapter(
    model,
    adapter_type: str = "lora",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
    tinylora_u: int = 32,
    tinylora_r: int = 2,
    tinylora_weight_tying: float = 1.0,
    tinylora_projection_seed: int = 42,
    prepare_kbit: bool | None = None,
):
    """Wrap ``model`` in a new trainable peft adapter and return the ``PeftModel``.

    ``adapter_type``: "lora"; "qlora" (LoRA that requires a 4-bit base); "tinylora" (peft
    ``TinyLoraConfig(r=tinylora_r, u=tinylora_u, weight_tying=tinylora_weight_tying)``; 1.0 = one
    shared vector of ``u`` scalars). ``r``/``alpha``/``dropout`` are LoRA's. ``target_modules``
    defaults to every linear layer except the output head (attention + MLP projections).

    ``prepare_kbit``: run peft's ``prepare_model_for_kbit_training`` on a quantized base (see
    :func:`_prepare_kbit_training`); None = only on CUDA. Measured on the tiny 4-bit model on CPU:
    it upcasts nothing there and its gradient checkpointing made a LoRA step 20-60% slower.
    """
    from peft import LoraConfig, PeftModel, TinyLoraConfig, get_peft_model

    if isinstance(model, PeftModel):
        raise UserError(
            "the model already has an adapter; load it with trainable_adapter=True to keep training it"
        )
    _check_choice("adapter type", adapter_type, ADAPTER_TYPES)
    quantization = model_quantization(model)
    if adapter_type == "qlora" and quantization != "4bit":
        raise UserError(
            "adapter type qlora needs a 4-bit base model (load it with quantization=4bit)"
        )
    targets = _normalize_target_modules(target_modules)
    model = _prepare_kbit_training(model, prepare_kbit)

    if adapter_type == "tinylora":
        _check_tinylora_options(tinylora_u, tinylora_r, tinylora_weight_tying)
        config = TinyLoraConfig(
            r=tinylora_r,
            u=tinylora_u,
            weight_tying=tinylora_weight_tying,
            projection_seed=tinylora_projection_seed,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
    else:
        _check_lora_options(r, alpha, dropout)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def build():
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # e.g. target modules not found in the base model
            raise UserError(f"cannot attach {adapter_type} adapter: {_first_line(err)}") from None

    if adapter_type == "tinylora" and quantization != "none":
        peft_model = _with_dequantized_stand_ins(model, build)
    else:
        peft_model = build()
    _keep_trainable_in_float32(peft_model)
    return peft_model


def _prepare_kbit_training(model, prepare_kbit: bool | None):
    """peft's ``prepare_model_for_kbit_training`` for a quantized base that will be trained.

    It freezes the base, upcasts half-precision norms / embeddings / head to float32 and turns on
    gradient checkpointing. None = only on CUDA: on CPU everything is float32 already, so it only
    adds gradient checkpointing, which slows each step and saves no memory that matters there.
    """
    if model_quantization(model) == "none":
        return model
    if prepare_kbit is None:
        prepare_kbit = default_device().type == "cuda"
    if not prepare_kbit:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def _check_lora_options(r: int, alpha: int, dropout: float) -> None:
    if r <= 0:
        raise UserError(f"LoRA rank r must be positive, got {r}")
    if alpha <= 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")


def _check_tinylora_options(u: int, r: int, weight_tying: float) -> None:
    if u <= 0 or r <= 0:
        raise UserError(f"TinyLoRA u and r must be positive, got u={u}, r={r}")
    if not 0.0 <= weight_tying <= 1.0:
        raise UserError(f"TinyLoRA weight_tying must be in [0, 1], got {weight_tying}")


def base_fingerprint(model) -> dict:
    """What identifies the base an adapter was made for: name, the sizes that shape the adapter,
    and a probe of the embedding weights (:func:`embedding_probe`)."""
    base = unwrap_model(model)
    config = base.config
    fingerprint = {"base_model_name_or_path": getattr(config, "_name_or_path", "")}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in FINGERPRINT_FIELDS:
        fingerprint[field] = getattr(text_config, field, getattr(config, field, None))
    probe = embedding_probe(base)
    if probe is not None:
        fingerprint[EMBEDDING_PROBE_FIELD] = probe
    return fingerprint


def embedding_probe(model) -> list[float] | None:
    """A fixed random projection of a few rows of the input embedding matrix (32 numbers).

    Two bases with the same sizes (a fine-tuned copy, another seed, another release) differ here;
    the same base loaded in bfloat16 or float16, or beside a 4-bit body (embeddings stay
    unquantized), moves each number by a rounding error only, so :func:`probes_agree` compares
    directions, not values.
    """
    embeddings = getattr(model.get_input_embeddings(), "weight", None)
    if embeddings is None or embeddings.dim() != 2 or embeddings.shape[0] < 2:
        return None
    vocab, hidden = embeddings.shape
    rows = torch.linspace(0, vocab - 1, EMBEDDING_PROBE_ROWS).round().long().unique()
    sample = embeddings.detach()[rows.to(embeddings.device)].float().cpu().flatten()
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(sample.numel(), EMBEDDING_PROBE_SIZE, generator=generator)
    return [round(float(v), 6) for v in sample @ projection]


def probes_agree(recorded: Sequence[float], actual: Sequence[float]) -> tuple[bool, float]:
    """``(same base, cosine)``: same direction up to rounding (cosine at least 0.95). Rounding to
    bfloat16 moves the cosine by about 1e-5; unrelated weights give about 0 +- 0.2."""
    a, b = torch.tensor(list(recorded)), torch.tensor(list(actual))
    if a.shape != b.shape or a.norm() == 0 or b.norm() == 0:
        return False, 0.0
    cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return cosine >= EMBEDDING_PROBE_MIN_COSINE, cosine


def write_base_fingerprint(model, directory: str | Path) -> Path:
    """Write ``base_model.json`` (see :func:`base_fingerprint`) into an adapter directory."""
    file = Path(directory) / BASE_FINGERPRINT_FILE
    file.write_text(json.dumps(base_fingerprint(model), indent=2) + "\n")
    return file


def save_adapter(model, directory: str | Path) -> Path:
    """Save a peft model's adapter (``save_pretrained``) plus the base fingerprint next to it."""
    out = Path(directory)
    model.save_pretrained(out)
    write_base_fingerprint(model, out)
    return out


def _adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    safetensors_file = adapter_dir / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    bin_file = adapter_dir / "adapter_model.bin"
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise UserError(f"adapter {adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


def check_adapter_matches_base(model, adapter_dir: str | Path) -> None:
    """UserError when the adapter in ``adapter_dir`` was made for a base other than ``model``.

    Two checks: the saved fingerprint (when present) against the base's config and embedding
    weights (older fingerprints carry no embedding probe), and every adapter tensor against the
    module it adapts (the module must exist with matching in/out features).
    """
    adapter_dir = Path(adapter_dir)
    base = unwrap_model(model)
    name = getattr(base.config, "_name_or_path", "the base model")
    fingerprint_file = adapter_dir / BASE_FINGERPRINT_FILE
    if fingerprint_file.is_file():
        recorded = json.loads(fingerprint_file.read_text())
        actual = base_fingerprint(base)
        diffs = [
            f"{field} {recorded[field]} != {actual[field]}"
            for field in FINGERPRINT_FIELDS
            if recorded.get(field) is not None and recorded.get(field) != actual[field]
        ]
        if not diffs and recorded.get(EMBEDDING_PROBE_FIELD) and actual.get(EMBEDDING_PROBE_FIELD):
            same, cosine = probes_agree(
                recorded[EMBEDDING_PROBE_FIELD], actual[EMBEDDING_PROBE_FIELD]
            )
            if not same:
                diffs = [f"same sizes, but other embedding weights: probe cosine {cosine:.2f}"]
        if diffs:
            raise UserError(
                f"adapter {adapter_dir} was made for base {recorded.get('base_model_name_or_path')!r}, "
                f"not {name!r} ({'; '.join(diffs)})"
            )
    modules = dict(base.named_modules())
    for key, shape in _adapter_tensor_shapes(adapter_dir).items():
        match = _ADAPTER_TENSOR.match(key)
        if match is None:
            continue
        module = modules.get(match["module"])
        if module is None:
            raise UserError(
                f"adapter {adapter_dir} adapts module {match['module']!r}, which base {name!r} does not have"
            )
        expected = _expected_adapter_dim(module, match["kind"])
        actual_dim = shape[-1] if match["kind"].endswith("A") else shape[0]
        if expected is not None and actual_dim != expected:
            raise UserError(
                f"adapter {adapter_dir} does not fit base {name!r}: {match['module']} has size {expected}, "
                f"the adapter expects {actual_dim}"
            )


def _expected_adapter_dim(module: torch.nn.Module, kind: str) -> int | None:
    """in_features for an A factor, out_features for a B factor; None where the module has neither."""
    attr = "in_features" if kind.endswith("A") else "out_features"
    return getattr(module, attr, None)


def attach_saved_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """Attach the adapter saved in ``adapter_dir`` to ``model`` (checked to be its base)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    check_adapter_matches_base(model, adapter_dir)
    peft_type = str(read_adapter_config(adapter_dir).get("peft_type", "")).upper()

    def build():
        try:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"adapter {adapter_dir} does not fit its base model: {_first_line(err)}"
            ) from None

    if trainable:
        model = _prepare_kbit_training(model, prepare_kbit=None)
    if peft_type == "TINYLORA" and model_quantization(model) != "none":
        peft_model = _with_dequantized_stand_ins(model, build)
    else:
        peft_model = build()
    if trainable:
        _keep_trainable_in_float32(peft_model)
    peft_model.eval()
    return peft_model
