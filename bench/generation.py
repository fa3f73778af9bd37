"""Benchmark the `local` question generator (bundled Gemma 3 270M through transformers).

Measures, on real chunks of the demo PDF (NIST AI 600-1, chunked as the ingest flow does):
- load time cold (dequantise the GGUF into an empty cache folder, then load) and warm (reload
  the cached fp32 weights);
- questions/s and tokens/s at batch size 1 and 8 (one question per passage);
- variety with several questions per passage (distinct share, question shape).

CPU heavy: run it alone, once. Prints a markdown table and writes it, with the command that made
it, to bench/RESULTS-generation.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py --chunks 50 --batch-sizes 1,8,16
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

from preamble import NIST_PDF, ROOT, command, machine

from tasks.llm.machine import idle_cores
from tasks.questions.generation import Generation
from tasks.questions.writers import local as local_gen
from tasks.retrieval.report import markdown_table

RESULTS = ROOT / "bench" / "RESULTS-generation.md"
QUESTION_START = re.compile(
    r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|"
    r"should|would|will|has|have|may|in what|to what)\b",
    re.I,
)


def demo_chunks(count: int) -> list[str]:
    """The demo corpus chunked like the ingest flow (256 MiniLM tokens, 32 overlap)."""
    from transformers import AutoTokenizer

    from tasks.ingest.chunking import chunk_pages
    from tasks.ingest.documents import read_document
    from tasks.models import MINILM, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    chunks = chunk_pages(read_document(NIST_PDF), tokenizer, max_tokens=256, overlap=32)
    # Skip the front matter (title page, contents) the way a reader would not ask about it.
    return [c.text for c in chunks[len(chunks) // 10 :]][:count]


def timed_load(cache: Path, dtype: str) -> float:
    local_gen.unload_gemma()
    start = time.perf_counter()
    local_gen.load_gemma(cache, dtype)
    return time.perf_counter() - start


def run(label: str, chunks: list[str], **settings: object) -> tuple[dict, dict, list[str]]:
    """One timed generation; returns a speed row, a shape row and a few sample questions."""
    settings.setdefault("threads", idle_cores())
    gen = local_gen.LocalGenerator(show_progress=True, **settings)  # type: ignore[arg-type]
    start = time.perf_counter()
    results: list[Generation] = gen.generate(chunks)
    wall = time.perf_counter() - start
    questions = [q for r in results for q in r.questions]
    asked = max(len(questions), 1)

    def share(count: int) -> str:
        return f"{count / asked:.0%}"

    completion = sum(r.completion_tokens for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    speed = {
        "run": label,
        "batch": gen.batch_size,
        "n": gen.n,
        "dtype": gen.dtype,
        "threads": gen.threads,
        "passages": len(chunks),
        "questions": len(questions),
        "failed": sum(r.error is not None for r in results),
        "wall s": f"{wall:.1f}",
        "questions/s": f"{len(questions) / wall:.2f}",
        "s/question": f"{wall / asked:.2f}",
        "prompt tok/s": round(prompt / wall),
        "new tok/s": f"{completion / wall:.1f}",
    }
    shape = {
        "run": label,
        "mean prompt tok": round(prompt / max(len(chunks), 1)),
        "mean new tok/question": f"{completion / asked:.1f}",
        "ends with ?": share(sum(q.endswith("?") for q in questions)),
        "wh/aux start": share(sum(bool(QUESTION_START.match(q)) for q in questions)),
        "distinct in run": share(len(set(questions))),
        "distinct within passage": share(sum(len(set(r.questions)) for r in results)),
    }
    return speed, shape, questions[:6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument(
        "--compare-chunks",
        type=int,
        default=16,
        help="chunks for the dtype, thread and n=3 comparisons (0 skips them)",
    )
    parser.add_argument(
        "--cold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time a first load into an empty cache (dequantising takes about a minute)",
    )
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    load_before = os.getloadavg()
    chunks = demo_chunks(args.chunks)
    dtype = local_gen.resolve_dtype("auto")

    loads = []
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="ragtune-bench-cache-") as tmp:
            start = time.perf_counter()
            local_gen.dequantised_model_dir(Path(tmp))
            cold = time.perf_counter() - start + timed_load(Path(tmp), dtype)
        loads.append({"load": "cold: dequantise GGUF, save fp32 cache, load", "s": f"{cold:.1f}"})
    warm = timed_load(local_gen.cache_root(), dtype)
    loads.append({"load": f"warm: load the cached weights as {dtype}", "s": f"{warm:.1f}"})

    runs = [run(f"batch {b}", chunks, batch_size=int(b)) for b in args.batch_sizes.split(",")]
    few = chunks[: args.compare_chunks]
    if few:
        other = "float32" if dtype == "bfloat16" else "bfloat16"
        runs += [
            run(f"{dtype}, {len(few)} chunks", few, batch_size=8, dtype=dtype),
            run(f"{other}, {len(few)} chunks", few, batch_size=8, dtype=other),
            run(f"1 thread, {len(few)} chunks", few, batch_size=8, threads=1),
            run(f"2 threads, {len(few)} chunks", few, batch_size=8, threads=2),
            run(f"n=3, {len(few)} chunks", few, batch_size=8, n=3),
        ]
    load_after = os.getloadavg()

    text = "\n".join(
        [
            "## Question generation: local Gemma 3 270M (transformers, CPU)",
            "",
            f"Command: `{command()}`",
            "",
            f"Machine: {machine()}; load average {load_before[0]:.1f} before and "
            f"{load_after[0]:.1f} after (the machine "
            "is shared: a higher load means slower numbers). Passages: "
            f"{len(chunks)} body chunks of NIST AI 600-1 (256 MiniLM tokens, 32 overlap), "
            "prompt = 2 rotated few-shot examples + the passage; one question per passage unless "
            "n says otherwise.",
            "",
            markdown_table(loads),
            markdown_table([speed for speed, _, _ in runs]),
            markdown_table([shape for _, shape, _ in runs]),
            "Sample questions (n=3 run): " + "; ".join(f"“{q}”" for q in runs[-1][2]),
            "",
            "### Runtime choice",
            "",
            markdown_table(RUNTIMES),
            RUNTIME_NOTE,
        ]
    )
    print(text)
    if args.write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


#: Measured by hand for docs/library-notes.md (llama-cpp-python is not installed: it compiles
#: for ~14 min).
RUNTIMES = [
    {
        "runtime": "llama-cpp-python",
        "install": "compiles: ~14 min on 2 busy cores",
        "first load": "1.1 s",
        "later loads": "1.1 s",
        "speed": "~1.2 s/question, sequential",
        "source": "docs/library-notes.md",
    },
    {
        "runtime": "transformers GGUF loader, fp32",
        "install": "no compiler (gguf, accelerate)",
        "first load": "64-79 s (dequantise)",
        "later loads": "~3 s (cached fp32)",
        "speed": "~0.9 s/question batched by 4",
        "source": "docs/library-notes.md",
    },
    {
        "runtime": "transformers, tasks/questions/local.py",
        "install": "no compiler",
        "first load": "cold, above",
        "later loads": "warm, above",
        "speed": "tables above",
        "source": "this benchmark",
    },
]
RUNTIME_NOTE = (
    "transformers is the runtime of the `local` generator: nothing to compile, batched "
    "generation, and the dequantised weights are cached once per machine. llama.cpp stays the "
    "way to serve the GGUF over HTTP: run its OpenAI-compatible server and point the `api` "
    'generator at it with `endpoint="completions"` (a base model answers chat requests with '
    "empty content).\n"
)

if __name__ == "__main__":
    main()
