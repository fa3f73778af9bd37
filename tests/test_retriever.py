"""The retriever apps hold: the published collection searched the way it was built, following
the alias through a publish, logging each query; and its LangChain and LlamaIndex adapters."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.params import SearchParams
from flows.search import search as search_flow
from ragtune import Retriever
from tasks.learn.querylog import LOG_NAME
from tasks.models import MINILM
from tasks.store import chroma
from tasks.store.chroma import AliasNotFound, StoreError
from tests.conftest import publish_tuned


def logged(workspace) -> list[dict]:
    path = workspace.querylog_dir / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_retriever_returns_the_hits_of_ragtune_search_and_logs_the_query(published):
    ws, rows, result = published
    query = "What does the profile say about confabulation?"

    flow_hits = search_flow.fn(SearchParams(workspace=str(ws.root), query=query, k=4))
    retriever = Retriever.open("docs", workspace=ws.root)
    hits = retriever.search(query, k=4)

    assert [h.id for h in hits] == [h["id"] for h in flow_hits]
    assert [h.score for h in hits] == pytest.approx([h["score"] for h in flow_hits], abs=1e-6)
    assert hits[0].source == "nist.pdf" and 5 <= hits[0].page_start <= hits[0].page_end <= 8
    assert {h.id for h in hits} <= {r["id"] for r in rows}
    lines = logged(ws)
    assert [line["query"] for line in lines] == [query, query]
    assert lines[1]["collection"] == result.collection
    assert [h["id"] for h in lines[1]["hits"]] == [h.id for h in hits]


def test_a_chunk_is_found_by_its_own_text_and_search_many_matches_one_at_a_time(published):
    ws, rows, _ = published
    retriever = Retriever.open("docs", workspace=ws.root, log_queries=False)
    queries = [rows[n]["text"][:200] for n in (1, 7, 12)]

    batched = retriever.search_many(queries, k=[1, 3, 5])

    assert [len(hits) for hits in batched] == [1, 3, 5]
    assert [hits[0].id for hits in batched] == [rows[n]["id"] for n in (1, 7, 12)]
    for query, hits in zip(queries, batched, strict=True):
        alone = retriever.search(query, k=len(hits))
        assert [h.id for h in alone] == [h.id for h in hits]
    assert logged(ws) == []


def test_after_a_publish_swaps_the_alias_the_retriever_serves_the_new_model_and_collection(
    published, minilm
):
    ws, rows, first = published
    following = Retriever.open("docs", workspace=ws.root, recheck_seconds=0)
    pinned = Retriever.open("docs", workspace=ws.root, recheck_seconds=3600)
    query = rows[3]["text"][:200]
    before = following.search(query, k=3)
    assert pinned.search(query, k=3) == before
    assert following.live().describe()["model"] == MINILM

    second = publish_tuned(ws, rows, minilm, dim=128)
    assert second.swapped and second.collection != first.collection

    live = following.live()
    assert (live.name, live.dim, live.query_prompt) == (second.collection, 128, "query: ")
    assert live.model_ref == str(ws.model_dir("tuned"))
    after = following.search(query, k=3)
    fresh = chroma.search(chroma.connect(ws.chroma_dir), "docs", query, k=3)
    assert [(h.id, round(h.score, 5)) for h in after] == [(h.id, round(h.score, 5)) for h in fresh]
    assert [h.score for h in after] != [h.score for h in before]
    # A retriever that has not re-read the alias keeps the old version whole: the old
    # collection with the old model, never the new collection with the old model.
    assert pinned.live().name == first.collection
    assert pinned.search(query, k=3) == before
    assert [line["collection"] for line in logged(ws)][-2:] == [second.collection, first.collection]


def test_a_moved_workspace_serves_the_model_folder_it_carries(published, minilm, tmp_path):
    ws, rows, _ = published
    tuned = publish_tuned(ws, rows, minilm, dim=128)
    query = rows[2]["text"][:200]
    expected = Retriever.open("docs", workspace=ws.root, log_queries=False).search(query, k=3)
    # The store records the model's old absolute path, which no longer exists after the move.
    moved = tmp_path / "moved"
    shutil.move(ws.root, moved)
    assert not ws.model_dir("tuned").exists()

    retriever = Retriever.open("docs", workspace=moved, log_queries=False)

    live = retriever.live()
    assert (live.name, live.dim) == (tuned.collection, 128)
    assert live.model_ref == str(moved / "models" / "tuned")
    assert retriever.search(query, k=3) == expected


def test_the_retriever_names_what_is_wrong_with_a_request(published, tmp_path):
    ws, _, _ = published
    retriever = Retriever.open("docs", workspace=ws.root, log_queries=False)

    with pytest.raises(StoreError, match="the query is empty"):
        retriever.search("   ")
    with pytest.raises(StoreError, match=r"k=0 is out of range"):
        retriever.search("risk", k=0)
    with pytest.raises(StoreError, match=r"rerank=101 is out of range"):
        retriever.search("risk", rerank=101)
    with pytest.raises(AliasNotFound, match="no collection published under alias 'docs'"):
        Retriever.open("docs", workspace=tmp_path / "empty").search("risk")


def test_the_langchain_retriever_returns_documents_with_provenance(published):
    from langchain_core.documents import Document

    from ragtune.langchain import RagtuneRetriever

    ws, rows, _ = published
    target = rows[9]
    retriever = RagtuneRetriever.open("docs", workspace=ws.root, k=3, log_queries=False)

    docs = retriever.invoke(target["text"][:200])

    assert len(docs) == 3 and all(isinstance(doc, Document) for doc in docs)
    assert docs[0].id == target["id"] and docs[0].page_content == target["text"]
    meta = docs[0].metadata
    assert meta["source"] == "nist.pdf" and meta["page_start"] == target["page_start"]
    assert meta["chunk_id"] == target["id"] and 0.5 < meta["score"] <= 1.0 + 1e-6


def test_the_llamaindex_retriever_returns_scored_nodes_with_provenance(published):
    from llama_index.core.schema import NodeWithScore

    from ragtune.llamaindex import RagtuneRetriever

    ws, rows, _ = published
    target = rows[4]
    retriever = RagtuneRetriever.open("docs", workspace=ws.root, k=2, log_queries=False)

    nodes = retriever.retrieve(target["text"][:200])

    assert len(nodes) == 2 and all(isinstance(node, NodeWithScore) for node in nodes)
    assert nodes[0].node.node_id == target["id"] and nodes[0].node.get_content() == target["text"]
    assert nodes[0].node.metadata["page_end"] == target["page_end"]
    assert nodes[0].score == pytest.approx(nodes[0].node.metadata["score"])
    assert nodes[0].score > nodes[1].score
