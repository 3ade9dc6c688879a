"""What the CPU offers the numeric code: whether it computes bfloat16 matmuls in hardware.

Stdlib only, so the shell pipelines can ask (``python -m coderl.cpu``) without importing torch.
Where the CPU has AMX-bf16 or AVX512-BF16, bfloat16 weights roughly halve a forward+backward
pass against float32; without them bfloat16 is emulated and slower, so float32 is the choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

# /proc/cpuinfo flag -> the name a person knows it by, in order of preference.
BF16_FLAGS = {"amx_bf16": "AMX-bf16", "avx512_bf16": "AVX512-BF16"}


def bf16_feature_in(cpuinfo: str) -> str | None:
    """The first bf16 feature that ``/proc/cpuinfo`` text lists among its flags, or None."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return next((name for flag, name in BF16_FLAGS.items() if flag in flags), None)


def cpu_bf16_feature(
    cpuinfo: Path = Path("/proc/cpuinfo"), platform: str = sys.platform
) -> str | None:
    """This machine's bf16 feature (Linux only; elsewhere, or unreadable, None)."""
    if not platform.startswith("linux"):
        return None
    try:
        return bf16_feature_in(cpuinfo.read_text())
    except OSError:
        return None


def main() -> None:
    """Print the bf16 feature, or nothing when there is none."""
    print(cpu_bf16_feature() or "")


if __name__ == "__main__":
    main()
