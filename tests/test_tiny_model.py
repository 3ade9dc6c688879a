"""The tiny model builder: fast, offline, deterministic, loadable, and a tokenizer that round-trips code."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from coderl.errors import UserError
from coderl.tiny_model import BUILD_INFO_FILE, CPP_SAMPLE, IM_END_TOKEN, build_tiny_model
from tests.helpers import REPO

SMALL = dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, max_corpus_bytes=50_000)

CPP_SOURCE = (
    "#include <cstdio>\r\n"
    "int main() {\n"
    "\tint  a = 0;   // tab, double space, trailing spaces   \n"
    '    if (a<1){printf("%d\\n", a);}\n'
    "        return 0;\n"
    "}\n\n\n"
)
PYTHON_SOURCE = (
    "class Foo:\n"
    "    def bar(self, x):  # comment  \n"
    "        '''Doc.\n\n        Indented.\n        '''\n"
    "\treturn [x ** 2 for x in range(10)]\n"
    "  \n"
    "s = 'héllo wörld ✓ 中文 \\t'\n"
)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_builds_in_seconds_and_loads_with_auto_classes(tmp_path):
    # Imported before the clock starts: import time is not build time.
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401

    started = time.perf_counter()
    out = build_tiny_model(
        tmp_path / "m", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4
    )
    elapsed = time.perf_counter() - started
    # Measured 0.2-0.7 s on 2 shared cores; the bound leaves room for a heavily loaded machine.
    assert elapsed < 60, f"tiny model build took {elapsed:.1f}s"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert (
        model.config.hidden_size,
        model.config.num_hidden_layers,
        model.config.num_attention_heads,
    ) == (64, 2, 4)
    assert model.config.intermediate_size == 4 * 64
    assert model.config.max_position_embeddings == 1024
    # Fan-in scaled init (1 / sqrt(64)), so the frozen output head can express confident logits.
    assert model.config.initializer_range == pytest.approx(0.125)
    assert model.lm_head.weight.std().item() == pytest.approx(0.125, rel=0.05)
    assert model.config.vocab_size == len(tokenizer) == 1024
    assert model.dtype == torch.float32
    # Special tokens exist, are distinct, and the model config agrees with the tokenizer.
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(IM_END_TOKEN),
    ]
    info = json.loads((out / BUILD_INFO_FILE).read_text())
    assert info["vocab_size"] == 1024 and info["corpus_chars"] > 100_000
    # The model runs and gives finite logits of the right shape.
    logits = model(torch.tensor([tokenizer("def f(x):").input_ids])).logits
    assert logits.shape[-1] == 1024 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text",
    [
        CPP_SOURCE,
        PYTHON_SOURCE,
        CPP_SAMPLE,
        " leading space and trailing newline\n",
        "\n\n\t\t  \n",
        "literal specials of other models: </s> <s> <pad> <unk>",
    ],
)
def test_tokenizer_round_trips_code_exactly(tiny_model_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(plain) == text
    with_bos = tokenizer(text).input_ids
    assert with_bos == [tokenizer.bos_token_id] + plain
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_tokenizer_round_trips_standard_library_sources(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Files not in the training corpus too (the corpus is the first files by name).
    for name in ("json/decoder.py", "textwrap.py", "typing.py"):
        source = (stdlib / name).read_text(encoding="utf-8")
        ids = tokenizer.encode(source, add_special_tokens=False)
        assert tokenizer.decode(ids) == source, name
        # A trained BPE compresses code well below one token per byte.
        assert len(ids) < 0.6 * len(source.encode())


def test_chat_template_renders_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_build_is_deterministic_for_a_seed(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=3, **SMALL)
    second = build_tiny_model(tmp_path / "b", seed=3, **SMALL)
    other_seed = build_tiny_model(tmp_path / "c", seed=4, **SMALL)
    assert file_digest(first / "tokenizer.json") == file_digest(second / "tokenizer.json")
    assert file_digest(first / "model.safetensors") == file_digest(second / "model.safetensors")
    assert file_digest(first / "tokenizer.json") == file_digest(other_seed / "tokenizer.json")
    assert file_digest(first / "model.safetensors") != file_digest(other_seed / "model.safetensors")


def test_extra_corpus_files_shape_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    word = "zqxjvkwordthatisnotinthestdlib"
    extra = tmp_path / "tasks.jsonl"
    extra.write_text(f"{word} = 1\n" * 200)
    without = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "a", **SMALL))
    with_extra = AutoTokenizer.from_pretrained(
        build_tiny_model(tmp_path / "b", corpus=[str(extra)], **SMALL)
    )
    assert len(without.encode(word, add_special_tokens=False)) > 3
    assert len(with_extra.encode(word, add_special_tokens=False)) == 1


def test_qwen2_architecture_builds(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        build_tiny_model(tmp_path / "q", arch="qwen2", **SMALL)
    )
    assert model.config.model_type == "qwen2"
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(arch="gpt2"), "unknown tiny model architecture"),
        (dict(hidden_size=30, num_heads=4), "not divisible"),
        (dict(corpus=["/no/such/file.txt"]), "corpus file not found"),
        (dict(vocab_size=100), "too small"),
    ],
)
def test_bad_build_options_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_tiny_model(tmp_path / "x", **{**SMALL, **kwargs})


def test_cli_builds_a_model_end_to_end(tmp_path):
    out = tmp_path / "cli-model"
    done = subprocess.run(
        [
            sys.executable,
            "build_tiny_model.py",
            "--out_dir",
            str(out),
            "--vocab_size",
            "512",
            "--hidden_size",
            "32",
            "--num_layers",
            "1",
            "--num_heads",
            "2",
            "--max_corpus_bytes",
            "50000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["out_dir"] == str(out) and report["vocab_size"] == 512
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_cli_help_and_bad_option_exit_codes(capsys):
    import build_tiny_model as cli

    with pytest.raises(SystemExit) as help_exit:
        cli.main(["--help"])
    assert help_exit.value.code == 0
    assert "--vocab_size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_exit:
        cli.main(["--out_dir", "unused", "--arch", "gpt2"])
    assert bad_exit.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown tiny model architecture 'gpt2' (choose from llama, qwen2)"
    )
