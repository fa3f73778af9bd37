"""Publishing to an embedded Chroma store: versions, alias swaps, idempotence, search."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from tasks.models import MINILM
from tasks.store import chroma, locks
from tasks.workspace import fingerprint
from tests.conftest import nist_rows


@pytest.fixture(scope="module")
def docs():
    """Three 'documents' (two pages of the PDF each)."""
    return {
        "governance": nist_rows(range(5, 7), "governance"),
        "risks": nist_rows(range(7, 9), "risks"),
        "actions": nist_rows(range(12, 14), "actions"),
    }


@pytest.fixture
def client(tmp_path):
    return chroma.connect(tmp_path / "chroma")


def publish(client, rows, model, **kwargs):
    kwargs.setdefault("model_ref", MINILM)
    kwargs.setdefault("dim", 384)
    return chroma.publish(client, rows, model, **kwargs)


def test_publish_creates_a_complete_cosine_collection_with_its_recipe_in_metadata(
    client, docs, minilm
):
    rows = docs["governance"] + docs["risks"]
    result = publish(client, rows, minilm, metrics={"ndcg@10": 0.71}, query_prompt="q: ")

    assert result.swapped and result.previous is None
    assert result.count == result.embedded == len(rows) and result.copied == 0
    assert re.fullmatch(r"docs__all-minilm-l6-v2-[0-9a-f]{4}__d384__[0-9a-f]{5}", result.collection)
    assert result.collection.endswith(fingerprint(sorted(r["id"] for r in rows))[:5])
    collection = chroma.resolve_alias(client, "docs")
    assert collection.name == result.collection
    assert collection.configuration["hnsw"]["space"] == "cosine"
    meta = collection.metadata
    assert meta["model"] == MINILM and meta["dim"] == 384 and meta["query_prompt"] == "q: "
    assert meta["chunk_count"] == len(rows) and meta["corpus"] == "docs"
    assert meta["metric.ndcg@10"] == pytest.approx(0.71)
    stored = collection.get(ids=[rows[0]["id"]], include=["metadatas", "documents"])
    assert stored["documents"] == [rows[0]["text"]]
    assert stored["metadatas"][0]["source"] == "governance.pdf"
    assert stored["metadatas"][0]["page_start"] == 5


def test_version_names_are_valid_chroma_names_that_change_with_the_chunk_set():
    name = chroma.version_name("docs", "/w/models/minilm-tuned", 256, ["b", "a"])
    assert re.fullmatch(r"docs__minilm-tuned-[0-9a-f]{4}__d256__[0-9a-f]{5}", name)
    assert name == chroma.version_name("docs", "/w/models/minilm-tuned", 256, ["a", "b", "a"])
    assert name != chroma.version_name("docs", "/w/models/minilm-tuned", 256, ["a", "c"])
    assert name != chroma.version_name("docs", "/w/models/minilm-tuned", 128, ["a", "b"])
    with pytest.raises(chroma.StoreError, match="corpus='my docs'"):
        chroma.version_name("my docs", "m", 64, ["a"])


def test_search_finds_a_chunk_from_its_own_text_and_from_a_question(client, docs, minilm):
    rows = docs["governance"] + docs["risks"]
    publish(client, rows, minilm)
    target = rows[5]

    hits = chroma.search(client, "docs", target["text"], k=3)
    assert hits[0].id == target["id"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].text == target["text"] and hits[0].source == "governance.pdf"
    assert hits[0].page_start == hits[0].page_end == target["page_start"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    question = chroma.search(client, "docs", "What is a cross-sectoral profile?", k=5)
    assert any("cross-sectoral" in h.text.lower() for h in question)


def test_republishing_an_unchanged_corpus_embeds_nothing_and_keeps_the_same_ids(
    client, docs, minilm
):
    rows = docs["governance"] + docs["risks"]
    first = publish(client, rows, minilm)
    ids_before = sorted(chroma.resolve_alias(client, "docs").get(include=[])["ids"])

    again = publish(client, list(reversed(rows)) + rows[:3], minilm)

    assert again.collection == first.collection
    assert again.embedded == 0 and again.copied == 0 and not again.swapped
    assert again.count == len(rows)
    assert sorted(chroma.resolve_alias(client, "docs").get(include=[])["ids"]) == ids_before
    assert chroma.list_versions(client, "docs") == [first.collection]


def test_a_changed_corpus_is_a_new_version_that_embeds_only_new_chunks(client, docs, minilm):
    old_rows = docs["governance"] + docs["risks"]
    first = publish(client, old_rows, minilm)
    new_rows = docs["risks"] + docs["actions"]
    encoded: list[str] = []

    def embed_and_record(texts: list[str]) -> np.ndarray:
        encoded.extend(texts)
        return chroma.embed(minilm, texts, "", 384)

    second = publish(client, new_rows, minilm, embed_texts=embed_and_record)

    assert second.collection != first.collection and second.swapped
    assert second.previous == first.collection
    assert second.copied == len(docs["risks"])
    assert second.embedded == len(docs["actions"])
    # What the counts claim: the unchanged chunks never reached the model.
    assert sorted(encoded) == sorted(r["text"] for r in docs["actions"])
    live = chroma.resolve_alias(client, "docs")
    assert live.name == second.collection and live.count() == len(new_rows)
    gone = [r["id"] for r in docs["governance"]]
    assert live.get(ids=gone)["ids"] == []
    # The previous version is untouched: readers of it never saw a mutation.
    assert client.get_collection(first.collection).count() == len(old_rows)
    # Copied vectors are the ones embedded the first time. Not bit-equal: Chroma normalises
    # every vector written to a cosine collection, and normalising a unit vector again moves
    # some components by one float32 ulp (~1.5e-8), more or fewer depending on the CPU's kernels.
    some = docs["risks"][0]["id"]
    old_vec = client.get_collection(first.collection).get(ids=[some], include=["embeddings"])
    new_vec = live.get(ids=[some], include=["embeddings"])
    np.testing.assert_allclose(old_vec["embeddings"], new_vec["embeddings"], rtol=0, atol=1e-7)


def test_rollback_swaps_back_and_search_follows_the_alias(client, docs, minilm):
    first = publish(client, docs["governance"], minilm)
    second = publish(client, docs["actions"], minilm)
    probe = docs["governance"][2]["text"]
    assert chroma.search(client, "docs", probe, k=1)[0].source == "actions.pdf"

    assert chroma.rollback(client, "docs") == first.collection

    assert chroma.resolve_alias(client, "docs").name == first.collection
    assert chroma.search(client, "docs", probe, k=1)[0].id == docs["governance"][2]["id"]
    assert chroma.list_versions(client, "docs") == [first.collection, second.collection]
    assert chroma.rollback(client, "docs") == second.collection


def test_rollback_without_a_previous_version_is_a_clear_error(client, docs, minilm):
    publish(client, docs["governance"], minilm)
    with pytest.raises(chroma.StoreError, match="no previous version"):
        chroma.rollback(client, "docs")


def test_versions_beyond_keep_versions_are_deleted_but_never_live_or_previous(client, docs, minilm):
    names = [
        publish(client, rows, minilm, keep_versions=2).collection
        for rows in (docs["governance"], docs["risks"], docs["actions"])
    ]
    assert chroma.list_versions(client, "docs") == [names[2], names[1]]
    existing = {c.name for c in client.list_collections()}
    assert names[0] not in existing and {names[1], names[2]} <= existing


def test_a_version_another_alias_uses_is_not_deleted(client, docs, minilm):
    shared = publish(client, docs["governance"], minilm, alias="stable").collection
    publish(client, docs["governance"], minilm, alias="docs", keep_versions=2)
    publish(client, docs["risks"], minilm, alias="docs", keep_versions=2)
    publish(client, docs["actions"], minilm, alias="docs", keep_versions=2)
    assert shared not in chroma.list_versions(client, "docs")
    assert chroma.resolve_alias(client, "stable").count() == len(docs["governance"])


def test_search_embeds_the_query_with_the_collections_prompt_and_dimension(client, docs, minilm):
    rows = docs["governance"] + docs["risks"]
    publish(client, rows, minilm, dim=128, query_prompt="query: ")
    assert chroma.resolve_alias(client, "docs").metadata["dim"] == 128
    question = "How should organizations manage risks of generative AI?"

    hits = chroma.search(client, "docs", question, k=3)

    stored = chroma.resolve_alias(client, "docs").get(ids=[hits[0].id], include=["embeddings"])
    assert np.asarray(stored["embeddings"]).shape == (1, 128)
    full = minilm.encode(["query: " + question], normalize_embeddings=True)[0][:128]
    expected = float(np.dot(full / np.linalg.norm(full), stored["embeddings"][0]))
    assert hits[0].score == pytest.approx(expected, abs=1e-4)
    bare = minilm.encode([question], normalize_embeddings=True)[0][:128]
    without_prompt = float(np.dot(bare / np.linalg.norm(bare), stored["embeddings"][0]))
    assert abs(without_prompt - expected) > 1e-3


def test_a_missing_alias_or_empty_store_says_how_to_fix_it(client, docs, minilm, tmp_path):
    with pytest.raises(chroma.AliasNotFound, match=r"no collection published under alias 'docs'"):
        chroma.search(client, "docs", "anything")
    publish(client, docs["governance"], minilm)
    with pytest.raises(chroma.AliasNotFound, match=r"alias 'other' in .*chroma.*ragtune publish"):
        chroma.resolve_alias(client, "other")


def test_bad_inputs_are_refused_with_the_setting_named(client, docs, minilm):
    with pytest.raises(chroma.StoreError, match="dim=512"):
        publish(client, docs["governance"], minilm, dim=512)
    with pytest.raises(chroma.StoreError, match="no chunks"):
        publish(client, [], minilm)
    with pytest.raises(chroma.StoreError, match="alias='a b'"):
        publish(client, docs["governance"], minilm, alias="a b")
    with pytest.raises(chroma.StoreError, match="metric 'ndcg'"):
        publish(client, docs["governance"], minilm, metrics={"ndcg": float("nan")})


def test_the_publish_lock_excludes_other_processes(client):
    """Plain-Python publishers in two processes must not write one embedded store at once."""
    lock_file = chroma.where(client) + "/" + locks.LOCK_FILE
    probe = (
        "import fcntl, sys\n"
        f"h = open({lock_file!r}, 'a')\n"
        "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    sys.exit(3)\n"
    )
    with locks.publish_lock(client):
        held = subprocess.run([sys.executable, "-c", probe], timeout=60)
    free = subprocess.run([sys.executable, "-c", probe], timeout=60)
    assert held.returncode == 3 and free.returncode == 0
