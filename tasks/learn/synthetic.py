"""Cold start: the judge labels the synthetic questions, and only grounded ones count.

A user with documents and no query log has the writer's questions. Each is judged as GPL
(Wang et al., 2022) judges its queries: the base model retrieves its top K chunks, the chunk it
was written from is added where the top K missed it, and the judge scores every candidate
(through the learn stage's judgement cache, so a re-run judges nothing new and an interrupted
one resumes). Training then learns the teacher's ordering over the candidates, so a question
that a wrong chunk answers best still teaches the right order instead of a wrong positive.

A question is *grounded* when the judge ranks its own chunk among its top `top_r` candidates:
a question the judge finds better answered elsewhere, or not about its chunk at all ("What is a
key-value pair?" for a biomedical abstract), is rejected with the reason and its rank, from the
training rows and from the held-out set alike, so the report measures answerable questions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.learn.judgements import Judgements
from tasks.learn.judges import Judge
from tasks.learn.rows import JudgedQuery, JudgeRun, Retrieval, RunGroups, judge_queries
from tasks.progress import Progress

#: The reason an ungrounded question is rejected with.
UNGROUNDED = "ungrounded"
#: The reason of a question whose judging failed (an API judge after its retries): it is
#: judged again next run, and meanwhile counts nowhere.
NOT_JUDGED = "not_judged"


def with_own_chunk(
    retrieval: Retrieval, owns: Sequence[str], top_k: int
) -> list[list[tuple[str, float]]]:
    """Each question's base top `top_k` (chunk id, cosine), plus the chunk it was written
    from, with its cosine, where the top K missed it: the judge must see the own chunk to say
    whether the question is grounded in it."""
    lists = retrieval.top(top_k)
    for i, (hits, own) in enumerate(zip(lists, owns, strict=True)):
        if own not in {cid for cid, _ in hits}:
            cosine = float(retrieval.queries[i] @ retrieval.documents[retrieval.row[own]])
            hits.append((own, cosine))
    return lists


def label_questions(
    questions: Sequence[Mapping[str, Any]],
    texts: Mapping[str, str],
    retrieval: Retrieval,
    judge: Judge,
    cache: Judgements,
    top_k: int = 10,
    progress: Progress | None = None,
    run_groups: RunGroups | None = None,
) -> JudgeRun:
    """Judge each question (rows with `question`, `chunk_id`, `split`) over its base top K
    and its own chunk; `retrieval` holds the questions' vectors in the same order. A test-split
    question is held out: judged for grounding, never a training row."""
    owns = [q["chunk_id"] for q in questions]
    return judge_queries(
        [q["question"] for q in questions],
        with_own_chunk(retrieval, owns, top_k),
        texts,
        judge,
        cache,
        progress=progress,
        held_out=[q.get("split") == "test" for q in questions],
        owns=owns,
        run_groups=run_groups,
    )


def grounded(judged: JudgedQuery, top_r: int) -> bool:
    """Whether the judge ranks the question's own chunk in its top `top_r` candidates."""
    if judged.own is None:
        raise ValueError(f"{judged.query!r} names no chunk it was written from")
    return judged.judge_rank(judged.own) <= top_r


def apply_grounding(
    questions: list[dict[str, Any]], judged: Sequence[JudgedQuery], top_r: int
) -> dict[str, int]:
    """Mark each question the judge was to label grounded or not, in place: `judge_rank` is
    its own chunk's rank by the judge, an ungrounded question is rejected with reason
    `ungrounded`, and one whose judging failed with `not_judged`. Questions an earlier run
    rejected for either reason are decided again (a looser rule may keep them). Returns the
    counts of each outcome."""
    rank = {(q.query, q.own): q.judge_rank(q.own) for q in judged if q.own is not None}
    counts = {"grounded": 0, UNGROUNDED: 0, NOT_JUDGED: 0}
    for row in questions:
        row.setdefault("judge_rank", None)
        if not to_label(row):
            continue
        key = (row["question"], row["chunk_id"])
        if key in rank:
            row["judge_rank"] = rank[key]
            outcome = "grounded" if rank[key] <= top_r else UNGROUNDED
        else:
            outcome = NOT_JUDGED
        row["kept"] = outcome == "grounded"
        row["reject_reason"] = None if row["kept"] else outcome
        counts[outcome] += 1
    return counts


def to_label(question: Mapping[str, Any]) -> bool:
    """Whether the judge is to label this question: kept, or rejected by an earlier
    labelling as ungrounded or left unjudged."""
    return bool(question.get("kept")) or question.get("reject_reason") in (UNGROUNDED, NOT_JUDGED)


def labelled(questions: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The questions the judge is to label (`to_label`), in order."""
    return [q for q in questions if to_label(q)]
