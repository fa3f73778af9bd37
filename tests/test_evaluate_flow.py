"""The evaluate flow on a real Prefect API, with the real bundled MiniLM."""

from __future__ import annotations

import json
import math

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.evaluate import evaluate, generated_eval_set
from flows.params import EvaluateParams
from tasks.llm.likelihood import local_judge_name
from tasks.retrieval.beir import load_beir
from tasks.retrieval.evaluation import MetricsError
from tasks.retrieval.report import CARD_HEADING
from tasks.workspace import save_rows
from tests.conftest import FIXTURES

BEIR_TINY = FIXTURES / "beir-tiny"


@pytest.fixture
def tuned_copy(minilm, workspace):
    """MiniLM saved as if it were a tuned model: same weights, so the gain is exactly zero."""
    path = workspace.model_dir("minilm-copy")
    minilm.save(str(path))
    return path


def _save_generated_set(workspace) -> int:
    """Chunks and questions as the earlier stages write them; returns the kept test count."""
    corpus, queries, relevant = load_beir(BEIR_TINY)
    save_rows(
        workspace.chunks_dir,
        [
            {
                "id": cid,
                "doc_id": "tiny",
                "source": "beir-tiny",
                "page_start": 1,
                "page_end": 1,
                "text": text,
                "n_tokens": len(text.split()),
            }
            for cid, text in corpus.items()
        ],
    )
    rows = [
        {
            "question": text,
            "chunk_id": sorted(relevant[qid])[0],
            "generator": "hand",
            "split": "test",
            "kept": True,
            "reject_reason": "",
        }
        for qid, text in queries.items()
    ]
    # Training questions and rejected ones must not be evaluated.
    rows.append({**rows[0], "question": "What do chloroplasts make?", "split": "train"})
    rows.append({**rows[1], "question": "ATP?", "kept": False, "reject_reason": "too short"})
    save_rows(workspace.questions_dir, rows)
    return len(queries)


def _artifacts(flow_run_id):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found if artifact.key}


def test_identical_models_are_evaluated_and_not_published(prefect_api, workspace, tuned_copy):
    n_test = _save_generated_set(workspace)

    state = evaluate(
        EvaluateParams(workspace=str(workspace.root), run_name="r1"), return_state=True
    )
    result = state.result()

    assert not result.publish
    assert "interval" in result.reason and "[+0.0000, +0.0000]" in result.reason
    assert result.dim in (384, 256, 128, 64)
    assert set(result.metrics) == {"base", "tuned"}
    assert sorted(result.metrics["tuned"]) == [64, 128, 256, 384]
    for metrics in result.metrics.values():
        for values in metrics.values():
            assert all(math.isfinite(v) for v in values.values())
    assert result.metrics["base"] == result.metrics["tuned"]

    report_dir = workspace.report_dir("r1")
    assert result.report_dir == str(report_dir)
    data = json.loads((report_dir / "metrics.json").read_text())
    assert data["models"][1]["model"] == str(tuned_copy)  # the newest model in the workspace
    assert data["models"][0]["n_queries"] == n_test
    assert (report_dir / "ndcg_by_dim.png").stat().st_size > 0
    assert result.reason in (report_dir / "report.md").read_text()

    # The tuned model's card carries the evaluation.
    assert CARD_HEADING in (tuned_copy / "README.md").read_text()
    card = json.loads((tuned_copy / "ragtune.json").read_text())["evaluation"]
    assert card["publish"] is False and card["dim"] == result.dim
    assert card["metrics"]["384"]["ndcg@10"] == result.metrics["tuned"][384]["ndcg@10"]

    artifacts = _artifacts(state.state_details.flow_run_id)
    rows = artifacts["evaluation-metrics"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [row["dim"] for row in rows] == [384, 256, 128, 64]
    assert rows[0]["ndcg@10 gain"] == 0.0
    assert "Do not publish" in artifacts["evaluation-report"].data


def test_rerank_adds_the_judged_tuned_model_at_the_chosen_dim(prefect_api, workspace, tuned_copy):
    _save_generated_set(workspace)

    state = evaluate(
        EvaluateParams(workspace=str(workspace.root), run_name="rr", rerank=5), return_state=True
    )
    result = state.result()

    judged = result.metrics["tuned+rerank"]
    assert list(judged) == [result.dim], "re-ranked at the dimension the gate chose only"
    tuned = result.metrics["tuned"][result.dim]
    # Re-ordering the top 5 leaves which chunks are in it, and everything below it, alone.
    for metric in ("recall@5", "accuracy@5", "recall@10"):
        assert judged[result.dim][metric] == tuned[metric]
    gain, low, high = result.rerank_gain
    assert low <= gain <= high
    assert gain == pytest.approx(judged[result.dim]["ndcg@10"] - tuned["ndcg@10"])

    report = (workspace.report_dir("rr") / "report.md").read_text()
    assert "**Re-ranking.**" in report and "`ragtune search --rerank 5`" in report
    # Which compute path judged (bfloat16, float32 or int8 on this CPU) is in the report.
    assert f"judge {local_judge_name()}" in report
    assert "### tuned+rerank" in report
    rows = _artifacts(state.state_details.flow_run_id)["evaluation-metrics"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    by_dim = {row["dim"]: row for row in rows}
    assert by_dim[result.dim]["tuned+rerank ndcg@10"] == round(judged[result.dim]["ndcg@10"], 4)
    assert all(row["tuned+rerank ndcg@10"] == "-" for d, row in by_dim.items() if d != result.dim)


def test_held_out_logged_queries_are_reported_with_the_judges_labels(
    prefect_api, workspace, tuned_copy
):
    _save_generated_set(workspace)
    _, queries, relevant = load_beir(BEIR_TINY)
    workspace.learned_dir.mkdir(parents=True)
    (workspace.learned_dir / "held_out.json").write_text(
        json.dumps(
            {
                "labels": "judge local (abc)",
                "queries": {f"log{i}": queries[q] for i, q in enumerate(queries)},
                "relevant": {f"log{i}": sorted(relevant[q]) for i, q in enumerate(queries)}
                | {"gone": ["a-chunk-re-chunked-away"]},
            }
        )
    )

    state = evaluate(EvaluateParams(workspace=str(workspace.root)), return_state=True)

    artifacts = _artifacts(state.state_details.flow_run_id)
    rows = artifacts["evaluation-logged-queries"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [row["dim"] for row in rows] == [384, 256, 128, 64]
    report = artifacts["evaluation-report"].data
    assert "Held-out logged queries** (relevant chunk chosen by the judge local (abc)" in report
    assert f"over {len(queries)} queries), queries never trained on" in report


def test_a_beir_folder_replaces_the_generated_questions(prefect_api, workspace, tuned_copy):
    result = evaluate(
        EvaluateParams(
            workspace=str(workspace.root),
            tuned_model=str(tuned_copy),
            beir_folder=str(BEIR_TINY),
            beir_split="dev",
            other_models=["all-MiniLM-L6-v2"],
            run_name="beir",
        )
    )

    data = json.loads((workspace.report_dir("beir") / "metrics.json").read_text())
    assert data["models"][0]["n_queries"] == 2  # the dev split's two judged queries
    assert data["title"] == "Retrieval on BEIR beir-tiny (dev)"
    assert not result.publish
    assert set(result.metrics) == {"base", "tuned", "other-1"}


def test_no_held_out_questions_is_a_clear_error(prefect_api, workspace, tuned_copy):
    _save_generated_set(workspace)
    save_rows(
        workspace.questions_dir,
        [{"question": "q?", "chunk_id": "d01", "split": "train", "kept": True}],
    )

    with pytest.raises(MetricsError, match="No kept test-split questions"):
        evaluate.fn(EvaluateParams(workspace=str(workspace.root)))


def test_questions_about_chunks_that_no_longer_exist_are_a_clear_error(workspace):
    _save_generated_set(workspace)
    save_rows(workspace.chunks_dir, [{"id": "d02", "text": "Only one chunk is left."}])

    with pytest.raises(MetricsError, match=r"19 test questions .* re-run the questions flow"):
        generated_eval_set(workspace)
