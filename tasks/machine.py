"""What machine this is, in the terms that change ragtune's numbers.

Float32 kernels differ between CPUs with and without AVX-512, and the bundled Gemma runs in
bfloat16 only where the CPU computes it natively, so a test failure or a benchmark figure means
little until it is tied to a CPU. CI and every benchmark print this first.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: The CPU flags that decide which kernels torch, oneDNN and numpy run.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """Which of FLAGS this CPU has (all False where /proc/cpuinfo is not there to say)."""
    cpuinfo = Path("/proc/cpuinfo")
    present: set[str] = set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                break
    return {flag: flag in present for flag in FLAGS}


def describe() -> str:
    """One line: CPU, its flags, cores, torch and its threads, and the dtype Gemma will use."""
    import torch

    from tasks.generators.local import resolve_dtype

    flags = " ".join(f"{flag}{'+' if has else '-'}" for flag, has in cpu_flags().items())
    return (
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores); {flags}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"LLM dtype {resolve_dtype('auto')}"
    )


if __name__ == "__main__":
    print(describe())
