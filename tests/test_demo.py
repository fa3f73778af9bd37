"""The demo's last word: counts over every held-out question, and the one at the median, from
the ranks the evaluation saved."""

from __future__ import annotations

import json

from sentence_transformers import SentenceTransformer

from flows.demo import BEYOND, rank_changes
from tasks.models import MINILM
from tasks.retrieval.evaluation import evaluate_model
from tasks.retrieval.report import write_report
from tasks.training.data import held_out_queries
from tasks.workspace import load_rows, save_rows
from tests.conftest import nist_rows, save_with_prompts


def held_out_workspace(workspace) -> list[dict]:
    """Real NIST chunks, and for each of the first eight a held-out question made of four of
    its words (one a retriever can miss), plus one training question."""
    rows = nist_rows(range(5, 8), "nist")
    save_rows(workspace.chunks_dir, rows)
    questions = [
        {
            "question": " ".join(row["text"].split()[20:24]) + "?",
            "chunk_id": row["id"],
            "split": "test",
            "kept": True,
        }
        for row in rows[:8]
    ]
    trained = {"question": "A question?", "chunk_id": rows[9]["id"], "split": "train", "kept": True}
    save_rows(workspace.questions_dir, [*questions, trained])
    return questions


def test_the_same_model_on_both_sides_changes_no_rank(workspace):
    questions = held_out_workspace(workspace)

    changes = rank_changes(str(workspace.root), MINILM, MINILM, 384)

    assert (changes.better, changes.worse, changes.same) == (0, 0, 8)
    example = changes.median
    assert example is not None and example.question in {q["question"] for q in questions}
    assert example.source == "nist.pdf" and example.base_rank == example.tuned_rank


def test_the_example_is_the_held_out_question_at_the_median_rank_change(workspace, minilm):
    questions = held_out_workspace(workspace)
    # Another model for the "tuned" side: the same weights with a query prompt, which moves
    # the query vectors and so some ranks, up and down.
    other = save_with_prompts(
        minilm, workspace.model_dir("prompted"), {"query": "Represent this question: "}
    )

    changes = rank_changes(str(workspace.root), MINILM, str(other), 384)

    assert len(changes.moves) == len(questions) and list(changes.moves) == sorted(changes.moves)
    assert changes.better > 0 and changes.worse > 0, "the check needs moves both ways"
    assert changes.better + changes.worse + changes.same == len(questions)
    example = changes.median
    assert example is not None
    moved = (example.base_rank or BEYOND) - (example.tuned_rank or BEYOND)
    assert moved == changes.moves[(len(questions) - 1) // 2]


def test_the_ranks_come_from_the_evaluation_report_without_encoding_again(workspace, minilm):
    held_out_workspace(workspace)
    other = save_with_prompts(
        minilm, workspace.model_dir("prompted"), {"query": "Represent this question: "}
    )
    corpus = {row["id"]: row["text"] for row in load_rows(workspace.chunks_dir)}
    queries, relevant = held_out_queries(load_rows(workspace.questions_dir), corpus)
    evals = [
        evaluate_model(model, corpus, queries, relevant, [384, 64], name=name)
        for model, name in ((minilm, "base"), (SentenceTransformer(str(other)), "tuned"))
    ]
    report = workspace.report_dir("run")
    write_report(report, evals, None, {}, [], "held-out questions")

    # Models that cannot be loaded: the ranks must come from the report alone.
    metrics = json.loads((report / "metrics.json").read_text())
    saved = rank_changes(str(workspace.root), "no/such-base", "no/such-tuned", 384, metrics)

    assert saved == rank_changes(str(workspace.root), MINILM, str(other), 384)
    assert saved.better > 0 and saved.worse > 0
