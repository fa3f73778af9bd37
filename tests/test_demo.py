"""The demo's last word: an example the judge confirms, with both models' ranks."""

from __future__ import annotations

from flows.demo import RIVALS, answered_example
from tasks.models import MINILM
from tasks.workspace import save_rows
from tests.conftest import nist_rows


def test_the_example_is_a_held_out_question_its_own_chunk_answers(workspace):
    rows = nist_rows(range(5, 8), "nist")
    target = rows[3]
    # A question lifted from its chunk's own words: the judge should prefer that chunk.
    question = " ".join(target["text"].split()[:12]) + "?"
    save_rows(workspace.chunks_dir, rows)
    save_rows(
        workspace.questions_dir,
        [
            {
                "question": "What is unrelated here?",
                "chunk_id": rows[0]["id"],
                "split": "train",
                "kept": True,
            },
            {"question": question, "chunk_id": target["id"], "split": "test", "kept": True},
        ],
    )

    example = answered_example(str(workspace.root), MINILM, MINILM, 384)

    assert example is not None and example.question == question
    assert example.chunk_id == target["id"] and example.source == "nist.pdf"
    assert example.page == target["page_start"] and example.rivals == RIVALS
    # Same model on both sides: the same rank, whatever it is (within the kept top 100).
    assert isinstance(example.base_rank, int) and example.base_rank == example.tuned_rank
