"""The cold start: the real bundled judge labels synthetic questions over their base top K and
their own chunk, through the judgement cache; only grounded questions count, in training and
in the held-out set; and the rows it writes train together with a judged log in one run."""

from __future__ import annotations

import json

import pytest

from flows.label import label
from flows.params import LabelParams
from tasks.learn.judgements import Judgements
from tasks.learn.rows import load_training_rows
from tasks.learn.synthetic import UNGROUNDED
from tasks.workspace import Workspace, fingerprint, load_rows, save_rows
from tests.conftest import ANSWERED, PASSAGES, nist_rows

#: Written from the photosynthesis passage, but about Peru: another passage answers it.
STRAY = ("Which city is the seat of Peru's government?", 2)


def question_rows(chunk_ids: list[str]) -> list[dict]:
    """Questions as the questions stage saves them: each with the chunk it was written from."""
    asked = [*ANSWERED, STRAY]
    return [
        {
            "question": text,
            "chunk_id": chunk_ids[own],
            "generator": "test",
            "split": "test" if n == 0 else "train",
            "kept": True,
            "reject_reason": None,
        }
        for n, (text, own) in enumerate(asked)
    ]


def labelled_workspace(root) -> Workspace:
    """Chunks: the three passages and some NIST text as distractors; questions about them."""
    ws = Workspace.at(root)
    chunks = [
        {"id": fingerprint(text), "doc_id": f"d{i}", "source": f"d{i}.md", "text": text}
        for i, text in enumerate(PASSAGES)
    ]
    others = [
        {k: row[k] for k in ("id", "doc_id", "source", "text")}
        for row in nist_rows(range(5, 6), "nist")
    ]
    save_rows(ws.chunks_dir, chunks + others)
    save_rows(ws.questions_dir, question_rows([c["id"] for c in chunks]))
    return ws


def test_labelling_judges_each_question_once_and_rejects_the_ungrounded_with_its_rank(
    prefect_api, tmp_path
):
    ws = labelled_workspace(tmp_path / "ws")
    params = LabelParams(workspace=str(ws.root), top_k=2, ground_top_r=1, train_form="distill")

    first = label(params)
    pairs = len(Judgements(ws.judgement_cache))
    again = label(params)

    assert first.new == len(ANSWERED) + 1 and first.judged == first.new
    assert 2 * first.new <= pairs <= 3 * first.new, "its top 2, and its own chunk if missed"
    assert again.new == 0 and len(Judgements(ws.judgement_cache)) == pairs
    rows = {row["question"]: row for row in load_rows(ws.questions_dir)}
    stray = rows[STRAY[0]]
    assert not stray["kept"] and stray["reject_reason"] == UNGROUNDED and stray["judge_rank"] > 1
    for question, _ in ANSWERED:
        assert rows[question]["kept"] and rows[question]["judge_rank"] == 1, rows[question]
    assert (first.grounded, first.ungrounded, first.held_out) == (3, 1, 1)
    trained, form = load_training_rows(ws.judged_questions_dir)
    assert form == "distill" and {row["anchor"] for row in trained} == {q for q, _ in ANSWERED[1:]}
    assert len({len(row["label"]) for row in trained}) == 1, "one width for the loss's tensor"


def test_a_looser_grounding_rule_keeps_what_a_stricter_one_rejected(prefect_api, tmp_path):
    ws = labelled_workspace(tmp_path / "ws")
    label(LabelParams(workspace=str(ws.root), top_k=2, ground_top_r=1))

    looser = label(LabelParams(workspace=str(ws.root), top_k=2, ground_top_r=3))

    assert looser.new == 0 and looser.ungrounded == 0 and looser.grounded == len(ANSWERED) + 1
    assert all(row["kept"] for row in load_rows(ws.questions_dir))


def test_margin_rows_put_the_own_chunk_first_and_pairs_write_no_rows(prefect_api, tmp_path):
    ws = labelled_workspace(tmp_path / "ws")
    texts = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}

    label(LabelParams(workspace=str(ws.root), top_k=2, ground_top_r=3, train_form="margin"))
    rows, form = load_training_rows(ws.judged_questions_dir)
    own = {row["question"]: texts[row["chunk_id"]] for row in load_rows(ws.questions_dir)}
    assert form == "margin"
    assert all(row["positive"] == own[row["anchor"]] for row in rows)
    assert all(len(row["label"]) == len(rows[0]["label"]) >= 1 for row in rows)

    paired = label(LabelParams(workspace=str(ws.root), top_k=2, train_form="pairs"))
    assert paired.train_rows == 0 and not ws.judged_questions_dir.exists()


@pytest.mark.parametrize("runner", ["dask"])
def test_labelling_on_a_local_dask_cluster_gives_the_same_judgements(prefect_api, tmp_path, runner):
    here = labelled_workspace(tmp_path / "threads")
    there = labelled_workspace(tmp_path / runner)

    label(LabelParams(workspace=str(here.root), top_k=2))
    label(LabelParams(workspace=str(there.root), top_k=2, task_runner=runner, dask_workers=2))

    def judgements(ws: Workspace) -> dict:
        with Judgements(ws.judgement_cache)._db as db:
            return {(q, c): s for q, c, _, s in db.execute("SELECT * FROM judgements")}

    expected, got = judgements(here), judgements(there)
    assert set(got) == set(expected)
    assert all(got[key] == pytest.approx(expected[key], abs=1e-3) for key in expected)
    ranks = [[row["judge_rank"] for row in load_rows(ws.questions_dir)] for ws in (here, there)]
    assert ranks[0] == ranks[1]
    assert json.dumps(ranks[0])
