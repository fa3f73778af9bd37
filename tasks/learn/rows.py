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
  for DistillKLDivLoss: the student learns the judge's whole ordering, not just its favourite;
- `margin`: (query, a positive, the other K - 1 chunks) with the teacher's margin of the
  positive over each, for MarginMSELoss (GPL, Wang et al., 2022). A synthetic question's
  positive is the chunk it was written from; a logged query's, the teacher's top chunk.

`nudge` is the lever that needs no training: it moves the stored vectors of the chunks the
teacher chose towards the queries that chose them.

A seeded share of the log is held out by query and never becomes a training row: it is where
the report measures the tuned model, against the judge's labels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from tasks.workspace import load_rows, save_rows


@dataclass
class JudgedQuery:
    """One logged query, its candidates in the retriever's order, and what the judge said."""

    query: str
    chunk_ids: list[str]
    base_scores: list[float]
    judge_scores: list[float]
    held_out: bool
    #: the chunk a synthetic question was written from (None for a logged query)
    own: str | None = None

    def teacher_scores(self, weight: float = 1.0) -> np.ndarray:
        """The teacher's score of each candidate (in the retriever's order)."""
        return mixed_scores(self.base_scores, self.judge_scores, weight)

    def teacher_order(self, weight: float = 1.0) -> list[int]:
        """Candidate positions, the teacher's best first."""
        return rerank_order(self.base_scores, self.judge_scores, weight)

    def judge_rank(self, chunk_id: str) -> int:
        """1 + how many candidates the judge alone scored above `chunk_id`."""
        mine = self.judge_scores[self.chunk_ids.index(chunk_id)]
        return 1 + sum(score > mine for score in self.judge_scores)

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


#: Runs groups of (query, passages) items elsewhere (e.g. on Dask workers): it gets every
#: group and yields (group index, (scores or None per item, failure reasons)) in any order.
RunGroups = Callable[
    [list[list[tuple[str, list[str]]]]],
    Iterator[tuple[int, tuple[list[list[float] | None], list[str]]]],
]


def judge_queries(
    queries: Sequence[str],
    candidates: Sequence[Sequence[tuple[str, float]]],
    texts: Mapping[str, str],
    judge: Judge,
    cache: Judgements,
    held_out_share: float = 0.2,
    seed: int = 42,
    progress: Progress | None = None,
    *,
    held_out: Sequence[bool] | None = None,
    owns: Sequence[str | None] | None = None,
    run_groups: RunGroups | None = None,
) -> JudgeRun:
    """Judge each query's candidates, asking the judge only about pairs the cache lacks.

    Queries go to the judge QUERY_GROUP at a time where it can batch them (`score_many`), else
    one at a time, and each group's new scores are stored as soon as the group is judged, so an
    interrupted run resumes; a query whose judging fails for good (an API judge after its
    retries) is reported, not stored, and the rest go on. `held_out` marks the queries that are for
    measuring (default: the seeded `held_out_share` of them); `owns`, the chunk each synthetic
    question was written from; `run_groups` judges the groups elsewhere (Dask workers), which
    changes where the work runs, never the scores.
    """
    from tqdm.auto import tqdm

    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    if held_out is None:
        held_out = [is_held_out(query, held_out_share, seed) for query in queries]
    run = JudgeRun()
    fingerprint = judge.fingerprint()
    ids = [[cid for cid, _ in hits] for hits in candidates]
    known = [cache.scores(q, fingerprint, line) for q, line in zip(queries, ids, strict=True)]

    def missing(i: int) -> list[str]:
        return [cid for cid in ids[i] if cid not in known[i]]

    # Queries the cache answers whole are left out: groups hold only queries to judge. A judge
    # that cannot batch queries gets them one at a time, so each is stored as soon as it is
    # judged and a run killed mid-way keeps what it paid for.
    todo = [i for i in range(len(queries)) if missing(i)]
    size = QUERY_GROUP if hasattr(judge, "score_many") else 1
    groups = [todo[start : start + size] for start in range(0, len(todo), size)]
    items = [[(queries[i], [texts[cid] for cid in missing(i)]) for i in group] for group in groups]
    done = len(queries) - sum(map(len, groups))
    started = time.perf_counter()
    finished = run_groups(items) if run_groups and items else _here(judge, items)
    with tqdm(
        total=len(queries), initial=done, desc=f"judging ({judge.name})", unit="query", disable=None
    ) as bar:
        for index, (answers, failures) in finished:
            run.failed += failures
            # Each group is stored as it comes, so a run killed mid-way keeps what it paid for.
            for i, scores in zip(groups[index], answers, strict=True):
                if scores is not None:
                    new = dict(zip(missing(i), scores, strict=True))
                    cache.record(queries[i], fingerprint, new)
                    known[i] |= new
                    run.new += 1
                    run.pairs += len(new)
            done += len(groups[index])
            bar.update(len(groups[index]))
            if progress is not None:
                progress(done, len(queries))
    run.judge_s = time.perf_counter() - started
    for i, query in enumerate(queries):
        if all(cid in known[i] for cid in ids[i]):
            run.judged.append(
                JudgedQuery(
                    query=query,
                    chunk_ids=ids[i],
                    base_scores=[score for _, score in candidates[i]],
                    judge_scores=[known[i][cid] for cid in ids[i]],
                    held_out=held_out[i],
                    own=owns[i] if owns is not None else None,
                )
            )
    return run


def _here(
    judge: Judge, groups: list[list[tuple[str, list[str]]]]
) -> Iterator[tuple[int, tuple[list[list[float] | None], list[str]]]]:
    for index, items in enumerate(groups):
        yield index, judge_items(judge, items)


def judge_items(
    judge: Judge, items: Sequence[tuple[str, Sequence[str]]]
) -> tuple[list[list[float] | None], list[str]]:
    """The judge's scores for each (query, passages) item, all at once where the judge
    batches (`score_many`), else one by one; None for an item whose judging failed for good,
    with the reasons. What one group costs, wherever it runs."""
    from tasks.llm.http import ApiCallFailed

    if items and hasattr(judge, "score_many"):
        return list(judge.score_many(items)), []
    answers: list[list[float] | None] = []
    failures: list[str] = []
    for query, passages in items:
        try:
            answers.append(judge.score(query, passages))
        except ApiCallFailed as exc:
            failures.append(str(exc))
            answers.append(None)
    return answers, failures


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
        if form == "margin" and q.own is not None:
            # GPL's positive: the chunk the question was written from, whatever its rank.
            first = q.chunk_ids.index(q.own)
            order = [first, *(i for i in order if i != first)]
        teacher = q.teacher_scores(weight)
        ranked = [texts[q.chunk_ids[i]] for i in order]
        row: dict[str, Any] = {"anchor": q.query, "positive": ranked[0]}
        if form == "negatives":
            if teacher[order[0]] - teacher[order[-1]] < negative_margin:
                continue
            row["negative"] = ranked[-1]
        elif form in ("distill", "margin"):
            # Every row needs as many candidates: the loss stacks them into one tensor.
            for n, text in enumerate(ranked[1:width], start=1):
                row["negative" if n == 1 else f"negative_{n}"] = text
            if form == "distill":
                row["label"] = [float(teacher[i]) for i in order[:width]]
            else:
                row["label"] = [float(teacher[order[0]] - teacher[i]) for i in order[1:width]]
        rows.append(row)
    return rows


def save_training_rows(folder: Path, rows: list[dict[str, Any]], form: LabelForm) -> Path:
    """Write rows and the label form they are in (which decides the loss they train with)."""
    path = save_rows(folder, rows)
    (folder / FORM_FILE).write_text(json.dumps({"form": form}))
    return path


def load_training_rows(folder: Path) -> tuple[list[dict[str, Any]], LabelForm]:
    """Rows `save_training_rows` wrote, with their label form (for rows an older `learn`
    wrote without one: distill where they carry the judge's scores, else pairs)."""
    rows = load_rows(folder)
    marker = folder / FORM_FILE
    if marker.exists():
        return rows, json.loads(marker.read_text())["form"]
    return rows, "distill" if rows and "label" in rows[0] else "positives"


#: Beside saved training rows: the label form they are in.
FORM_FILE = "form.json"


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
    the judge's choice highest for the set-aside ones (MRR@10) wins, but only when its gain over
    not nudging has a paired bootstrap interval above zero; else 0 (no nudge). On SciFact the
    nudge's gain on the log did not hold on held-out human claims (BENCHMARKS.md), so a step
    must earn its place. `row` maps chunk ids to rows of `documents`. Returns (step, MRR@10
    per step)."""
    from tasks.retrieval.evaluation import paired_bootstrap

    answers = np.array([row[q.judge_choice] for q in judged], dtype=np.int64)
    check = np.array([is_held_out(q.query, share, seed + 1) for q in judged])
    if check.all() or not check.any():
        return 0.0, {}
    top = min(10, len(documents))
    reciprocal = {}
    for step in (0.0, *steps):
        moved = nudge(documents, query_vectors[~check], answers[~check], step)
        ranks = top_k(query_vectors[check] @ moved.T, top)
        hit = ranks == answers[check][:, None]
        reciprocal[step] = (hit / np.arange(1, top + 1)).sum(axis=1)
    scores = {step: float(rr.mean()) for step, rr in reciprocal.items()}
    best = max(scores, key=lambda step: (scores[step], -step))
    _, low, _ = paired_bootstrap(reciprocal[0.0], reciprocal[best])
    return (best if low > 0 else 0.0), scores
