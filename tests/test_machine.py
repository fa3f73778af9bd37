"""The machine line CI and the benchmarks print first, and how many cores are free."""

import os
import subprocess
import sys
import time

from tasks.llm.machine import FLAGS, cpu_flags, cpu_model, describe, others_busy

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass"


def test_the_machine_line_names_the_cpu_its_flags_and_the_llm_dtype(monkeypatch):
    monkeypatch.setenv("RAGTUNE_DTYPE", "float32")
    line = describe()

    assert line.startswith(cpu_model())
    assert set(cpu_flags()) == set(FLAGS)
    for flag, has in cpu_flags().items():
        assert f"{flag}{'+' if has else '-'}" in line
    assert "torch " in line and line.endswith("LLM dtype float32")


def test_an_isa_capped_below_bf16_picks_float32_and_says_so(monkeypatch):
    from tasks.llm.machine import native_bf16, resolve_dtype

    monkeypatch.delenv("RAGTUNE_DTYPE", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")

    assert native_bf16() is False
    assert resolve_dtype("auto") == "float32"
    assert "capped by ONEDNN_MAX_CPU_ISA=AVX2;" in describe()


def test_others_busy_counts_another_processs_work_and_not_this_ones():
    """The generator asks for free cores before every batch; its own last batch must not count
    as someone else's work, or every batch after the first runs on one thread."""
    import torch

    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    matrix = torch.randn(512, 512)
    others_busy()
    started, cpu = time.monotonic(), time.process_time()
    try:
        while time.process_time() - cpu < 1.5 * cores:
            matrix @ matrix
    finally:
        torch.set_num_threads(threads)
    own = (time.process_time() - cpu) / (time.monotonic() - started)
    # Others can only have had the cores this process left free.
    assert others_busy() <= cores - own + 0.3

    others_busy()
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", BURN.format(s=1.5)], check=True)
    assert others_busy() > 0.75 * 1.5 / (time.monotonic() - started)
