"""The whole path, end to end, on real parts: real PDF pages, the bundled Gemma and MiniLM,
a real ephemeral Prefect API and a real Chroma store. Tiny settings keep it to a minute or two."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfReader, PdfWriter

from tests.conftest import NIST_PDF


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Three pages of the NIST profile: enough for a dozen chunks."""
    folder = tmp_path_factory.mktemp("sources")
    reader = PdfReader(NIST_PDF)
    writer = PdfWriter()
    for page in reader.pages[8:11]:
        writer.add_page(page)
    with open(folder / "nist-excerpt.pdf", "wb") as handle:
        writer.write(handle)
    return folder


def tiny_params(workspace, sources, **changes):
    """Pipeline parameters as a user writes them: a section per stage, unset fields left to the
    demo profile."""
    from flows.params import PipelineParams

    settings = {
        "workspace": str(workspace),
        "profile": "demo",
        "sources": [str(source) for source in sources],
        "ingest": {"max_tokens": 128, "overlap": 16},
        "questions": {"questions_per_chunk": 2},
        "finetune": {"max_steps": 4, "batch_size": 8, "max_seq_length": 64},
        "publish_if_gated": True,
    }
    return PipelineParams(**settings | changes)


@pytest.fixture(scope="module")
def pipeline_run(prefect_api, small_corpus, tmp_path_factory):
    from flows.pipeline import pipeline

    workspace = tmp_path_factory.mktemp("run") / "workspace"
    return pipeline(tiny_params(workspace, [small_corpus])), workspace


def test_pipeline_leaves_every_stage_output(pipeline_run):
    from tasks.workspace import Workspace, load_rows

    result, workspace = pipeline_run
    ws = Workspace.at(workspace)
    chunks = load_rows(ws.chunks_dir)
    questions = load_rows(ws.questions_dir)
    assert result.chunks == len(chunks) > 5
    assert {c["source"] for c in chunks} == {"nist-excerpt.pdf"}
    kept = [q for q in questions if q["kept"]]
    assert kept and {q["split"] for q in kept} == {"train", "test"}
    assert {q["chunk_id"] for q in questions} <= {c["id"] for c in chunks}
    assert all(q["judge_rank"] == 1 for q in kept), "the label stage kept grounded ones only"
    assert result.questions_grounded == len(kept)

    card = (ws.model_dir(result.model_path.split("/")[-1]) / "README.md").read_text()
    assert "MatryoshkaLoss" in card
    assert set(result.seconds) == {
        "ingest",
        "questions",
        "label",
        "finetune",
        "evaluate",
        "publish",
    }


def test_pipeline_metrics_are_finite_at_every_dimension(pipeline_run):
    result, _ = pipeline_run
    from pathlib import Path

    metrics = json.loads((Path(result.report_dir) / "metrics.json").read_text())
    values = list(_numbers(metrics))
    assert values and all(math.isfinite(v) for v in values)
    for dim in ("384", "256", "128", "64"):
        assert dim in json.dumps(metrics)


def test_published_collection_holds_every_chunk_and_answers_a_question(pipeline_run):
    from tasks.models import load_model
    from tasks.store.chroma import connect, resolve_alias, search
    from tasks.workspace import Workspace, load_rows

    result, workspace = pipeline_run
    ws = Workspace.at(workspace)
    chunks = load_rows(ws.chunks_dir)
    client = connect(ws.chroma_dir)
    collection = resolve_alias(client, "docs")
    assert result.published and collection.name == result.collection
    stored = collection.get(include=["embeddings"])
    assert sorted(stored["ids"]) == sorted(c["id"] for c in chunks)
    assert {len(e) for e in stored["embeddings"]} == {result.dim}

    # The top hit of a search is what the tuned model itself ranks first for that question.
    model = load_model(result.model_path)
    prompt = (model.prompts or {}).get("query", "")
    texts = [c["text"] for c in chunks]
    doc_emb = _truncate(
        model.encode(texts, prompt=(model.prompts or {}).get("document")), result.dim
    )
    found_own_chunk = 0
    kept = [q for q in load_rows(ws.questions_dir) if q["kept"]]
    for q in kept:
        query_emb = _truncate(model.encode([prompt + q["question"]]), result.dim)[0]
        expected = chunks[int(np.argmax(doc_emb @ query_emb))]["id"]
        hits = search(client, "docs", q["question"], k=3)
        assert hits[0].id == expected
        found_own_chunk += hits[0].id == q["chunk_id"]
    assert found_own_chunk >= 1


def _truncate(embeddings: np.ndarray, dim: int) -> np.ndarray:
    cut = np.asarray(embeddings)[:, :dim]
    return cut / np.linalg.norm(cut, axis=1, keepdims=True)


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, float):
        yield tree


def test_second_run_on_unchanged_corpus_reuses_every_stage(pipeline_run, small_corpus):
    """Even on another task runner: where the work would run is not one of its inputs."""
    from flows.pipeline import pipeline

    first, workspace = pipeline_run
    elsewhere = tiny_params(workspace, [small_corpus], task_runner="dask")
    again = pipeline(elsewhere)
    assert again.reused == ["ingest", "questions", "label", "finetune", "evaluate"]
    assert again.model_path == first.model_path
    assert again.collection == first.collection


def test_asking_for_reranking_reruns_only_the_evaluation(pipeline_run, small_corpus):
    from flows.pipeline import pipeline

    first, workspace = pipeline_run
    judged = pipeline(tiny_params(workspace, [small_corpus], evaluate={"rerank": 3}))

    assert judged.reused == ["ingest", "questions", "label", "finetune"]
    assert judged.model_path == first.model_path
    report = json.loads((Path(judged.report_dir) / "metrics.json").read_text())
    reranked = next(m for m in report["models"] if m["name"] == "tuned+rerank")
    assert list(reranked["metrics"]) == [str(judged.dim)]


def test_searches_are_learned_from_by_the_next_run_and_judged_once(pipeline_run, small_corpus):
    from flows.params import SearchParams
    from flows.pipeline import pipeline
    from flows.search import search

    first, workspace = pipeline_run
    for query in (
        "What is confabulation?",
        "How should AI incidents be disclosed?",
        "Which risks come from harmful bias?",
        "What does information integrity mean?",
    ):
        search.fn(SearchParams(workspace=str(workspace), query=query, k=3))
    params = tiny_params(workspace, [small_corpus], learn={"top_k": 4, "held_out_share": 0.5})

    learned = pipeline(params)
    again = pipeline(params)

    assert learned.reused == ["ingest", "questions", "label"], "a new log re-runs learn on"
    assert again.reused == ["ingest", "questions", "label", "learn", "finetune", "evaluate"]
    tuned = json.loads((Path(learned.model_path) / "ragtune.json").read_text())
    held = json.loads((workspace / "learned" / "held_out.json").read_text())["queries"]
    assert tuned["train_pairs"] == first_pairs(first) + 4 - len(held)
    report = (Path(learned.report_dir) / "report.md").read_text()
    assert held and f"over {len(held)} queries), queries never trained on" in report


def first_pairs(result) -> int:
    return json.loads((Path(result.model_path) / "ragtune.json").read_text())["train_pairs"]


def test_refresh_with_a_new_document_asks_only_about_its_chunks(
    pipeline_run, small_corpus, tmp_path
):
    from flows.refresh import refresh
    from tasks.workspace import Workspace, load_rows

    _, workspace = pipeline_run
    before = {c["id"] for c in load_rows(Workspace.at(workspace).chunks_dir)}
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.md").write_text(
        "# Incident response\n\nWhen a generative AI system leaks personal data, the operator "
        "must notify affected users within seventy-two hours and record the incident in the "
        "risk register, together with the model version and the prompt that caused it.\n"
    )
    from flows.params import RefreshParams

    # Refresh takes only the settings it uses: no training or evaluation sections.
    settings = tiny_params(workspace, [small_corpus, extra]).model_dump(
        exclude={"label", "learn", "finetune", "evaluate", "publish_if_gated"}
    )
    refreshed = refresh(RefreshParams(**settings))
    after = load_rows(Workspace.at(workspace).chunks_dir)
    new = [c for c in after if c["id"] not in before]
    assert new and {c["source"] for c in new} == {"notes.md"}
    assert refreshed.new_llm_calls == len(new)
    assert refreshed.embedded == len(new)


def test_a_failed_stage_is_named_and_the_rerun_resumes_after_the_last_good_stage(
    prefect_api, small_corpus, tmp_path
):
    """A training file without the columns training needs fails the finetune stage; ingest and
    questions stay recorded, so the next run starts at finetune."""
    from flows.finetune import finetune
    from flows.incremental import StageFailed, StageRunner
    from flows.ingest import ingest
    from flows.params import FinetuneParams, PipelineParams

    params = PipelineParams(workspace=str(tmp_path / "ws"), sources=[str(small_corpus)])
    params = params.resolved()
    bad = tmp_path / "pairs.csv"
    bad.write_text("question,comment\nwhat is it?,a thing\n")
    first = StageRunner(params.workspace, first_key="k")
    first.run("ingest", ingest, params.ingest_params())
    with pytest.raises(StageFailed, match=r"stage 'finetune' failed: .*positive"):
        first.run(
            "finetune", finetune, FinetuneParams(workspace=params.workspace, train_file=str(bad))
        )

    again = StageRunner(params.workspace, first_key="k")
    again.run("ingest", ingest, params.ingest_params())
    assert again.reused == ["ingest"]
