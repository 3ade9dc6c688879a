"""Load causal LMs and tokenizers, attach adapters, and encode prompt + completion for training.

Loading (:func:`load_model`): any causal LM by hub id or local directory, on CUDA when present, else
CPU, in float32 / bfloat16 / float16, or quantized by bitsandbytes to 8-bit or 4-bit NF4 (double
quantization). ``dtype="auto"`` is float32 on CPU and bfloat16 on CUDA (float16 where the GPU has no
bfloat16). The 4-bit compute dtype follows the device the same way: bfloat16 / float16 on CUDA,
float32 on CPU (bitsandbytes runs 4-bit on CPU; float32 there avoids half-precision CPU kernels).

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

Tokenizing for training (:func:`encode_prompt_and_completion`): the prompt and the completion are
tokenized SEPARATELY and their ids concatenated. Tokenizing the joined string lets a token straddle
the boundary (e.g. the prompt's trailing indentation merges with the completion's first word), so the
prompt ids seen in training would differ from those seen at inference and a mask by the prompt's
token count would be off. :func:`encode_prompt` is the one function both training and
:mod:`coderl.generation` use for prompt ids.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
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
ADAPTER_TYPES = ("lora", "qlora", "tinylora")
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_FINGERPRINT_FILE = "base_model.json"
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")
EMBEDDING_PROBE_FIELD = "embedding_probe"
EMBEDDING_PROBE_ROWS = 16  # embedding rows spread evenly over the vocabulary
EMBEDDING_PROBE_SIZE = 32  # numbers kept after the random projection
EMBEDDING_PROBE_MIN_COSINE = 0.95

# A hub id is "name" or "owner/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Tensor names of adapter weights whose shapes tell which base module sizes they were made for.
_ADAPTER_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|tinylora_A|tinylora_B)(?:\.[^.]+)?(?:\.weight)?$"
)


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
        model = attach_saved_adapter(model, adapter_dir, trainable=trainable_adapter)
    return model, tokenizer


def _recorded_base_name(adapter_dir: str) -> str:
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {adapter_dir} does not record its base model; pass base_model")
    return base


# --------------------------------------------------------------------------------------------------
# Adapters


def unwrap_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


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


# --------------------------------------------------------------------------------------------------
# Tokenizing prompt + completion


def _special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts BEFORE the text when adding special tokens (usually [BOS] or [])."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    return []


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as both training and generation see them: the text, with the BOS prefix once.

    Special-token suffixes (an EOS some tokenizers append) are never added to a prompt. A prompt
    that already starts with the BOS text (chat templates often include it) gets no second BOS.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    prefix = _special_prefix_ids(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


_TURN_MARK = "\x00turn-end-probe\x00"


def chat_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any.

    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for Gemma: the token a
    chat model emits to end its answer, often not the tokenizer's EOS. Found by rendering a
    conversation whose answer is a marker and reading the token after it; None when the template
    has none or puts plain text there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this shape (e.g. demands a system turn)
        return None
    _, found, after = text.partition(_TURN_MARK)
    ids = tokenizer.encode(after, add_special_tokens=False) if found else []
    if ids and _is_special_token(tokenizer, ids[0]):
        return ids[0]
    return None


def _is_special_token(tokenizer, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def completion_end_id(tokenizer, prompt_mode: str) -> int | None:
    """The token that ends a finished answer: the chat template's end-of-turn in instruct mode
    (what the model emits at inference), else EOS."""
    if prompt_mode == "instruct":
        end = chat_end_of_turn_id(tokenizer)
        if end is not None:
            return end
    return tokenizer.eos_token_id


def encode_completion(tokenizer, completion: str, end_id: int | None = None) -> list[int]:
    """Completion ids, tokenized on their own (no BOS), with ``end_id`` appended when given."""
    ids = tokenizer.encode(completion, add_special_tokens=False)
    if end_id is not None:
        ids.append(end_id)
    return ids


def encode_prompt_and_completion(
    tokenizer, prompt: str, completion: str, end_id: int | None = None
) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)``: prompt and completion tokenized SEPARATELY, ids concatenated.

    ``input_ids[:prompt_len]`` equals :func:`encode_prompt` (what generation feeds the model), so a
    loss mask of the first ``prompt_len`` labels masks exactly the prompt. ``end_id`` (see
    :func:`completion_end_id`) ends the completion.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + encode_completion(tokenizer, completion, end_id=end_id), len(prompt_ids)


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
