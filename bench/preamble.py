"""What every benchmark starts with: this project importable, offline settings, and the machine.

Benchmarks run as scripts (`python bench/NAME.py`), so this folder is on the path and each one
imports this module first. Numbers mean little until they are tied to a CPU (AVX-512 or only
AVX2, native bf16 or not), so every result file records `machine()`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NIST_PDF = ROOT / "data" / "sources" / "NIST.AI.600-1.pdf"
#: Where benchmarks keep corpus vectors they share (`stored_vectors`).
VECTORS = ROOT / "bench" / "out" / "vectors"
#: Where a labelled BEIR set (SciFact dev, or your own) is read from when --beir is not given.
BEIR_ENV = "RAGTUNE_BEIR"


def machine() -> str:
    """The CPU, its flags, torch and its threads, and the load average right now."""
    from tasks.llm.machine import describe

    return f"{describe()}; load average {os.getloadavg()[0]:.1f}"


def command() -> str:
    """The command line that reproduces this run, with the settings from the environment that
    change its numbers: the LLM's dtype, the labelled set (by folder name only, as it lives
    somewhere on each machine) and an ISA cap (`bench/avx2-only`)."""
    import shlex

    from tasks.llm.machine import DTYPE_ENV, isa_caps

    forced = [
        f"{DTYPE_ENV}={os.environ[DTYPE_ENV]}" if os.environ.get(DTYPE_ENV) else "",
        f"{BEIR_ENV}=.../{Path(os.environ[BEIR_ENV]).name}" if os.environ.get(BEIR_ENV) else "",
        "bench/avx2-only" if isa_caps() else "",
    ]
    script = f"bench/{Path(sys.argv[0]).name}"
    return " ".join(
        ["HF_HUB_OFFLINE=1", *filter(None, forced), ".venv/bin/python", script]
        + [shlex.quote(a) for a in sys.argv[1:]]
    )


def beir_folder(given: Path | None) -> Path:
    """The labelled set to benchmark on: --beir, else $RAGTUNE_BEIR; an error naming both."""
    folder = given or (Path(os.environ[BEIR_ENV]) if os.environ.get(BEIR_ENV) else None)
    if folder is None or not (folder / "corpus.jsonl").exists():
        raise SystemExit(
            f"no BEIR folder (corpus.jsonl, queries.jsonl, qrels/): pass --beir PATH or set "
            f"{BEIR_ENV} (got {folder})"
        )
    return folder


def stored_vectors(model, model_ref: str, texts: list[str], folder: Path = VECTORS):
    """`model`'s unit vectors of `texts` (as documents), computed once and kept in `folder`:
    a benchmark re-run on the same corpus, or another benchmark on it, skips minutes of
    encoding."""
    import numpy as np

    from tasks.workspace import fingerprint

    stored = folder / f"corpus-{fingerprint(model_ref, texts)}.npy"
    if not stored.exists():
        folder.mkdir(parents=True, exist_ok=True)
        vectors = model.encode_document(
            texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True
        )
        np.save(stored, vectors)
    return np.load(stored)


def add_passage_tokens(parser: Any) -> None:
    """The `--passage-tokens N` option of the benchmarks that run the judge."""
    from tasks.llm.likelihood import MAX_PASSAGE_TOKENS

    parser.add_argument(
        "--passage-tokens",
        type=int,
        default=MAX_PASSAGE_TOKENS,
        help="The judge reads N tokens of each passage (0: no cut).",
    )
