"""Benchmark the `local` question generator (bundled Gemma 3 270M through transformers).

Measures, on real chunks of the demo PDF (NIST AI 600-1, chunked as the ingest flow does):
- load time cold (dequantise the GGUF into an empty cache folder, then load) and warm (reload
  the cached fp32 weights);
- questions/s and tokens/s at batch size 1 and 8 (one question per passage);
- variety with several questions per passage (distinct share, question shape).

CPU heavy: run it alone, once. Prints a markdown table and writes it, with the command that made
it, to bench/RESULTS-generation.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py --chunks 50 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flows.artifacts import markdown_table  # noqa: E402
from tasks.generators import Generation  # noqa: E402
from tasks.generators import local as local_gen  # noqa: E402

NIST_PDF = ROOT / "data" / "sources" / "NIST.AI.600-1.pdf"
RESULTS = ROOT / "bench" / "RESULTS-generation.md"
QUESTION_START = re.compile(
    r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|"
    r"should|would|will|has|have|may|in what|to what)\b",
    re.I,
)


def demo_chunks(count: int) -> list[str]:
    """The demo corpus chunked like the ingest flow (256 MiniLM tokens, 32 overlap)."""
    from transformers import AutoTokenizer

    from tasks.chunking import chunk_pages
    from tasks.documents import read_document
    from tasks.models import MINILM, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    chunks = chunk_pages(read_document(NIST_PDF), tokenizer, max_tokens=256, overlap=32)
    # Skip the front matter (title page, contents) the way a reader would not ask about it.
    return [c.text for c in chunks[len(chunks) // 10 :]][:count]


def timed_load(cache: Path) -> float:
    local_gen.unload_gemma()
    start = time.perf_counter()
    local_gen.load_gemma(cache)
    return time.perf_counter() - start


def run(chunks: list[str], batch_size: int, n: int) -> dict[str, object]:
    gen = local_gen.LocalGenerator(n=n, batch_size=batch_size)
    start = time.perf_counter()
    results: list[Generation] = gen.generate(chunks)
    wall = time.perf_counter() - start
    questions = [q for r in results for q in r.questions]

    def share(count: int) -> str:
        return f"{count / max(len(questions), 1):.0%}"

    per_passage_distinct = sum(len(set(r.questions)) for r in results)
    completion = sum(r.completion_tokens for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    return {
        "batch size": batch_size,
        "n per passage": n,
        "passages": len(chunks),
        "questions": len(questions),
        "failed": sum(r.error is not None for r in results),
        "wall s": round(wall, 1),
        "questions/s": round(len(questions) / wall, 3),
        "s/question": round(wall / max(len(questions), 1), 2),
        "prompt tok/s": round(prompt / wall, 1),
        "new tok/s": round(completion / wall, 1),
        "mean prompt tok": round(prompt / max(len(questions), 1)),
        "ends with ?": share(sum(q.endswith("?") for q in questions)),
        "wh/aux start": share(sum(bool(QUESTION_START.match(q)) for q in questions)),
        "distinct in run": share(len(set(questions))),
        "distinct per passage": share(per_passage_distinct),
        "_sample": questions[:6],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--variety-chunks", type=int, default=12, help="0 skips the n=3 run")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    import torch

    threads = local_gen.default_threads()
    load_before = os.getloadavg()
    chunks = demo_chunks(args.chunks)

    with tempfile.TemporaryDirectory(prefix="ragtune-bench-cache-") as tmp:
        start = time.perf_counter()
        local_gen.dequantised_model_dir(Path(tmp))
        dequantise = time.perf_counter() - start
        cold = dequantise + timed_load(Path(tmp))
        warm = timed_load(Path(tmp))
    timed_load(local_gen.cache_root())

    rows = [run(chunks, int(b), 1) for b in args.batch_sizes.split(",")]
    if args.variety_chunks:
        rows.append(
            run(chunks[: args.variety_chunks], max(int(b) for b in args.batch_sizes.split(",")), 3)
        )
    load_after = os.getloadavg()

    samples = rows[-1].pop("_sample")
    for row in rows:
        row.pop("_sample", None)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py " + shlex.join(sys.argv[1:])
    loads = [
        {"load": "cold (dequantise GGUF + save fp32 cache + load)", "seconds": round(cold, 1)},
        {"load": "warm (fp32 weights from the cache)", "seconds": round(warm, 1)},
    ]
    text = "\n".join(
        [
            "## Question generation: local Gemma 3 270M (transformers, CPU)",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
            f"torch {torch.__version__} with {threads} threads; load average "
            f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared: "
            "higher load means slower numbers). Chunks: the first "
            f"{len(chunks)} body chunks of NIST AI 600-1 (256 MiniLM tokens, 32 overlap).",
            "",
            markdown_table(loads),
            markdown_table(rows),
            "Sample questions (n=3 run): " + "; ".join(f"“{q}”" for q in samples),
            "",
        ]
    )
    print(text)
    if args.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
