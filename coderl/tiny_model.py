"""Build a tiny random-init causal LM and its tokenizer, offline, in seconds.

The tiny model is what makes ``PRESET=tiny`` and the tests run anywhere: the same code paths as a
real run (``AutoModelForCausalLM`` / ``AutoTokenizer`` from a directory, adapters, quantization,
generation), only small. It is not a mock: it is a real Llama (default) or Qwen2 model with random
weights and a real byte-level BPE tokenizer trained here with ``tokenizers``.

Corpus: the top-level ``*.py`` files of the running interpreter's standard library (sorted by name,
the first ``max_corpus_bytes`` bytes), a short built-in C++ sample, and any extra files given (the
tiny preset passes its task files so the vocabulary covers them). The result is deterministic for a
given seed, corpus and library versions.

Tokenizer choices that matter downstream:

* Byte-level pre-tokenizer and decoder with no normalizer and no prefix space, so
  ``decode(encode(x)) == x`` for any text (spaces, tabs, indentation, newlines, non-ASCII).
* A BOS token is prepended by the tokenizer's post-processor (as Llama tokenizers do), so the
  "add BOS once" logic of :func:`coderl.prompts.encode_prompt` is exercised by the tiny preset.
* Special tokens use ``<|...|>`` spellings that do not occur in ordinary source code; a
  tokenizer would otherwise split a literal ``</s>`` in a program into an EOS token.
* Weights are drawn with std ``1 / sqrt(hidden_size)`` (fan-in scaling), not transformers'
  default 0.02 (tuned for hidden sizes near 1000): with 0.02 at hidden 64 the frozen output head
  can only produce logits of about +-1, so LoRA training plateaus near log(vocab) (measured: a toy
  SFT loss went 6.98 -> 5.9 in 40 steps; with fan-in scaling 7.4 -> 1.8).
* A ChatML-style chat template (``<|im_start|>role ... <|im_end|>``) so instruct mode works; the
  generation config lists both ``<|endoftext|>`` and ``<|im_end|>`` as end tokens.
"""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

from coderl.errors import UserError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "qwen2")
BUILD_INFO_FILE = "tiny_model_build.json"

# A little C++ so the default vocabulary is not Python-only (stdio tasks may be C++).
CPP_SAMPLE = """#include <bits/stdc++.h>
using namespace std;

int main() {
    ios::sync_with_stdio(false);
    cin.tie(nullptr);
    int n;
    long long total = 0;
    cin >> n;
    vector<long long> a(n);
    for (int i = 0; i < n; ++i) {
        cin >> a[i];
        total += a[i];
    }
    sort(a.begin(), a.end());
    cout << total << "\\n";
    return 0;
}
"""


def stdlib_corpus_files(max_bytes: int) -> list[Path]:
    """Top-level standard-library ``*.py`` files, sorted by name, until ``max_bytes`` is reached."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def read_corpus(extra_files: list[str] | None, max_corpus_bytes: int) -> list[str]:
    """The training texts: standard-library sources, the C++ sample, then the extra files."""
    texts = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in stdlib_corpus_files(max_corpus_bytes)
    ]
    texts.append(CPP_SAMPLE)
    for name in extra_files or []:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"tokenizer corpus file not found: {name}")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def train_byte_level_bpe(texts: list[str], vocab_size: int):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` that round-trips any text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented on encode and break round-trips.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def wrap_tokenizer(tokenizer, max_positions: int):
    """A ``PreTrainedTokenizerFast`` around the trained tokenizer, with special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        # Cleaning up "tokenization spaces" rewrites " ," to "," etc. and breaks code round-trips.
        clean_up_tokenization_spaces=False,
        model_max_length=max_positions,
    )


def model_config(
    arch: str,
    tokenizer,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    initializer_range: float,
):
    """A Llama or Qwen2 config sized by the knobs, with token ids taken from the tokenizer."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    corpus: list[str] | None = None,
    seed: int = 0,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    max_corpus_bytes: int = 400_000,
    initializer_range: float | None = None,
) -> Path:
    """Train the tokenizer, build a random-init model, save both under ``out_dir``; return its path.

    ``corpus`` lists extra text files added to the default standard-library corpus.
    ``intermediate_size`` defaults to ``4 * hidden_size``; ``initializer_range`` (the std of the
    random weights) to ``1 / sqrt(hidden_size)`` (see the module docstring).
    """
    if arch not in ARCHITECTURES:
        raise UserError(
            f"unknown tiny model architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})"
        )
    if hidden_size % num_heads:
        raise UserError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if vocab_size < 300:
        raise UserError(
            f"vocab_size {vocab_size} is too small (the byte alphabet alone needs 256 + specials)"
        )
    started = time.perf_counter()
    out = Path(out_dir)
    texts = read_corpus(corpus, max_corpus_bytes)  # before the heavy imports: bad paths fail fast
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = wrap_tokenizer(train_byte_level_bpe(texts, vocab_size), max_positions)
    config = model_config(
        arch,
        tokenizer,
        hidden_size,
        num_layers,
        num_heads,
        intermediate_size or 4 * hidden_size,
        max_positions,
        initializer_range or hidden_size**-0.5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_info = {
        "arch": arch,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "initializer_range": config.initializer_range,
        "corpus_texts": len(texts),
        "corpus_chars": sum(len(t) for t in texts),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    (out / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")
    return out
