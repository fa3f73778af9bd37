"""Benchmark publishing to Chroma and querying it.

1. Publish throughput (chunks/s) of `tasks.store.chroma.publish` against the floor it cannot beat:
   plain `model.encode` + `collection.upsert` of the same chunks, in the same run, alternated
   (ABAB) so that load from other processes hits both alike. Also: re-publishing the unchanged
   corpus (embeds nothing) and a corpus with 10% new chunks (copies the rest).
2. Query latency p50/p95 of the store part of search (resolve the alias, `collection.query`,
   k=5) at several collection sizes, with synthetic normalised vectors; and of a whole
   `chroma.search` (embedding the query with the bundled MiniLM) on the real chunks.

Chunks are real: the demo PDF (NIST AI 600-1) read and chunked as the ingest flow does
(128-token chunks), repeated with a marker when more are asked for than the PDF holds.
CPU heavy: run it alone, once. Prints a markdown table and writes it, with the command that made
it, to bench/RESULTS-publish.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/publish.py --chunks 600 --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preamble import NIST_PDF, ROOT, command, machine

import numpy as np

from tasks.models import MINILM, cached_model
from tasks.retrieval.report import markdown_table
from tasks.store import chroma

RESULTS = ROOT / "bench" / "RESULTS-publish.md"


def real_chunks(model, n: int) -> list[dict]:
    from dataclasses import asdict

    from tasks.ingest.chunking import chunk_id, chunk_pages
    from tasks.ingest.documents import read_document

    base = [
        asdict(c)
        for c in chunk_pages(read_document(NIST_PDF), model.tokenizer, max_tokens=128, overlap=16)
    ]
    rows = []
    for copy in range(n // len(base) + 1):
        for row in base:
            text = row["text"] if copy == 0 else f"[copy {copy}] {row['text']}"
            rows.append({**row, "id": chunk_id(text), "text": text})
    return rows[:n]


def clock() -> tuple[float, float]:
    """Wall time and this process's CPU time (all threads): on cores shared with other work the
    CPU time is the steadier measure of what the code itself costs."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def plain_publish(path: Path, rows: list[dict], model) -> tuple[float, float]:
    """The floor: encode everything at once, upsert in max-size batches, nothing else."""
    client = chroma.connect(path)
    start = clock()
    vectors = model.encode(
        [r["text"] for r in rows], normalize_embeddings=True, show_progress_bar=False
    )
    collection = client.create_collection(
        "plain", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    step = client.get_max_batch_size()
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        collection.upsert(
            ids=[r["id"] for r in part],
            embeddings=vectors[i : i + step],
            documents=[r["text"] for r in part],
            metadatas=[{"source": r["source"], "page_start": r["page_start"]} for r in part],
        )
    return since(start)


def ragtune_publish(
    path: Path, rows: list[dict], model
) -> tuple[tuple[float, float], chroma.PublishResult]:
    client = chroma.connect(path)
    start = clock()
    result = chroma.publish(client, rows, model, MINILM, 384)
    return since(start), result


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def query_latency(path: Path, size: int, queries: int, seed: int = 0) -> dict:
    """Alias resolution + `collection.query` (k=5) on `size` random unit vectors of dim 384."""
    rng = np.random.default_rng(seed)
    client = chroma.connect(path)
    collection = client.create_collection(
        f"synthetic__d384__{size}",
        embedding_function=None,
        configuration={"hnsw": {"space": "cosine"}},
        metadata={"model": MINILM, "dim": 384, "query_prompt": "", "chunk_count": size},
    )
    step = client.get_max_batch_size()
    start = time.perf_counter()
    for i in range(0, size, step):
        n = min(step, size - i)
        vectors = rng.standard_normal((n, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        collection.upsert(
            ids=[f"c{i + j}" for j in range(n)],
            embeddings=vectors,
            documents=[f"chunk {i + j}" for j in range(n)],
            metadatas=[{"source": "synthetic", "page_start": 1, "page_end": 1}] * n,
        )
    load_s = time.perf_counter() - start
    # The bench points an alias at the synthetic collection the way publish does.
    chroma._write_alias(client, "bench", chroma._Alias(collection.name, []))
    probes = rng.standard_normal((queries, 384)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)

    def query(probe: np.ndarray) -> None:
        live = chroma.resolve_alias(client, "bench")
        live.query(query_embeddings=probe[None, :], n_results=5, include=["documents", "metadatas"])

    return latency(
        query,
        list(probes),
        f"alias + query, {size:,} vectors",
        f"upserted at {size / load_s:,.0f} vectors/s",
    )


def search_latency(path: Path, rows: list[dict], queries: int) -> dict:
    client = chroma.connect(path)
    texts = [" ".join(r["text"].split()[:12]) for r in rows[:queries]]
    return latency(
        lambda text: chroma.search(client, "docs", text, k=5),
        texts,
        f"chroma.search (embeds the query), {len(rows):,} real chunks",
        "MiniLM query embedding included",
    )


def latency(call: Callable[[Any], Any], items: list[Any], what: str, note: str) -> dict:
    """p50 and p95 of `call` on each item, after one call to warm it up."""
    call(items[0])
    samples = []
    for item in items:
        t = time.perf_counter()
        call(item)
        samples.append(time.perf_counter() - t)
    p50, p95 = percentiles(samples)
    return {"what": what, "p50 ms": p50, "p95 ms": p95, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3, help="ABAB rounds for throughput")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    model = cached_model(MINILM)
    rows = real_chunks(model, args.chunks)
    tokens = statistics.mean(r["n_tokens"] for r in rows)
    work = Path(tempfile.mkdtemp(prefix="ragtune-bench-publish-"))
    print(f"{len(rows)} chunks (~{tokens:.0f} tokens each), work dir {work}")

    model.encode([r["text"] for r in rows[:64]], show_progress_bar=False)
    plain, ours = [], []
    for round_ in range(args.repeats):
        plain.append(plain_publish(work / f"plain{round_}", rows, model))
        seconds, result = ragtune_publish(work / f"ours{round_}", rows, model)
        assert result.embedded == len(rows), result
        ours.append(seconds)
        print(f"round {round_}: plain {plain[-1]} s, ragtune {ours[-1]} s (wall, cpu)")

    def median(samples: list[tuple[float, float]], which: int) -> float:
        return statistics.median(sample[which] for sample in samples)

    last = work / f"ours{args.repeats - 1}"
    again_s, again = ragtune_publish(last, rows, model)
    changed = (
        rows[: int(len(rows) * 0.9)] + real_chunks(model, len(rows) + len(rows) // 10)[len(rows) :]
    )
    changed_s, changed_result = ragtune_publish(last, changed, model)

    def row(what: str, chunks: int, wall: float, cpu: float, note: str = "") -> dict:
        return {
            "what": what,
            "chunks": chunks,
            "wall s": wall,
            "CPU s": cpu,
            "chunks/s (wall)": chunks / wall,
            "chunks/CPU-s": chunks / cpu,
            "note": note,
        }

    n = len(rows)
    wall_ratio = median(plain, 0) / median(ours, 0)
    cpu_ratio = median(plain, 1) / median(ours, 1)
    throughput = [
        row("plain encode + upsert (floor)", n, median(plain, 0), median(plain, 1)),
        row(
            "tasks.store.chroma.publish, new corpus",
            n,
            median(ours, 0),
            median(ours, 1),
            f"ratio to floor: wall {wall_ratio:.2f}, CPU {cpu_ratio:.2f}",
        ),
        row("re-publish, unchanged corpus", n, *again_s, f"embedded {again.embedded}"),
        row(
            "publish, 10% new chunks",
            len(changed),
            *changed_s,
            f"embedded {changed_result.embedded}, copied {changed_result.copied}",
        ),
    ]
    latency = [search_latency(last, changed, min(args.queries, 100))]
    for size in (int(s) for s in args.sizes.split(",") if s):
        latency.append(query_latency(work / f"synthetic{size}", size, args.queries))
        print(latency[-1])

    text = (
        "# Publish and search benchmark\n\n"
        f"Command: `{command()}`\n\n"
        f"Machine: {machine()} (shared with other work); model {MINILM}, dim 384; "
        f"{len(rows)} real NIST AI 600-1 chunks of ~{tokens:.0f} tokens; "
        f"median of {args.repeats} alternated rounds; CPU s = this process's CPU time.\n\n"
        "## Publish throughput\n\n"
        + markdown_table(throughput)
        + "\n## Query latency (k=5, embedded PersistentClient)\n\n"
        + markdown_table(latency)
    )
    print(text)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
