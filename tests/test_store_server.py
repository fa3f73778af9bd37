"""Publishing and searching through a real `chroma run` server over HTTP."""

from __future__ import annotations

import pytest

from tasks.models import MINILM
from tasks.store import chroma
from tests.conftest import free_port, nist_rows


def test_publish_search_and_rollback_through_a_chroma_server(chroma_server, minilm):
    client = chroma.connect(host="127.0.0.1", port=chroma_server)
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
    other = chroma.connect(host="127.0.0.1", port=chroma_server, token="s3cret")
    assert chroma.resolve_alias(other, "docs").name == first.collection
    assert chroma.search(other, "docs", first_rows[3]["text"], k=1)[0].id == first_rows[3]["id"]


def test_missing_alias_on_a_server_names_the_server(chroma_server):
    client = chroma.connect(host="127.0.0.1", port=chroma_server)
    with pytest.raises(
        chroma.AliasNotFound, match=rf"alias 'nothing' in http://127.0.0.1:{chroma_server}"
    ):
        chroma.search(client, "nothing", "a question")


def test_an_unreachable_server_is_a_clear_error():
    port = free_port()
    with pytest.raises(chroma.StoreError, match=rf"cannot reach the Chroma server.*:{port}"):
        chroma.connect(host="127.0.0.1", port=port)
