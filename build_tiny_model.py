"""Build the tiny random-init model and tokenizer used by ``PRESET=tiny`` and the tests.

Trains a byte-level BPE tokenizer on local text (the running Python's standard library plus any
``--corpus`` files) and saves a random-init Llama (or Qwen2) model with it, offline, in seconds,
deterministically for a seed. See ``coderl/tiny_model.py`` for the choices that matter.

    python build_tiny_model.py --out_dir checkpoints/tiny-llama
    python build_tiny_model.py --out_dir checkpoints/tiny-qwen --arch qwen2 --corpus data/toy_tasks.jsonl
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from coderl.cli import SEED_RANGE, parse_args
from coderl.errors import exit_on_user_error
from coderl.tiny_model import build_tiny_model


@dataclass
class TinyModelOptions:
    out_dir: str = field(
        default="checkpoints/tiny-llama", metadata={"help": "Directory to write the model into."}
    )
    arch: str = field(default="llama", metadata={"help": "Model architecture: 'llama' or 'qwen2'."})
    vocab_size: int = field(
        default=2048,
        metadata={
            "help": "Tokenizer vocabulary size (BPE merges + bytes + specials).",
            "range": "[300, inf)",
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Hidden size.", "range": "[1, inf)"})
    num_layers: int = field(
        default=4, metadata={"help": "Number of transformer layers.", "range": "[1, inf)"}
    )
    num_heads: int = field(
        default=4,
        metadata={"help": "Attention heads (hidden_size must divide by it).", "range": "[1, inf)"},
    )
    intermediate_size: int = field(
        default=0, metadata={"help": "MLP size; 0 = 4 * hidden_size.", "range": "[0, inf)"}
    )
    max_positions: int = field(
        default=1024,
        metadata={"help": "Maximum sequence length (position embeddings).", "range": "[1, inf)"},
    )
    corpus: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Extra text files for the tokenizer corpus (added to the standard-library sources)."
        },
    )
    max_corpus_bytes: int = field(
        default=400_000,
        metadata={
            "help": "Bytes of standard-library source to train the tokenizer on.",
            "range": "[1, inf)",
        },
    )
    initializer_range: float = field(
        default=0.0,
        metadata={
            "help": "Std of the random weights; 0 = 1 / sqrt(hidden_size).",
            "range": "[0, inf)",
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random weight initialisation.", "range": SEED_RANGE},
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    (options,) = parse_args((TinyModelOptions,), argv, description=__doc__.split("\n\n")[0])
    started = time.perf_counter()
    out = build_tiny_model(
        options.out_dir,
        arch=options.arch,
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        num_layers=options.num_layers,
        num_heads=options.num_heads,
        corpus=options.corpus or None,
        seed=options.seed,
        intermediate_size=options.intermediate_size or None,
        max_positions=options.max_positions,
        max_corpus_bytes=options.max_corpus_bytes,
        initializer_range=options.initializer_range or None,
    )
    print(
        json.dumps(
            {
                "out_dir": str(out),
                "seconds": round(time.perf_counter() - started, 2),
                **asdict(options),
            }
        )
    )


if __name__ == "__main__":
    main()
