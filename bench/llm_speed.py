"""Benchmark the bundled Gemma's LLM work against what this machine can compute.

First the machine's limit: matrix-multiply throughput at the shapes Gemma 3 270M uses (tokens x
640 hidden x 2048 MLP), in float32, bfloat16 and, through torch's dynamic int8 quantisation of
linear layers, int8. Then the work: the judge (`tasks.llm.likelihood`) scoring the top 5, 10
and 20 candidates of real questions against real NIST AI 600-1 chunks, and the generator writing
questions, each as time per unit of work, the FLOPs that unit needs (2 x parameters x tokens
through the transformer, plus the vocabulary projection where logits are read) and so the
share of the measured limit reached.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_speed.py                 # the dtype auto picks
    HF_HUB_OFFLINE=1 RAGTUNE_DTYPE=float32 .venv/bin/python bench/llm_speed.py

Run it alone: the numbers are only as good as the machine is idle. It appends a section to
bench/RESULTS-llm-speed.md with the command and the machine line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

from preamble import NIST_PDF, ROOT, add_passage_tokens, command, machine

import torch

from tasks.ingest.chunking import chunk_pages
from tasks.ingest.documents import read_document
from tasks.llm.gemma import load_gemma
from tasks.llm.likelihood import JUDGE_CACHE, local_judge
from tasks.llm.machine import resolve_dtype
from tasks.llm.quantisation import Int8Linear
from tasks.models import MINILM, load_model
from tasks.questions.writers import make_generator
from tasks.retrieval.report import markdown_table

RESULTS = ROOT / "bench" / "RESULTS-llm-speed.md"
#: Real questions a NIST AI 600-1 reader asks; the judge's cost depends on lengths, not answers.
QUESTIONS = [
    "What risks does generative AI pose to information integrity?",
    "How should organizations document the provenance of training data?",
    "What is confabulation in large language models?",
    "Which actions help manage harmful bias in GAI systems?",
    "How can red-teaming be used to evaluate a generative model?",
    "What are the privacy risks of training on personal data?",
    "How should incidents involving GAI systems be disclosed?",
    "What does the profile recommend for third-party model components?",
]


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_limits(tokens: int = 2048, hidden: int = 640, mlp: int = 2048) -> dict[str, float]:
    """GFLOP/s of one linear layer's product at Gemma's shapes, per arithmetic."""
    x = torch.randn(tokens, hidden)
    layer = torch.nn.Linear(hidden, mlp, bias=False)
    flops = 2 * tokens * hidden * mlp
    limits = {}
    with torch.inference_mode():
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            lx, ll = x.to(dtype), layer.to(dtype)
            ll(lx)
            limits[name] = flops / median_seconds(lambda lx=lx, ll=ll: ll(lx), 10) / 1e9
        quantised = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(hidden, mlp, bias=False)),
            {torch.nn.Linear},
            dtype=torch.qint8,
        )
        quantised(x)
        limits["int8"] = flops / median_seconds(lambda: quantised(x), 10) / 1e9
    return limits


def transformer_parameters(model) -> tuple[int, int, int]:
    """(parameters a token passes through, vocabulary size, hidden size): the embedding table
    is a lookup, not a product, except where logits are computed from it."""
    vocab, hidden = model.get_input_embeddings().weight.shape
    total = sum(p.numel() for p in model.parameters())
    # Int8 linear layers hold their weights packed, outside `parameters()`.
    total += sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Int8Linear)
    )
    return total - vocab * hidden, vocab, hidden


def judge_rows(
    passages: list[str],
    dtype: str,
    repeats: int,
    limit: float,
    passage_tokens: int | None,
    tops: list[int],
) -> list[dict]:
    judge = local_judge(dtype=dtype, max_passage_tokens=passage_tokens)
    body, vocab, hidden = transformer_parameters(judge.model)
    tokenizer = judge.tokenizer
    rows = []
    for top in tops:
        candidates = passages[:top]
        judge.score(QUESTIONS[0], candidates)  # warm-up
        seconds = statistics.median(
            median_seconds(lambda q=q, c=candidates: judge.score(q, c), repeats) for q in QUESTIONS
        )
        context = sum(len(judge.context_ids(p)) for p in candidates)
        question = statistics.mean(
            len(tokenizer(" " + q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS
        )
        tokens = context + top * question
        flops = 2 * body * tokens + 2 * vocab * hidden * top * question
        rows.append(
            {
                "judge": f"top {top}",
                "s / query": f"{seconds:.2f}",
                "tokens / query": int(tokens),
                "GFLOP / query": f"{flops / 1e9:.0f}",
                "GFLOP/s": f"{flops / seconds / 1e9:.0f}",
                "share of limit": f"{flops / seconds / 1e9 / limit:.0%}",
            }
        )
    return rows


def many_query_rows(passages: list[str], dtype: str) -> list[dict]:
    """Judging many queries' top 10, as `learn` and re-ranked evaluation do: one query at a
    time, all pairs in shared batches (`score_many`), and with the passage-state cache where
    the queries' candidates recur (16 queries drawing their 10 from the same 20 passages)."""
    plain = local_judge(dtype=dtype)
    cached = local_judge(dtype=dtype, cache_size=JUDGE_CACHE)
    queries = QUESTIONS * 2
    fresh = [(q, passages[i : i + 10]) for i, q in enumerate(queries)]
    recurring = [(q, passages[(3 * i) % 10 : (3 * i) % 10 + 10]) for i, q in enumerate(queries)]
    plain.score(*fresh[0])  # warm-up
    runs = {
        "one query at a time": lambda: [plain.score(q, c) for q, c in fresh],
        "16 queries in shared batches": lambda: plain.score_many(fresh),
        "one at a time, recurring candidates": lambda: [plain.score(q, c) for q, c in recurring],
        "recurring candidates, state cache": lambda: (
            cached.states.clear(),
            [cached.score(q, c) for q, c in recurring],
        ),
    }
    return [
        {"16 queries x top 10": name, "s / query": f"{median_seconds(run, 1) / len(queries):.2f}"}
        for name, run in runs.items()
    ]


def generator_row(passages: list[str], dtype: str, limit: float, batch_size: int) -> dict:
    generator = make_generator(
        "local", n=3, dtype=dtype, batch_size=batch_size, show_progress=False
    )
    generator.generate(passages[:2])  # warm-up: loads the model
    model, _ = load_gemma(dtype=dtype)
    body, vocab, hidden = transformer_parameters(model)
    started = time.perf_counter()
    results = generator.generate(passages[:16])
    seconds = time.perf_counter() - started
    questions = sum(len(r.questions) for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    # Every generated token also goes through the vocabulary projection, counted at float32's
    # full cost even where an int8 ranking shortlists it, so paths compare on the same work.
    flops = 2 * body * (prompt + completion) + 2 * vocab * hidden * completion
    return {
        "generator": f"16 chunks, 3 questions each, batch {batch_size}",
        "questions/s": f"{questions / seconds:.2f}",
        "s": f"{seconds:.1f}",
        "prompt + completion tokens": prompt + completion,
        "GFLOP/s": f"{flops / seconds / 1e9:.0f}",
        "share of limit": f"{flops / seconds / 1e9 / limit:.0%}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per question.")
    parser.add_argument("--no-generator", action="store_true", help="Time the judge only.")
    parser.add_argument(
        "--tops", default="5,10,20", help="Candidates per query to time the judge on."
    )
    parser.add_argument(
        "--no-many", action="store_true", help="Skip the many-queries-at-once rows."
    )
    parser.add_argument(
        "--generator-batch", type=int, default=16, help="Sequences per generator forward pass."
    )
    add_passage_tokens(parser)
    args = parser.parse_args()
    dtype = resolve_dtype("auto")
    print(machine())
    limits = matmul_limits()
    print({name: round(value, 1) for name, value in limits.items()})
    tokenizer = load_model(MINILM).tokenizer
    passages = [
        c.text for c in chunk_pages(read_document(NIST_PDF), tokenizer, max_tokens=256, overlap=32)
    ][20:60]
    tops = [int(top) for top in args.tops.split(",")]
    judged = judge_rows(
        passages, dtype, args.repeats, limits[dtype], args.passage_tokens or None, tops
    )
    print(markdown_table(judged))
    many = [] if args.no_many else many_query_rows(passages, dtype)
    if many:
        print(markdown_table(many))
    generated = (
        []
        if args.no_generator
        else [generator_row(passages, dtype, limits[dtype], args.generator_batch)]
    )
    if generated:
        print(markdown_table(generated))
    section = (
        f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, LLM dtype {dtype}\n\n"
        f"Command: `{command()}`\n\nMachine: {machine()}\n\n"
        "Matrix-multiply limit at Gemma's shapes (2048 tokens x 640 x 2048), GFLOP/s:\n\n"
        + markdown_table([{k: f"{v:.0f}" for k, v in limits.items()}])
        + f"\nJudge (median over {len(QUESTIONS)} questions x {args.repeats} runs, 256-token "
        f"NIST chunks{f' cut to {args.passage_tokens} tokens' if args.passage_tokens else ''}):"
        "\n\n"
        + markdown_table(judged)
        + ("\nMany queries (amortised):\n\n" + markdown_table(many) if many else "")
        + ("\nGenerator:\n\n" + markdown_table(generated) if generated else "")
    )
    if not RESULTS.exists():
        RESULTS.write_text("# LLM speed against the machine's limit\n")
    with RESULTS.open("a") as handle:
        handle.write(section)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
