"""Load test of the search service (`ragtune serve-search`) against the plain library.

Two collections in one bench store: the demo's (the chunks `make demo` made, embedded by the
model it published, or by its base model if it published none) and a 10,000-chunk one (the
demo PDF chunked at 128 tokens, repeated with a marker, embedded by the bundled MiniLM). For
each, k=10, no re-ranking, with 1, 8 and 32 concurrent clients, closed loop (each client sends
its next query when its last is answered):

- service: `ragtune serve-search` in its own process, asked over HTTP by asyncio clients in
  this one; every search is logged, and after each run the query log must hold exactly one
  well-formed line per request sent.
- plain: what an app does without ragtune, in this process: sentence-transformers `encode` of
  the one query (prompt, Matryoshka cut, re-normalised) and Chroma `collection.query`, from as
  many threads as there are clients.

Queries are the demo's generated questions. CPU heavy: run it alone. Prints a markdown table
and writes it, with the command and the machine, to bench/RESULTS-search.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/search_load.py --workspace workspace
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from preamble import ROOT, command, machine

import httpx
import numpy as np

from tasks.learn.querylog import LOG_NAME
from tasks.models import MINILM, cached_model, resolve_model
from tasks.retrieval.report import markdown_table
from tasks.store import chroma
from tasks.workspace import Workspace, load_rows

RESULTS = ROOT / "bench" / "RESULTS-search.md"
OUT = ROOT / "bench" / "out" / "search-load"
K = 10
EXTRA_ENV: dict[str, str] = {}


def demo_collection(demo: Workspace, client: Any) -> str:
    """Publish the demo's chunks into the bench store as the demo did; returns the model."""
    rows = load_rows(demo.chunks_dir)
    try:
        meta = chroma.resolve_alias(chroma.connect(demo.chroma_dir), "docs").metadata or {}
    except chroma.StoreError:
        meta = {"model": MINILM, "dim": 384}
    chroma.publish(
        client,
        rows,
        cached_model(str(meta["model"])),
        model_ref=str(meta["model"]),
        dim=int(meta["dim"]),
        alias="demo",
        corpus="demo",
        query_prompt=str(meta.get("query_prompt", "")),
        document_prompt=str(meta.get("document_prompt", "")),
    )
    return str(meta["model"])


def large_collection(client: Any, size: int) -> None:
    """`size` real chunks published under `large` (idempotent: a re-run embeds nothing)."""
    from publish import real_chunks

    model = cached_model(MINILM)
    chroma.publish(
        client,
        real_chunks(model, size),
        model,
        model_ref=MINILM,
        dim=384,
        alias="large",
        corpus="large",
    )


def demo_questions(demo: Workspace) -> list[str]:
    rows = load_rows(demo.questions_dir)
    questions = [str(r["question"]) for r in rows if r.get("kept")]
    if not questions:
        raise SystemExit(f"no kept questions in {demo.questions_dir}: run `make demo` first")
    return questions


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def row(collection: str, clients: int, way: str, latencies: list[float], wall: float) -> dict:
    return {
        "collection": collection,
        "clients": clients,
        "way": way,
        "queries": len(latencies),
        "queries/s": len(latencies) / wall,
        "p50 ms": percentile(latencies, 50),
        "p99 ms": percentile(latencies, 99),
    }


def plain_searcher(path: Path, alias: str) -> Callable[[str], Any]:
    """One query as an app would run it with sentence-transformers and chromadb alone."""
    import chromadb
    from chromadb.config import Settings
    from sentence_transformers import SentenceTransformer

    client = chromadb.PersistentClient(str(path), settings=Settings(anonymized_telemetry=False))
    live = chroma.resolve_alias(client, alias)  # the alias record is ragtune's; the rest is not
    meta = live.metadata or {}
    collection = client.get_collection(live.name, embedding_function=None)
    model = SentenceTransformer(str(resolve_model(str(meta["model"]))), device="cpu")
    prompt, dim = str(meta.get("query_prompt", "")), int(meta["dim"])

    def search(query: str) -> Any:
        vector = model.encode([query], prompt=prompt, normalize_embeddings=True)[:, :dim]
        vector /= np.linalg.norm(vector, axis=1, keepdims=True)
        return collection.query(query_embeddings=vector, n_results=K)

    return search


def run_plain(search: Callable[[str], Any], queries: list[str], clients: int) -> tuple:
    latencies: list[float] = []
    lock = threading.Lock()
    todo = iter(queries)

    def client() -> None:
        while True:
            with lock:
                query = next(todo, None)
            if query is None:
                return
            start = time.perf_counter()
            search(query)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return latencies, time.perf_counter() - start


async def run_service(url: str, alias: str, queries: list[str], clients: int) -> tuple:
    latencies: list[float] = []
    todo = iter(queries)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client() -> None:
            for query in todo:
                start = time.perf_counter()
                answer = await http.post("/search", json={"query": query, "k": K, "alias": alias})
                answer.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


def start_service(workspace: Path, port: int) -> subprocess.Popen:
    ragtune = Path(sys.executable).with_name("ragtune")
    env = {**os.environ, "RAGTUNE_SEARCH_TOKEN": "", **EXTRA_ENV}
    proc = subprocess.Popen(
        [
            str(ragtune),
            "serve-search",
            "--workspace",
            str(workspace),
            "--alias",
            "demo",
            "--port",
            str(port),
            "--log-queries",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ragtune serve-search exited with {proc.returncode}")
        time.sleep(0.2)
    raise SystemExit("ragtune serve-search did not answer /health within 2 minutes")


def check_log(path: Path, before: int, sent: int) -> int:
    """The number of new lines, after checking each is one whole JSON search record."""
    lines = path.read_text().splitlines()[before:] if path.exists() else []
    for line in lines:
        record = json.loads(line)
        if not (record["query"] and len(record["hits"]) == K):
            raise SystemExit(f"malformed log line: {line[:200]}")
    if len(lines) != sent:
        raise SystemExit(f"{sent} searches sent but {len(lines)} lines logged")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workspace",
        type=Path,
        default=ROOT / "workspace",
        help="A workspace `make demo` filled (chunks, questions, published store).",
    )
    parser.add_argument("--large", type=int, default=10_000, help="Chunks in the large collection.")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--collections", default="demo,large")
    parser.add_argument(
        "--queries",
        type=int,
        default=1000,
        help="Queries per run (p99 is the 10th-slowest of 1,000: fewer make it noisy).",
    )
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()

    demo = Workspace.at(args.workspace)
    bench = Workspace.at(OUT)
    client = chroma.connect(bench.chroma_dir)
    demo_model = demo_collection(demo, client)
    large_collection(client, args.large)
    del client
    questions = demo_questions(demo)
    queries = (questions * (args.queries // len(questions) + 1))[: args.queries]
    clients = [int(n) for n in args.clients.split(",")]
    log = bench.querylog_dir / LOG_NAME
    shutil.rmtree(bench.querylog_dir, ignore_errors=True)

    results: list[dict] = []
    proc = start_service(bench.root, args.port)
    url = f"http://127.0.0.1:{args.port}"
    logged = 0
    try:
        for alias in args.collections.split(","):
            plain = plain_searcher(bench.chroma_dir, alias)
            for _ in range(2):  # warm both: first calls build caches and load the HNSW index
                plain(queries[0])
                httpx.post(f"{url}/search", json={"query": queries[0], "k": K, "alias": alias})
                logged += 1
            for n in clients:
                results.append(row(alias, n, "plain", *run_plain(plain, queries, n)))
                latencies, wall = asyncio.run(run_service(url, alias, queries, n))
                results.append(row(alias, n, "service", latencies, wall))
                logged += check_log(log, logged, len(queries))
                print(markdown_table(results[-2:]), flush=True)
    finally:
        health = httpx.get(f"{url}/health").json() if proc.poll() is None else {}
        proc.terminate()
        proc.wait(timeout=60)

    for result in results:
        plain_row = next(
            r
            for r in results
            if r["way"] == "plain"
            and (r["collection"], r["clients"]) == (result["collection"], result["clients"])
        )
        # Cost per query is 1 / throughput: above 1, the service pays more per query.
        result["cost vs plain"] = plain_row["queries/s"] / result["queries/s"]
    table = markdown_table(results)
    batches = health.get("batches") or 1
    text = (
        "# Search service under load\n\n"
        f"Command: `{command()}`\n\nMachine: {machine()}\n\n"
        f"Demo collection: {len(load_rows(demo.chunks_dir))} chunks, model {demo_model}; "
        f"large: {args.large} chunks, {MINILM}. k={K}, no re-ranking, {args.queries} queries "
        f"per run. The service logged {logged} searches, one whole JSON line each; its demo "
        f"alias took {health.get('searches')} searches in {batches} encodes "
        f"({(health.get('searches') or 0) / batches:.1f} per batch).\n\n{table}"
    )
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
