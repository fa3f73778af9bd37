"""Re-rank retrieved chunks with a language model as the judge.

The embedding model ranks by one vector per text; a language model reading each candidate can
tell which one the query is really about. Without a cross-encoder offline, the judge is the
bundled Gemma read as a judge rather than a writer: the mean log-probability of the query given
a passage (UPR, Sachan et al., 2022). The final order mixes both opinions, each standardised
over the candidates, so the judge reorders the retriever's top hits rather than replacing them.
It costs one LLM forward pass per candidate, so it is for the top few, at query time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from tasks.evaluation import ModelEval, Progress, check_metrics, score_rankings
from tasks.questions import is_question

#: The judge reads the passage and scores the question as its continuation.
JUDGE_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
#: For statement-style queries (claims, titles): the question would read as an odd continuation.
STATEMENT_PROMPT = "Passage: {passage}\nPlease write a claim based on this passage.\nClaim:"


class QueryLikelihood:
    """Scores (question, passage) by the causal LM's mean log-probability of the question's
    tokens after the passage: a passage that makes the question likely is relevant to it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        prompt: str = JUDGE_PROMPT,
        max_passage_chars: int = 1000,
    ) -> None:
        if "{passage}" not in prompt:
            raise ValueError(f"the judge prompt must contain '{{passage}}', got {prompt!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.prompt = prompt
        self.max_passage_chars = max_passage_chars

    def score(self, question: str, passages: Sequence[str]) -> list[float]:
        """One score per passage, in one batch (the passages of one question are few)."""
        import torch

        question_ids = self.tokenizer(" " + question, add_special_tokens=False)["input_ids"]
        contexts = [
            self.tokenizer(self.prompt.format(passage=p[: self.max_passage_chars]))["input_ids"]
            for p in passages
        ]
        length = max(len(c) for c in contexts) + len(question_ids)
        ids = torch.zeros((len(contexts), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            ids[row, : len(context) + len(question_ids)] = torch.tensor(context + question_ids)
            mask[row, : len(context) + len(question_ids)] = 1
        target = torch.tensor(question_ids)
        scores = []
        with torch.no_grad():
            # Logits only at the question's positions: the full vocabulary (262k for Gemma) at
            # every position of every passage would take gigabytes.
            hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for row, context in enumerate(contexts):
                at = torch.arange(len(context) - 1, len(context) + len(question_ids) - 1)
                logits = self.model.lm_head(hidden[row, at]).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                scores.append(logprobs[torch.arange(len(question_ids)), target].mean().item())
        return scores


def local_judge(statements: bool = False, dtype: str = "auto") -> QueryLikelihood:
    """The bundled Gemma 3 270M as the judge, offline."""
    from tasks.generators.local import load_gemma, resolve_dtype

    dtype = resolve_dtype(dtype)
    model, tokenizer = load_gemma(dtype=dtype)
    return QueryLikelihood(
        model,
        tokenizer,
        name=f"gemma3-270m-{dtype}",
        prompt=STATEMENT_PROMPT if statements else JUDGE_PROMPT,
    )


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
    if len(base_scores) != len(judge_scores):
        raise ValueError(f"{len(base_scores)} base scores but {len(judge_scores)} judge scores")
    mixed = standardise(base_scores) + weight * standardise(judge_scores)
    return [int(i) for i in np.argsort(-mixed, kind="stable")]


def is_statement(query: str) -> bool:
    """Claims, titles and keywords do not end with a question mark; the judge is asked for
    that style, since it scores the query as the answer to its prompt."""
    return not is_question(query)


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
    """
    from tqdm.auto import tqdm

    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    hits = evaluation.hits.get(dim)
    if not hits:
        raise ValueError(
            f"{evaluation.name} kept no hits at dim {dim}: evaluate it with keep_hits=True."
        )
    rankings = {}
    for done, (qid, ranked) in enumerate(
        tqdm(hits.items(), desc=f"{evaluation.name}: re-ranking", unit="query", disable=None),
        start=1,
    ):
        query = queries[qid]
        head = ranked[:top]
        order = rerank(
            query,
            [corpus[doc] for doc, _ in head],
            [score for _, score in head],
            judge_for(query) if judge_for else None,
            weight,
        )
        rankings[qid] = reorder_head([doc for doc, _ in ranked], order)
        if progress is not None:
            progress(done, len(hits))
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
