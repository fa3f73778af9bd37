"""Publishing and searching through a real `chroma run` server over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tasks.models import MINILM
from tasks.store import chroma
from tests.test_store import nist_rows

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
def server(tmp_path_factory):
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


def test_publish_search_and_rollback_through_a_chroma_server(server, minilm):
    client = chroma.connect(host="127.0.0.1", port=server)
    first_rows = nist_rows(range(5, 7), "governance")
    second_rows = nist_rows(range(12, 13), "actions") + first_rows[:5]

    first = chroma.publish(client, first_rows, minilm, MINILM, 256, batch_size=7)
    again = chroma.publish(client, first_rows, minilm, MINILM, 256)
    second = chroma.publish(client, second_rows, minilm, MINILM, 256)

    assert first.count == first.embedded == len(first_rows)
    assert again.embedded == 0 and again.collection == first.collection
    assert second.copied == 5 and second.embedded == len(second_rows) - 5
    target = second_rows[0]
    assert chroma.search(client, "docs", target["text"], k=1)[0].id == target["id"]
    assert chroma.rollback(client, "docs") == first.collection
    # A fresh client (another process, another machine) sees the same alias: it lives in Chroma.
    # (With a bearer token too: the client sends it; this open server ignores it.)
    other = chroma.connect(host="127.0.0.1", port=server, token="s3cret")
    assert chroma.resolve_alias(other, "docs").name == first.collection
    assert chroma.search(other, "docs", first_rows[3]["text"], k=1)[0].id == first_rows[3]["id"]


def test_missing_alias_on_a_server_names_the_server(server):
    client = chroma.connect(host="127.0.0.1", port=server)
    with pytest.raises(
        chroma.AliasNotFound, match=rf"alias 'nothing' in http://127.0.0.1:{server}"
    ):
        chroma.search(client, "nothing", "a question")


def test_an_unreachable_server_is_a_clear_error():
    port = free_port()
    with pytest.raises(chroma.StoreError, match=rf"cannot reach the Chroma server.*:{port}"):
        chroma.connect(host="127.0.0.1", port=port)
