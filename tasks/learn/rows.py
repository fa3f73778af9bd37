"""Learn from logged queries: the judge labels the retriever's candidates, the retriever trains
on the labels (UPR and ART, Sachan et al., 2022: language-model likelihood as the teacher).

For each logged query the base model retrieves its top K chunks and the judge scores each one
(cached, `tasks.learn.judgements`). The teacher's opinion of a candidate is the same mix that
re-ranking uses (standardised retriever score plus standardised judge score), since that mix
is what measurably beats the retriever alone. Training rows come in three forms:

- `positives`: (query, the teacher's top chunk), for MultipleNegativesRankingLoss;
- `negatives`: plus the teacher's bottom chunk as a hard negative, when the teacher puts it at
  least `negative_margin` standard deviations below the top (else it may be a false negative);
- `distill`: (query, all K chunks in teacher order) with the teacher's scores as soft labels,
  for DistillKLDivLoss: the student learns the judge's whole ordering, not just its favourite.

`nudge` is the lever that needs no training: it moves the stored vectors of the chunks the
teacher chose towards the queries that chose them.

A seeded share of the log is held out by query and never becomes a training row: it is where
the report measures the tuned model, against the judge's labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.learn.judgements import Judgements
from tasks.learn.judges import Judge
from tasks.learn.querylog import is_held_out
from tasks.learn.settings import LABEL_FORMS, LabelForm
from tasks.llm.likelihood import QUERY_GROUP
from tasks.progress import Progress
from tasks.retrieval.rerank import mixed_scores, rerank_order
from tasks.vectors import top_k, unit_rows


@dataclass
class JudgedQuery:
    """One logged query, its candidates in the retriever's order, and what the judge said."""

    query: str
    chunk_ids: list[str]
    base_scores: list[float]
    judge_scores: list[float]
    held_out: bool

    def teacher_scores(self, weight: float = 1.0) -> np.ndarray:
        """The teacher's score of each candidate (in the retriever's order)."""
        return mixed_scores(self.base_scores, self.judge_scores, weight)

    def teacher_order(self, weight: float = 1.0) -> list[int]:
        """Candidate positions, the teacher's best first."""
        return rerank_order(self.base_scores, self.judge_scores, weight)

    @property
    def judge_choice(self) -> str:
        """The chunk the judge alone scored highest: what held-out evaluation calls relevant
        and what the nudge moves."""
        return self.chunk_ids[int(np.argmax(self.judge_scores))]


@dataclass
class JudgeRun:
    """What one pass over a log did."""

    judged: list[JudgedQuery] = field(default_factory=list)
    #: queries the judge was asked about in this run (the rest came from the cache)
    new: int = 0
    #: (query, chunk) pairs the judge scored in this run
    pairs: int = 0
    judge_s: float = 0.0
    #: queries whose judging failed, with the reason (they are judged again next run)
    failed: list[str] = field(default_factory=list)

    @property
    def seconds_per_new_query(self) -> float:
        return self.judge_s / self.new if self.new else 0.0

    def top_changed(self, weight: float = 1.0) -> float:
        """Share of judged queries whose first result the teacher would change."""
        if not self.judged:
            return 0.0
        return sum(q.teacher_order(weight)[0] != 0 for q in self.judged) / len(self.judged)


@dataclass
class Retrieval:
    """A model's unit vectors of a corpus (each distinct text once) and of some queries."""

    ids: list[str]
    #: row of `documents` for each chunk id (copies of a text share one row)
    row: dict[str, int]
    documents: np.ndarray
    queries: np.ndarray

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The top `k` (chunk id, cosine) of each query; ties go to the smaller id."""
        scores = (self.queries @ self.documents.T)[:, [self.row[cid] for cid in self.ids]]
        # Ids are in ascending order, so equal scores keep the smaller id first.
        order = top_k(scores, k)
        return [
            [(self.ids[i], float(line[i])) for i in top]
            for line, top in zip(scores, order, strict=True)
        ]


def embed_for_retrieval(
    model: Any, corpus: Mapping[str, str], queries: Sequence[str], batch_size: int = 64
) -> Retrieval:
    """`corpus` and `queries` encoded by `model` with its own prompts. Equal texts are encoded
    once so their copies tie, as in evaluation."""
    from tasks.models import model_prompts
    from tasks.retrieval.evaluation import distinct

    query_prompt, document_prompt = model_prompts(model)
    ids = sorted(corpus)
    texts = distinct(corpus[cid] for cid in ids)
    column = {text: i for i, text in enumerate(texts)}
    options = {"batch_size": batch_size, "normalize_embeddings": True, "convert_to_numpy": True}
    return Retrieval(
        ids=ids,
        row={cid: column[corpus[cid]] for cid in ids},
        documents=model.encode_document(texts, prompt=document_prompt or None, **options),
        queries=model.encode_query(list(queries), prompt=query_prompt or None, **options),
    )


def judge_queries(
    queries: Sequence[str],
    candidates: Sequence[Sequence[tuple[str, float]]],
    texts: Mapping[str, str],
    judge: Judge,
    cache: Judgements,
    held_out_share: float = 0.2,
    seed: int = 42,
    progress: Progress | None = None,
) -> JudgeRun:
    """Judge each query's candidates, asking the judge only about pairs the cache lacks.

    Queries go to the judge QUERY_GROUP at a time where it can batch them (`score_many`), and
    each query's new scores are stored as soon as its group is judged, so an interrupted run
    resumes; a query whose judging fails for good (an API judge after its retries) is
    reported, not stored, and the rest go on.
    """
    from tqdm.auto import tqdm

    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    run = JudgeRun()
    pairs = list(zip(queries, candidates, strict=True))
    held = {query: is_held_out(query, held_out_share, seed) for query in queries}
    with tqdm(total=len(pairs), desc=f"judging ({judge.name})", unit="query", disable=None) as bar:
        for start in range(0, len(pairs), QUERY_GROUP):
            group = pairs[start : start + QUERY_GROUP]
            run.judged += _judge_group(group, texts, judge, cache, run, held)
            bar.update(len(group))
            if progress is not None:
                progress(start + len(group), len(pairs))
    return run


def _judge_group(
    group: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    texts: Mapping[str, str],
    judge: Judge,
    cache: Judgements,
    run: JudgeRun,
    held: Mapping[str, bool],
) -> list[JudgedQuery]:
    """Judge one group of queries: look up the cache, ask the judge about the rest in one
    call, store each query's new scores; the group's judged queries (failed ones left out)."""
    fingerprint = judge.fingerprint()
    known = [cache.scores(q, fingerprint, [cid for cid, _ in hits]) for q, hits in group]
    asks = []
    for i, (_, hits) in enumerate(group):
        missing = [cid for cid, _ in hits if cid not in known[i]]
        if missing:
            asks.append((i, missing))
    started = time.perf_counter()
    answers = _answers(judge, [(group[i][0], [texts[cid] for cid in ids]) for i, ids in asks], run)
    # Each answer is stored as it comes, so a run killed mid-group keeps what it paid for.
    for (i, missing), scores in zip(asks, answers, strict=True):
        if scores is not None:
            new = dict(zip(missing, scores, strict=True))
            cache.record(group[i][0], fingerprint, new)
            known[i] |= new
            run.new += 1
            run.pairs += len(missing)
    run.judge_s += time.perf_counter() - started
    judged = []
    for i, (query, hits) in enumerate(group):
        ids = [cid for cid, _ in hits]
        if all(cid in known[i] for cid in ids):
            judged.append(
                JudgedQuery(
                    query=query,
                    chunk_ids=ids,
                    base_scores=[score for _, score in hits],
                    judge_scores=[known[i][cid] for cid in ids],
                    held_out=held[query],
                )
            )
    return judged


def _answers(
    judge: Judge, items: list[tuple[str, list[str]]], run: JudgeRun
) -> Iterator[list[float] | None]:
    """The judge's scores for each item, all at once where the judge batches (`score_many`),
    else one by one; None for an item whose judging failed for good (its reason added to
    `run.failed`)."""
    from tasks.llm.http import ApiCallFailed

    if items and hasattr(judge, "score_many"):
        yield from judge.score_many(items)
        return
    for query, passages in items:
        try:
            yield judge.score(query, passages)
        except ApiCallFailed as exc:
            run.failed.append(str(exc))
            yield None


def training_rows(
    judged: Sequence[JudgedQuery],
    texts: Mapping[str, str],
    form: LabelForm = "positives",
    weight: float = 1.0,
    negative_margin: float = 1.0,
) -> list[dict[str, Any]]:
    """Rows for the trainer from judged queries, in `form` (see the module's docstring)."""
    if form not in LABEL_FORMS:
        raise ValueError(f"unknown label form {form!r}; choose one of {', '.join(LABEL_FORMS)}")
    held = [q.query for q in judged if q.held_out]
    if held:
        raise ValueError(
            f"{len(held)} held-out queries were passed to training_rows: the held-out share "
            "of the log is for measuring, never for training"
        )
    width = min((len(q.chunk_ids) for q in judged), default=0)
    rows = []
    for q in judged:
        if len(q.chunk_ids) < 2:
            continue
        order = q.teacher_order(weight)
        teacher = q.teacher_scores(weight)
        ranked = [texts[q.chunk_ids[i]] for i in order]
        row: dict[str, Any] = {"anchor": q.query, "positive": ranked[0]}
        if form == "negatives":
            if teacher[order[0]] - teacher[order[-1]] < negative_margin:
                continue
            row["negative"] = ranked[-1]
        elif form == "distill":
            # Every row needs as many candidates: the loss stacks them into one tensor.
            for n, text in enumerate(ranked[1:width], start=1):
                row["negative" if n == 1 else f"negative_{n}"] = text
            row["label"] = [float(teacher[i]) for i in order[:width]]
        rows.append(row)
    return rows


def judged_eval_set(
    judged: Sequence[JudgedQuery],
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The held-out logged queries as an IR set whose relevant chunk is the one the judge
    scored highest: labels by the judge alone (not mixed with the base retriever, which would
    favour the base model), not by people, and to be reported as such."""
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for n, q in enumerate(q for q in judged if q.held_out):
        qid = f"log{n}"
        queries[qid] = q.query
        relevant[qid] = {q.judge_choice}
    return queries, relevant


def nudge(
    documents: np.ndarray, queries: np.ndarray, answers: Sequence[int], step: float
) -> np.ndarray:
    """Document vectors moved towards the queries they answer, the model untouched (NUDGE-N,
    Zeighami et al., 2024): each answering document moves `step` along the unit sum of its
    queries' vectors and back onto the unit sphere; the rest stay where they were. It fits a
    vector store as it is, and helps exactly where queries recur: on documents that were
    asked about before."""
    if not step >= 0:
        raise ValueError(f"the nudge step must be 0 or more, got {step}")
    if len(queries) != len(answers):
        raise ValueError(f"{len(queries)} query vectors but {len(answers)} answers")
    pull = np.zeros_like(documents)
    np.add.at(pull, np.asarray(answers, dtype=np.int64), queries)
    length = np.linalg.norm(pull, axis=1)
    moved = length > 0
    out = documents.copy()
    out[moved] += step * pull[moved] / length[moved, None]
    out[moved] = unit_rows(out[moved])
    return out


#: The nudge steps `choose_nudge_step` tries.
NUDGE_STEPS = (0.05, 0.1, 0.2, 0.4, 0.8)


def choose_nudge_step(
    documents: np.ndarray,
    row: Mapping[str, int],
    judged: Sequence[JudgedQuery],
    query_vectors: np.ndarray,
    share: float = 0.2,
    seed: int = 42,
    steps: Sequence[float] = NUDGE_STEPS,
) -> tuple[float, dict[float, float]]:
    """The nudge step for these judged queries, chosen on the queries themselves: a seeded
    `share` of them is set aside, the rest nudge the documents, and the step whose nudge ranks
    the judge's choice highest for the set-aside ones (MRR@10) wins; 0 when none beats not
    nudging. `row` maps chunk ids to rows of `documents`. Returns (step, MRR@10 per step)."""
    answers = np.array([row[q.judge_choice] for q in judged], dtype=np.int64)
    check = np.array([is_held_out(q.query, share, seed + 1) for q in judged])
    if check.all() or not check.any():
        return 0.0, {}
    top = min(10, len(documents))
    scores = {}
    for step in (0.0, *steps):
        moved = nudge(documents, query_vectors[~check], answers[~check], step)
        ranks = top_k(query_vectors[check] @ moved.T, top)
        hit = ranks == answers[check][:, None]
        scores[step] = float((hit / np.arange(1, top + 1)).sum(axis=1).mean())
    best = max(scores, key=lambda step: (scores[step], -step))
    return best, scores
