"""Shared fixtures: a real ephemeral Prefect API, the real bundled models, real PDFs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Set before prefect, transformers or chromadb are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NIST_PDF = ROOT / "data" / "sources" / "NIST.AI.600-1.pdf"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real, throwaway Prefect API for tests that run flows."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, loaded once per session."""
    from tasks.models import MINILM, load_model

    return load_model(MINILM)


@pytest.fixture
def workspace(tmp_path):
    from tasks.workspace import Workspace

    return Workspace.at(tmp_path / "workspace")


@pytest.fixture
def ready_workspace(workspace, minilm):
    """Chunks saved by ingest and a model folder saved with a query prompt, as finetune does."""
    from tasks.workspace import save_rows

    rows = nist_rows(range(5, 8), "nist")
    save_rows(workspace.chunks_dir, rows)
    save_with_prompts(minilm, workspace.model_dir("m"), {"query": "query: ", "document": ""})
    return workspace, rows


@pytest.fixture
def published(workspace, minilm):
    """A workspace whose embedded store has real NIST chunks published under `docs` by the
    bundled MiniLM at full width: (workspace, chunk rows, the publish's result)."""
    from tasks.models import MINILM
    from tasks.store import chroma

    rows = nist_rows(range(5, 9), "nist")
    client = chroma.connect(workspace.chroma_dir)
    return workspace, rows, chroma.publish(client, rows, minilm, model_ref=MINILM, dim=384)


def publish_tuned(workspace, rows, minilm, dim: int = 128):
    """Publish `rows` again with another model folder (a query prompt, a smaller dimension):
    the swap a retrain's publish makes. Returns the publish's result."""
    from tasks.models import load_model
    from tasks.store import chroma

    folder = save_with_prompts(minilm, workspace.model_dir("tuned"), {"query": "query: "})
    return chroma.publish(
        chroma.connect(workspace.chroma_dir),
        rows,
        load_model(str(folder)),
        model_ref=str(folder),
        dim=dim,
        query_prompt="query: ",
    )


def save_with_prompts(model, folder: Path, prompts: dict[str, str]) -> Path:
    """Save `model` to `folder` with these prompts in its config, as the finetune flow does."""
    model.save(str(folder))
    config = folder / "config_sentence_transformers.json"
    settings = json.loads(config.read_text())
    settings["prompts"] = prompts
    config.write_text(json.dumps(settings))
    return folder


def nist_rows(pages: range, doc_id: str, words: int = 60) -> list[dict]:
    """Chunk rows (the ingest schema) cut from real pages of the NIST AI 600-1 PDF."""
    from pypdf import PdfReader

    from tasks.workspace import fingerprint

    reader = PdfReader(NIST_PDF)
    rows = []
    for page in pages:
        tokens = re.sub(r"\s+", " ", reader.pages[page - 1].extract_text()).split()
        for start in range(0, len(tokens), words):
            text = " ".join(tokens[start : start + words])
            rows.append(
                {
                    "id": fingerprint(text),
                    "doc_id": doc_id,
                    "source": f"{doc_id}.pdf",
                    "page_start": page,
                    "page_end": page,
                    "text": text,
                    "n_tokens": len(text.split()),
                }
            )
    return rows


@lru_cache(maxsize=1)
def read_nist() -> tuple[Any, ...]:
    """The 64-page NIST profile's pages, read once per test session."""
    from tasks.ingest.documents import read_document

    return tuple(read_document(NIST_PDF, NIST_PDF.parent))


#: Passages with one clear answer each, and queries answered by the passage at that index.
PASSAGES = [
    "Oslo is the capital city of Norway, at the head of the Oslofjord.",
    "Lima is the capital city of Peru, seat of its government, on the Pacific coast.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants.",
]
ANSWERED = [
    ("What is the capital of Peru?", 1),
    ("How do plants make sugar from light?", 2),
    ("Which city lies at the head of the Oslofjord?", 0),
]


class JsonHandler(BaseHTTPRequestHandler):
    """A handler for the real local HTTP servers tests talk to: JSON in, JSON out, quiet."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def json_body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def send(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real threaded HTTP server on 127.0.0.1 with `handler`; yields its /v1 root."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


CHROMA = Path(sys.executable).with_name("chroma")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).is_success
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A `chroma run` subprocess on a free port, ready when its heartbeat answers."""
    path = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    log = (path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(CHROMA),
            "run",
            "--path",
            str(path / "db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api/v2/heartbeat"
    deadline = time.monotonic() + 60
    try:
        while not _answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"chroma run exited: {(path / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chroma run did not answer {url} within 60 s")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
