"""The publish and search flows on a workspace, through a real Prefect API."""

from __future__ import annotations

import os

import pytest

from flows.params import PublishParams, SearchParams
from flows.publish import publish
from flows.search import format_hits, search
from tasks.store import chroma, locks
from tasks.workspace import save_rows
from tests.conftest import nist_rows


def test_publish_flow_publishes_the_newest_model_then_search_finds_chunks(
    prefect_api, ready_workspace
):
    ws, rows = ready_workspace
    params = PublishParams(workspace=str(ws.root), metrics={"ndcg@10": 0.5})

    first = publish(params)
    again = publish(params)

    assert first.alias == "docs" and first.swapped and first.count == len(rows)
    assert first.embedded == len(rows) and first.copied == 0
    assert again.collection == first.collection and again.embedded == 0 and not again.swapped
    client = chroma.connect(ws.chroma_dir)
    meta = chroma.resolve_alias(client, "docs").metadata
    assert meta["model"] == str(ws.model_dir("m")) and meta["dim"] == 384
    assert meta["query_prompt"] == "query: " and meta["metric.ndcg@10"] == 0.5

    target = rows[4]
    hits = search(SearchParams(workspace=str(ws.root), query=target["text"], k=3))
    assert hits[0]["id"] == target["id"] and hits[0]["source"] == "nist.pdf"


def read_artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def test_publish_flow_leaves_a_summary(prefect_api, ready_workspace):
    ws, _ = ready_workspace
    result = publish(PublishParams(workspace=str(ws.root), dim=128))

    assert any(result.collection in str(a.data) for a in read_artifacts("publish-summary"))
    assert "__d128__" in result.collection


def test_a_publish_flow_that_waits_for_another_says_whom_on_the_dashboard(
    prefect_api, ready_workspace
):
    ws, _ = ready_workspace
    client = chroma.connect(ws.chroma_dir)

    with (
        locks.publish_lock(client, what="another publish"),
        pytest.raises(locks.LockTimeout, match="another publish"),
    ):
        publish(PublishParams(workspace=str(ws.root), lock_timeout_s=1))

    waiting = [str(a.data) for a in read_artifacts("publish-waiting")]
    assert any(f"pid {os.getpid()}" in text and "another publish" in text for text in waiting)
    # Once the lock is free the same publish goes through.
    assert publish(PublishParams(workspace=str(ws.root), lock_timeout_s=1)).swapped


def test_publish_flow_without_a_model_says_what_to_run(prefect_api, workspace):
    save_rows(workspace.chunks_dir, nist_rows(range(5, 6), "nist"))
    with pytest.raises(FileNotFoundError, match=r"no model in .*models.*ragtune finetune"):
        publish(PublishParams(workspace=str(workspace.root)))


def test_format_hits_shows_rank_score_source_pages_and_snippet():
    hits = [
        chroma.Hit("a", 0.91234, "report.pdf", 3, 4, "Risk   management\nmatters. " * 40),
        {
            "id": "b",
            "score": 0.5,
            "source": "notes.md",
            "page_start": 1,
            "page_end": 1,
            "text": "x",
        },
    ]
    text = format_hits(hits)
    assert text.splitlines()[0] == " 1. 0.912  report.pdf p.3-4"
    assert text.splitlines()[1].startswith("    Risk management matters.")
    assert text.splitlines()[1].endswith("…") and len(text.splitlines()[1]) <= 164
    assert " 2. 0.500  notes.md p.1" in text
    assert format_hits([]) == "(no hits)"
