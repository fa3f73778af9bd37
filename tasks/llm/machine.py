"""What machine this is, in the terms that change ragtune's numbers.

Float32 kernels differ between CPUs with and without AVX-512, and the bundled Gemma runs in
bfloat16 only where the CPU computes it natively, so a test failure or a benchmark figure means
little until it is tied to a CPU. CI and every benchmark print this first.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

#: The CPU flags that decide which kernels torch, oneDNN and numpy run.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
#: The settings that stop torch's own kernels, oneDNN, MKL and FBGEMM short of the CPU's newest
#: instructions; `bench/avx2-only` sets them all to run as a CPU without AVX-512 would.
ISA_CAPS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "FBGEMM_ENABLE_INSTRUCTIONS",
)


def _busy_sample() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds the whole machine has been busy, this process's CPU seconds),
    or None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as handle:
            user, nice, system, _idle, _iowait, irq, softirq = map(
                int, handle.readline().split()[1:8]
            )
    except (OSError, ValueError):
        return None
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, time.process_time()


_LAST_SAMPLE = {"sample": _busy_sample(), "others": None}
_SAMPLE_LOCK = threading.Lock()


def others_busy() -> float:
    """Cores that other processes have kept busy since the previous call (or since this module
    was imported), at least one second back: the machine's busy CPU time less this process's
    own. The 1-minute load average, the fallback where /proc/stat is missing, counts this
    process's own work too, so a generator asked batch after batch read its own first batch
    as someone else's and ran every later batch on one thread of two, 1.5x slower."""
    with _SAMPLE_LOCK:
        now, last = _busy_sample(), _LAST_SAMPLE["sample"]
        if now is None or last is None:
            return os.getloadavg()[0]
        wall = now[0] - last[0]
        if wall >= 1.0:
            own = now[2] - last[2]
            _LAST_SAMPLE["others"] = max(0.0, (now[1] - last[1] - own) / wall)
            _LAST_SAMPLE["sample"] = now
        others = _LAST_SAMPLE["others"]
        return os.getloadavg()[0] if others is None else others


def idle_cores() -> int:
    """Cores this process may use minus those other processes keep busy, at least 1, at most 8.

    On a busy machine extra torch threads wait on each other: with 2 cores and a load of 8,
    two threads ran a decoding step 8x slower than one (bench/RESULTS-generation.md).
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(8, cores - round(others_busy())))


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


def isa_caps() -> dict[str, str]:
    """The ISA_CAPS set in this process's environment, by name."""
    return {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}


#: Overrides what "auto" picks, for every generator and judge in the process: a test run or
#: benchmark can take the float32 path on a bf16 CPU, as a CPU without native bf16 would.
DTYPE_ENV = "RAGTUNE_DTYPE"


#: How Gemma computes: its weights' dtype, or float32 activations with int8 linear layers.
DTYPES = ("float32", "bfloat16", "int8")


def resolve_dtype(dtype: str) -> str:
    """ "auto" is bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: about twice
    as fast as float32 here, and Gemma was trained in bfloat16), else float32; the environment
    variable RAGTUNE_DTYPE, when set, decides instead. "int8" is float32 with the transformer
    blocks' linear layers in int8, each row scaled on its own (`tasks.llm.quantisation`)."""
    choices = ("auto", *DTYPES)
    if dtype not in choices:
        raise ValueError(f"dtype must be one of {', '.join(choices)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    forced = os.environ.get(DTYPE_ENV, "auto")
    if forced not in choices:
        raise ValueError(f"{DTYPE_ENV}={forced!r}: use one of {', '.join(choices)}")
    if forced != "auto":
        return forced
    return "bfloat16" if native_bf16() else "float32"


def native_bf16() -> bool:
    """Whether bfloat16 matrix products run in hardware here: the CPU has AVX512-BF16 or AMX,
    and oneDNN (which torch's bfloat16 linear layers go through) is not capped below them."""
    import torch

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if cap not in ("ALL", "DEFAULT") and "BF16" not in cap and "AMX" not in cap:
        return False
    checks = [
        getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check is not None and check() for check in checks)


def describe() -> str:
    """One line: CPU, its flags, cores, torch and its threads, and the dtype Gemma will use."""
    import torch

    flags = " ".join(f"{flag}{'+' if has else '-'}" for flag, has in cpu_flags().items())
    caps = " ".join(f"{name}={value}" for name, value in isa_caps().items())
    return (
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores); {flags}; "
        f"{f'capped by {caps}; ' if caps else ''}"
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"LLM dtype {resolve_dtype('auto')}"
    )


if __name__ == "__main__":
    print(describe())
