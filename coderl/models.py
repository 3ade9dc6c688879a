"""Load causal LMs and tokenizers: devices, dtypes, quantization, locating models and adapters.

Loading (:func:`load_model`): any causal LM by hub id or local directory, on CUDA when present, else
CPU, in float32 / bfloat16 / float16, or quantized by bitsandbytes to 8-bit or 4-bit NF4 (double
quantization). ``dtype="auto"`` is float32 on CPU and bfloat16 on CUDA (float16 where the GPU has no
bfloat16). The 4-bit compute dtype follows the device the same way: bfloat16 / float16 on CUDA,
float32 on CPU (bitsandbytes runs 4-bit on CPU; float32 there avoids half-precision CPU kernels).

Adapters are attached by :mod:`coderl.adapters`; prompt + completion ids come from
:mod:`coderl.prompts`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from coderl.errors import UserError

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_FINGERPRINT_FILE = "base_model.json"

# A hub id is "name" or "owner/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------
# Devices and dtypes


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _cuda_half_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {option} {value!r} (choose from {', '.join(choices)})")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a ``dtype`` option: "auto" is float32 on CPU, bfloat16 (or float16) on CUDA."""
    _check_choice("dtype", dtype, tuple(DTYPES))
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return _cuda_half_dtype() if device.type == "cuda" else torch.float32


def quantized_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bfloat16 (else float16) on CUDA, float32 on CPU."""
    return _cuda_half_dtype() if device.type == "cuda" else torch.float32


def quantization_config(quantization: str, device: torch.device):
    """A ``BitsAndBytesConfig`` for "8bit" / "4bit" (NF4, double quantization), None for "none"."""
    _check_choice("quantization", quantization, QUANTIZATIONS)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=quantized_compute_dtype(device),
    )


def model_quantization(model) -> str:
    """ "4bit", "8bit" or "none" for a loaded model (adapter-wrapped or not)."""
    base = unwrap_model(model)
    if getattr(base, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(base, "is_loaded_in_8bit", False):
        return "8bit"
    return "none"


# --------------------------------------------------------------------------------------------------
# Locating models and adapters


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a peft adapter (``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG_FILE).is_file()


def resolve_model_source(name_or_path: str) -> str:
    """A local directory (as a string path) or a hub id; a missing local path is a UserError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model path {name_or_path} is a file; expected a model or adapter directory"
            )
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG_FILE).is_file():
            raise UserError(
                f"{name_or_path} is not a model directory (no config.json or {ADAPTER_CONFIG_FILE})"
            )
        return str(path)
    if not _HUB_ID.match(name_or_path):
        raise UserError(f"model path not found: {name_or_path}")
    return name_or_path


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of an adapter directory."""
    file = Path(adapter_dir).expanduser() / ADAPTER_CONFIG_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read adapter config {file}: {_first_line(err)}") from None


def _load_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise UserError(
            f"cannot load model {source!r}: not a local directory, and not found on the Hugging Face Hub "
            f"or in the local cache ({_first_line(err)})"
        ) from None
    except ValueError as err:  # e.g. an unknown model_type in config.json
        raise UserError(f"cannot load model config of {source!r}: {_first_line(err)}") from None


# --------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model or adapter directory or hub id, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    if is_adapter_dir(source) and not (Path(source) / "tokenizer_config.json").is_file():
        source = resolve_model_source(_recorded_base_name(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer of {source!r}: {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_base_model(source: str, quantization: str, dtype: str):
    from transformers import AutoModelForCausalLM

    device = default_device()
    torch_dtype = resolve_dtype(dtype, device)
    bnb_config = quantization_config(quantization, device)
    _load_config(source)  # turns "unknown model" into a UserError before any weights are fetched
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load model weights of {source!r}: {_first_line(err)}") from None
    if bnb_config is None:
        model.to(device)
    if quantization == "4bit" and device.type == "cpu":
        keep_4bit_layers_differentiable(model)
    model.eval()
    return model


def keep_4bit_layers_differentiable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a ``Linear4bit`` forward in eval mode without gradients (generation,
    validation) repacks its weight in place for a faster kernel that has no backward. Every later
    training forward then goes through that kernel: the adapters inside the layer still get
    gradients, but nothing flows back through the quantized matmul to earlier layers, so the
    adapters below the last layer stop learning after the first rollout. Returns the number of
    layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_model(
    name_or_path: str,
    quantization: str = "none",
    dtype: str = "auto",
    adapter: str | None = None,
    trainable_adapter: bool = False,
    base_model: str | None = None,
):
    """Load ``(model, tokenizer)``; ``name_or_path`` may be a base model or an adapter directory.

    For an adapter directory its base is loaded (``base_model`` overrides the base recorded in the
    adapter) and the adapter attached; ``adapter`` attaches an adapter directory to a base given as
    ``name_or_path``. ``trainable_adapter`` leaves the attached adapter's weights trainable
    (continuing training); otherwise it is loaded for inference. The model is in eval mode.
    """
    _check_choice("quantization", quantization, QUANTIZATIONS)
    _check_choice("dtype", dtype, tuple(DTYPES))
    source = resolve_model_source(name_or_path)
    adapter_dir = None
    if is_adapter_dir(source):
        if adapter is not None:
            raise UserError(
                f"{name_or_path} is itself an adapter directory; do not also pass an adapter"
            )
        adapter_dir = source
        base_source = resolve_model_source(base_model or _recorded_base_name(source))
    else:
        if base_model is not None:
            raise UserError("base_model is only used when loading an adapter directory")
        base_source = source
        if adapter is not None:
            adapter_dir = resolve_model_source(adapter)
            if not is_adapter_dir(adapter_dir):
                raise UserError(f"{adapter} is not an adapter directory (no {ADAPTER_CONFIG_FILE})")
    model = _load_base_model(base_source, quantization, dtype)
    tokenizer_source = (
        adapter_dir
        if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file()
        else base_source
    )
    tokenizer = load_tokenizer(tokenizer_source)
    if adapter_dir is not None:
        from coderl.adapters import attach_saved_adapter

        model = attach_saved_adapter(model, adapter_dir, trainable=trainable_adapter)
    return model, tokenizer


def _recorded_base_name(adapter_dir: str) -> str:
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {adapter_dir} does not record its base model; pass base_model")
    return base


def unwrap_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


# --------------------------------------------------------------------------------------------------
# Describing


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its unpacked number of values."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit values per byte of the storage dtype.
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _quantized_compute_dtype_name(base, quantization: str) -> str | None:
    if quantization == "4bit":
        return str(base.config.quantization_config.bnb_4bit_compute_dtype).removeprefix("torch.")
    if quantization == "8bit":
        return "float16"  # LLM.int8 casts activations to float16 for its matmul
    return None


def describe_model(model) -> dict:
    """A one-level dict for logs: name, dtype, quantization, adapter, parameter counts, device."""
    from peft import PeftModel

    base = unwrap_model(model)
    trainable, total = count_parameters(model)
    adapter = None
    if isinstance(model, PeftModel):
        adapter = str(model.active_peft_config.peft_type.value).lower()
    quantization = model_quantization(model)
    return {
        "name": getattr(base.config, "_name_or_path", ""),
        "architecture": base.config.model_type,
        "dtype": str(base.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "quantization": quantization,
        "compute_dtype": _quantized_compute_dtype_name(base, quantization),
        "adapter": adapter,
        "trainable_params": trainable,
        "total_params": total,
        "device": str(next(model.parameters()).device),
    }


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout module's p to 0 (so old and new log-probs are the same function of the
    weights); returns how many there were."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
            count += 1
    return count


def gradient_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` checkpoints activations, however it was switched on (our
    ``--gradient_checkpointing``, or peft's ``prepare_model_for_kbit_training`` on a 4-bit CUDA
    base). Transformers then turns the key/value cache off in train mode."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode (dropout off), restoring its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
