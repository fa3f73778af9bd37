"""The HTTP search service on a real port: search, health, the bearer token, clear errors, a
503 until something is published, and one well-formed log line per search under load."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from ragtune import Retriever
from tasks.learn.querylog import LOG_NAME
from tasks.serving.service import create_app
from tasks.store import chroma
from tests.conftest import free_port, publish_tuned

TOKEN = "s3cret-token-for-tests"


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` under uvicorn on a socket bound and listening before the server starts, so a
    request sent at once waits in the backlog instead of being refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def retriever_on(workspace, **kwargs) -> Retriever:
    return Retriever.open("docs", workspace=workspace.root, recheck_seconds=0, **kwargs)


def log_lines(workspace) -> list[str]:
    path = workspace.querylog_dir / LOG_NAME
    return path.read_text().splitlines() if path.exists() else []


def test_search_and_health_answer_as_the_retriever_does(published):
    ws, rows, result = published
    target = rows[6]
    with serving(create_app(retriever_on(ws))) as url:
        found = httpx.post(f"{url}/search", json={"query": target["text"][:200], "k": 3})
        health = httpx.get(f"{url}/health")
        openapi = httpx.get(f"{url}/openapi.json")

    assert found.status_code == 200, found.text
    body = found.json()
    assert (body["alias"], body["collection"]) == ("docs", result.collection)
    assert body["hits"][0]["id"] == target["id"] and len(body["hits"]) == 3
    expected = retriever_on(ws, log_queries=False).search(target["text"][:200], k=3)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert body["hits"][0]["source"] == "nist.pdf"
    assert body["hits"][0]["page_start"] == target["page_start"]
    assert health.json() == {
        "status": "ok",
        "alias": "docs",
        "collection": result.collection,
        "model": "all-MiniLM-L6-v2",
        "dim": 384,
        "chunks": len(rows),
        "searches": 1,
        "batches": 1,
    }
    assert {"/search", "/health"} <= set(openapi.json()["paths"])


def test_before_anything_is_published_the_service_answers_503_then_serves_the_publish(
    workspace, minilm
):
    from tasks.models import MINILM
    from tests.conftest import nist_rows

    with serving(create_app(retriever_on(workspace))) as url:
        early = httpx.post(f"{url}/search", json={"query": "risk"})
        sick = httpx.get(f"{url}/health")
        rows = nist_rows(range(5, 6), "nist")
        chroma.publish(
            chroma.connect(workspace.chroma_dir), rows, minilm, model_ref=MINILM, dim=384
        )
        later = httpx.post(f"{url}/search", json={"query": rows[0]["text"][:200], "k": 1})

    assert early.status_code == 503 and sick.status_code == 503
    assert "no collection published under alias 'docs'" in early.json()["detail"]
    assert later.status_code == 200 and later.json()["hits"][0]["id"] == rows[0]["id"]


def test_a_publish_swap_is_served_from_the_next_request(published, minilm):
    ws, rows, first = published
    query = {"query": rows[2]["text"][:200], "k": 2}
    with serving(create_app(retriever_on(ws))) as url:
        before = httpx.post(f"{url}/search", json=query).json()
        second = publish_tuned(ws, rows, minilm, dim=64)
        after = httpx.post(f"{url}/search", json=query).json()
        health = httpx.get(f"{url}/health").json()

    assert before["collection"] == first.collection and after["collection"] == second.collection
    assert (health["dim"], health["model"]) == (64, str(ws.model_dir("tuned")))
    assert after["hits"][0]["id"] == rows[2]["id"]


def test_with_a_token_set_a_request_without_it_gets_401_and_the_token_is_never_logged(
    published, capfd
):
    ws, rows, _ = published
    query = {"query": rows[0]["text"][:100]}
    with serving(create_app(retriever_on(ws), token=TOKEN)) as url:
        bare = httpx.post(f"{url}/search", json=query)
        wrong = httpx.post(f"{url}/search", json=query, headers={"Authorization": "Bearer nope"})
        health = httpx.get(f"{url}/health")
        good = httpx.post(f"{url}/search", json=query, headers={"Authorization": f"Bearer {TOKEN}"})

    assert (bare.status_code, wrong.status_code, health.status_code) == (401, 401, 401)
    assert bare.headers["www-authenticate"] == "Bearer"
    assert "bearer token is required" in bare.json()["detail"]
    assert good.status_code == 200 and good.json()["hits"]
    printed = capfd.readouterr()
    assert TOKEN not in printed.out + printed.err
    assert len(log_lines(ws)) == 1 and TOKEN not in log_lines(ws)[0]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"query": ""}, 422, "query"),
        ({"query": "   "}, 422, "query: Value error, the query is blank"),
        ({"query": "risk", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"query": "risk", "k": 101}, 422, "k: Input should be less than or equal to 100"),
        ({"k": 3}, 422, "query: Field required"),
        ({"query": "risk", "alias": "no__such"}, 422, "alias: Value error"),
        ({"query": "risk", "alias": "elsewhere"}, 404, "alias: no collection published under"),
    ],
)
def test_a_bad_request_gets_a_4xx_that_names_the_field(published, body, status, named):
    ws, _, _ = published
    with serving(create_app(retriever_on(ws))) as url:
        answer = httpx.post(f"{url}/search", json=body)

    assert answer.status_code == status
    assert named in answer.json()["detail"]
    assert log_lines(ws) == []


def test_fifty_concurrent_searches_leave_fifty_whole_log_lines_in_fewer_batches(published):
    ws, rows, result = published
    queries = [f"{rows[n % len(rows)]['text'][:120]} ({n})" for n in range(50)]

    async def ask_all(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/search", json={"query": q, "k": 3}) for q in queries)
            )

    with serving(create_app(retriever_on(ws))) as url:
        answers = asyncio.run(ask_all(url))
        health = httpx.get(f"{url}/health").json()

    assert [a.status_code for a in answers] == [200] * 50
    lines = log_lines(ws)
    assert len(lines) == 50
    records = [json.loads(line) for line in lines]
    assert sorted(r["query"] for r in records) == sorted(queries)
    assert all(r["collection"] == result.collection and len(r["hits"]) == 3 for r in records)
    for answer, query in zip(answers, queries, strict=True):
        logged = next(r for r in records if r["query"] == query)
        assert [h["id"] for h in logged["hits"]] == [h["id"] for h in answer.json()["hits"]]
    assert health["searches"] == 50 and health["batches"] < 50, "concurrent queries batch"


def test_a_reranked_search_returns_what_the_retriever_returns(published):
    ws, rows, _ = published
    query = rows[5]["text"][:160]
    with serving(create_app(retriever_on(ws))) as url:
        judged = httpx.post(
            f"{url}/search", json={"query": query, "k": 2, "rerank": 4}, timeout=300
        )

    expected = retriever_on(ws, log_queries=False).search(query, k=2, rerank=4)
    assert judged.status_code == 200, judged.text
    assert [h["id"] for h in judged.json()["hits"]] == [h.id for h in expected]
    assert judged.json()["hits"][0]["id"] == rows[5]["id"]


def test_the_serve_search_command_takes_its_token_from_the_environment(published):
    ws, rows, result = published
    port = free_port()
    command = [str(Path(sys.executable).with_name("ragtune")), "serve-search"]
    proc = subprocess.Popen(
        [*command, "--workspace", str(ws.root), "--port", str(port)],
        env={**os.environ, "RAGTUNE_SEARCH_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if "Application startup complete" in line:
                break
        url = f"http://127.0.0.1:{port}"
        query = {"query": rows[1]["text"][:150], "k": 1}
        bare = httpx.post(f"{url}/search", json=query)
        good = httpx.post(f"{url}/search", json=query, headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        proc.terminate()
        printed.append(proc.communicate(timeout=60)[0])

    assert f"serving {result.collection}" in "".join(printed)
    assert "bearer token required (from $RAGTUNE_SEARCH_TOKEN)" in "".join(printed)
    assert bare.status_code == 401
    assert good.status_code == 200 and good.json()["hits"][0]["id"] == rows[1]["id"]
    assert TOKEN not in "".join(printed)
    assert len(log_lines(ws)) == 1
