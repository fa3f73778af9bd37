"""Re-rank retrieved chunks with a language model as the judge.

The embedding model ranks by one vector per text; a language model reading each candidate can
tell which one the query is really about. Without a cross-encoder offline, the judge is the
bundled Gemma read as a judge rather than a writer: the mean log-probability of the query given
a passage (UPR, Sachan et al., 2022). The final order mixes both opinions, each standardised
over the candidates, so the judge reorders the retriever's top hits rather than replacing them.
It costs one LLM forward pass per candidate, so it is for the top few, at query time. The
judge's scoring itself is `tasks.llm.likelihood`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from tasks.llm.likelihood import (
    QUERY_GROUP,
    QueryLikelihood,
    is_statement,
    local_judge,
    score_grouped,
    style_judges,
)
from tasks.progress import Progress
from tasks.retrieval.evaluation import ModelEval, check_metrics, score_rankings


def standardise(scores: Sequence[float]) -> np.ndarray:
    """Scores as z-scores over the candidates (all zero when they are all equal)."""
    values = np.asarray(scores, dtype=float)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def rerank_order(
    base_scores: Sequence[float], judge_scores: Sequence[float], weight: float = 1.0
) -> list[int]:
    """Candidate positions, best first, by standardised base score plus `weight` times the
    standardised judge score. Standardising makes the judge's log-probabilities (which depend
    on the query's length and wording) and the retriever's cosines commensurable."""
    mixed = mixed_scores(base_scores, judge_scores, weight)
    return [int(i) for i in np.argsort(-mixed, kind="stable")]


def mixed_scores(
    base_scores: Sequence[float], judge_scores: Sequence[float], weight: float = 1.0
) -> np.ndarray:
    """Standardised base score plus `weight` times the standardised judge score, per
    candidate: the opinion re-ranking orders by, and the teacher `learn` trains on."""
    if len(base_scores) != len(judge_scores):
        raise ValueError(f"{len(base_scores)} base scores but {len(judge_scores)} judge scores")
    return standardise(base_scores) + weight * standardise(judge_scores)


T = TypeVar("T")


def reorder_head(items: Sequence[T], order: Sequence[int]) -> list[T]:
    """`items` with its first len(`order`) entries in `order` (positions, best first) and the
    rest where they were: the judge reads only the head of a ranking."""
    return [items[i] for i in order] + list(items[len(order) :])


def rerank(
    query: str,
    texts: Sequence[str],
    base_scores: Sequence[float],
    judge: QueryLikelihood | None = None,
    weight: float = 1.0,
) -> list[int]:
    """Positions of `texts` (a retriever's top hits with its scores), best first after the
    judge (the bundled Gemma unless given) has read each one."""
    if not texts:
        return []
    judge = judge or local_judge(statements=is_statement(query))
    return rerank_order(base_scores, judge.score(query, texts), weight)


def rerank_evaluation(
    evaluation: ModelEval,
    dim: int,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    relevant: Mapping[str, set[str]],
    top: int = 10,
    weight: float = 1.0,
    judge_for: Callable[[str], QueryLikelihood] | None = None,
    progress: Progress | None = None,
) -> ModelEval:
    """`evaluation`'s rankings at `dim` with their top `top` re-ranked by the judge: what
    `ragtune search --rerank` would return for the same queries, scored the same way.

    `evaluation` must have kept its hits (`evaluate_model(..., keep_hits=True)`); the judge
    for each query is the bundled Gemma in the query's style unless `judge_for` gives one.
    QUERY_GROUP queries' candidates are judged together, in batches of similar length.
    """
    from tqdm.auto import tqdm

    judge_for = judge_for or style_judges()
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    hits = evaluation.hits.get(dim)
    if not hits:
        raise ValueError(
            f"{evaluation.name} kept no hits at dim {dim}: evaluate it with keep_hits=True."
        )
    rankings = {}
    qids = list(hits)
    with tqdm(
        total=len(qids), desc=f"{evaluation.name}: re-ranking", unit="query", disable=None
    ) as bar:
        for start in range(0, len(qids), QUERY_GROUP):
            group = qids[start : start + QUERY_GROUP]
            judged = score_grouped(
                judge_for,
                [(queries[q], [corpus[doc] for doc, _ in hits[q][:top]]) for q in group],
            )
            for qid, judge_scores in zip(group, judged, strict=True):
                base_scores = [score for _, score in hits[qid][:top]]
                order = rerank_order(base_scores, judge_scores, weight)
                rankings[qid] = reorder_head([doc for doc, _ in hits[qid]], order)
            bar.update(len(group))
            if progress is not None:
                progress(start + len(group), len(qids))
    metrics, ndcg, first = score_rankings(rankings, relevant)
    result = ModelEval(
        name=f"{evaluation.name}+rerank",
        model=evaluation.model,
        metrics={dim: metrics},
        ndcg_per_query={dim: ndcg},
        first_rank={dim: first},
        query_prompt=evaluation.query_prompt,
        corpus_prompt=evaluation.corpus_prompt,
        n_queries=evaluation.n_queries,
        n_corpus=evaluation.n_corpus,
    )
    check_metrics(result)
    return result
