"""Retrieval metrics per Matryoshka dimension, paired bootstrap intervals and the publish gate.

The metrics are the ones sentence-transformers' `InformationRetrievalEvaluator` reports, with the
same definitions, cosine similarity and tie order (higher score first, then ascending corpus id),
so our numbers match its numbers (the tests check every dimension on a real model). We compute
them ourselves for two reasons:

- cost: the evaluator encodes the corpus (and the queries) once per `truncate_dim`; here each
  model encodes the corpus once at full width and every dimension is a truncation of it, which
  is exactly what `truncate_dim` does (truncate, then cosine renormalises);
- the gate needs per-query values (NDCG@10 for the paired bootstrap, the rank of the first
  relevant document for the list of queries that got worse), which the evaluator only averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.progress import Progress
from tasks.vectors import unit_rows

#: Cut-offs, as in `InformationRetrievalEvaluator`'s defaults.
ACCURACY_AT = (1, 3, 5, 10)
PRECISION_RECALL_AT = (1, 3, 5, 10)
NDCG_AT = 10
MRR_AT = 10
MAP_AT = 100
#: How deep each ranking is kept: enough for every metric above.
TOP_K = max(MAP_AT, NDCG_AT, MRR_AT, *ACCURACY_AT, *PRECISION_RECALL_AT)

METRICS: tuple[str, ...] = (
    *(f"accuracy@{k}" for k in ACCURACY_AT),
    *(f"precision@{k}" for k in PRECISION_RECALL_AT),
    *(f"recall@{k}" for k in PRECISION_RECALL_AT),
    f"ndcg@{NDCG_AT}",
    f"mrr@{MRR_AT}",
    f"map@{MAP_AT}",
)
HEADLINE = "ndcg@10"

#: Matryoshka dimensions worth reporting below a model's full width.
MATRYOSHKA_DIMS = (512, 256, 128, 64)


class MetricsError(ValueError):
    """Metrics that are NaN, infinite, empty or missing: an error, never a row in a report."""


@dataclass
class ModelEval:
    """One model's retrieval quality on one query set, at each evaluated dimension."""

    name: str
    model: str
    #: dim -> metric name ("ndcg@10", "mrr@10", "map@100", "accuracy@1", ...) -> value
    metrics: dict[int, dict[str, float]]
    #: dim -> query id -> NDCG@10, for the paired bootstrap
    ndcg_per_query: dict[int, dict[str, float]]
    #: dim -> query id -> 1-based rank of the first relevant document, None if beyond TOP_K
    first_rank: dict[int, dict[str, int | None]]
    query_prompt: str | None = None
    corpus_prompt: str | None = None
    n_queries: int = 0
    n_corpus: int = 0
    #: dim -> query id -> the top TOP_K (corpus id, cosine), best first; kept only when asked
    #: (`keep_hits`), for a re-ranker to read
    hits: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)

    @property
    def dims(self) -> list[int]:
        return sorted(self.metrics, reverse=True)

    def headline(self, metric: str = HEADLINE) -> dict[int, float]:
        return {dim: values[metric] for dim, values in self.metrics.items()}


@dataclass(frozen=True)
class GateDecision:
    """Whether the tuned model may be published, at which dimension, and why."""

    publish: bool
    dim: int
    reason: str
    gain: float
    low: float
    high: float
    base_ndcg: float | None = None
    tuned_ndcg: float | None = None


def ranking_metrics(ranking: Sequence[str], relevant: set[str]) -> dict[str, float]:
    """All metrics for one query from its ranked corpus ids (best first) and its relevant ids.

    Same formulas as `InformationRetrievalEvaluator.compute_metrics`: binary relevance, ideal
    DCG from min(|relevant|, 10) hits, MAP@100 normalised by min(100, |relevant|).
    """
    if not relevant:
        raise MetricsError("A query without relevant documents cannot be scored.")
    hits = [doc in relevant for doc in ranking[:TOP_K]]
    values: dict[str, float] = {}
    for k in ACCURACY_AT:
        values[f"accuracy@{k}"] = float(any(hits[:k]))
    for k in PRECISION_RECALL_AT:
        found = sum(hits[:k])
        values[f"precision@{k}"] = found / k
        values[f"recall@{k}"] = found / len(relevant)
    first = first_relevant_rank(hits)
    values[f"mrr@{MRR_AT}"] = 1.0 / first if first is not None and first <= MRR_AT else 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, hit in enumerate(hits[:NDCG_AT]) if hit)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), NDCG_AT)))
    values[f"ndcg@{NDCG_AT}"] = dcg / ideal
    found, precision_sum = 0, 0.0
    for i, hit in enumerate(hits[:MAP_AT]):
        if hit:
            found += 1
            precision_sum += found / (i + 1)
    values[f"map@{MAP_AT}"] = precision_sum / min(MAP_AT, len(relevant))
    return values


def first_relevant_rank(hits: Sequence[bool]) -> int | None:
    """1-based rank of the first hit, None if there is none in the list."""
    return next((i + 1 for i, hit in enumerate(hits) if hit), None)


def matryoshka_eval_dims(width: int) -> list[int]:
    """The full width, then the usual Matryoshka dimensions below it, largest first."""
    if width <= 0:
        raise ValueError(f"Embedding width must be positive, got {width}.")
    return [width, *(dim for dim in MATRYOSHKA_DIMS if dim < width)]


def evaluate_model(
    model: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    relevant: Mapping[str, set[str]],
    dims: Sequence[int],
    name: str = "model",
    model_ref: str = "",
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    keep_hits: bool = False,
) -> ModelEval:
    """Evaluate a sentence-transformers model at each dimension in `dims` (cosine similarity).

    The corpus and the queries are encoded once, at full width, with the model's own query and
    document prompts unless others are given; each dimension truncates and renormalises. Queries
    without relevant documents are skipped, as the evaluator does.
    """
    query_ids = [qid for qid in queries if relevant.get(qid)]
    if not corpus:
        raise MetricsError(f"Cannot evaluate {name}: the corpus is empty.")
    if not query_ids:
        raise MetricsError(f"Cannot evaluate {name}: no query has a relevant document.")
    width = model.get_embedding_dimension()
    bad = [dim for dim in dims if not 0 < dim <= width]
    if bad or not dims:
        raise ValueError(f"Dimensions {list(dims)} are not within 1..{width}, the width of {name}.")

    from tasks.models import model_prompts

    own_query, own_document = model_prompts(model)
    if query_prompt is None:
        query_prompt = own_query or None
    if corpus_prompt is None:
        corpus_prompt = own_document or None

    query_texts = distinct(queries[qid] for qid in query_ids)
    corpus_texts = distinct(corpus.values())
    total = len(query_texts) + len(corpus_texts)
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], total)

    query_emb = _encode(
        model.encode_query, query_texts, query_prompt, batch_size, advance, f"{name}: queries"
    )
    corpus_emb = _encode(
        model.encode_document, corpus_texts, corpus_prompt, batch_size, advance, f"{name}: corpus"
    )
    result = evaluate_embeddings(
        dict(zip(query_texts, query_emb, strict=True)),
        dict(zip(corpus_texts, corpus_emb, strict=True)),
        corpus,
        {qid: queries[qid] for qid in query_ids},
        relevant,
        dims,
        name=name,
        model_ref=model_ref,
        keep_hits=keep_hits,
    )
    result.query_prompt, result.corpus_prompt = query_prompt, corpus_prompt
    return result


def distinct(texts: Iterable[str]) -> list[str]:
    """Each text once, in first-seen order.

    Identical texts must get identical scores, so that equal documents tie exactly and the tie
    goes to the smaller corpus id on every machine. Encoded in different batch positions, or
    scored in different rows of one matrix product, two copies of a text differ in the last bit
    of float32, and their order would then follow the CPU's kernels instead of the rule.
    """
    return list(dict.fromkeys(texts))


def evaluate_embeddings(
    query_vectors: Mapping[str, np.ndarray],
    corpus_vectors: Mapping[str, np.ndarray],
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    relevant: Mapping[str, set[str]],
    dims: Sequence[int],
    name: str = "model",
    model_ref: str = "",
    keep_hits: bool = False,
) -> ModelEval:
    """Rank and score from full-width vectors keyed by text (each distinct text once).

    Split from `evaluate_model` so the ranking and metric code can be checked on given vectors,
    with no model in the loop.
    """
    query_ids = [qid for qid in queries if relevant.get(qid)]
    corpus_ids = list(corpus)
    texts = list(corpus_vectors)
    column = {text: i for i, text in enumerate(texts)}
    doc_column = np.array([column[corpus[cid]] for cid in corpus_ids], dtype=np.int64)
    query_emb = np.stack([query_vectors[queries[qid]] for qid in query_ids]).astype(np.float32)
    corpus_emb = np.stack([corpus_vectors[text] for text in texts]).astype(np.float32)
    for label, emb in (("query", query_emb), ("corpus", corpus_emb)):
        broken = int((~np.isfinite(emb).all(axis=1)).sum())
        if broken:
            raise MetricsError(
                f"{name} produced {broken} non-finite {label} embeddings (NaN or inf): "
                f"the model's weights are broken, so its metrics would be meaningless."
            )

    # Ties are broken by ascending corpus id, as the evaluator does, so equal scores rank alike.
    id_order = np.empty(len(corpus_ids), dtype=np.int64)
    id_order[np.argsort(np.array(corpus_ids, dtype=object), kind="stable")] = np.arange(
        len(corpus_ids)
    )
    metrics: dict[int, dict[str, float]] = {}
    ndcg_per_query: dict[int, dict[str, float]] = {}
    first_rank: dict[int, dict[str, int | None]] = {}
    hits: dict[int, dict[str, list[tuple[str, float]]]] = {}
    for dim in dims:
        ranked = _rank(
            unit_rows(query_emb[:, :dim]), unit_rows(corpus_emb[:, :dim]), doc_column, id_order
        )
        rankings = {
            qid: [(corpus_ids[i], float(score)) for i, score in zip(*top, strict=True)]
            for qid, top in zip(query_ids, ranked, strict=True)
        }
        metrics[dim], ndcg_per_query[dim], first_rank[dim] = score_rankings(
            {qid: [doc for doc, _ in ranking] for qid, ranking in rankings.items()}, relevant
        )
        if keep_hits:
            hits[dim] = rankings
    result = ModelEval(
        name=name,
        model=model_ref or name,
        metrics=metrics,
        ndcg_per_query=ndcg_per_query,
        first_rank=first_rank,
        n_queries=len(query_ids),
        n_corpus=len(corpus_ids),
        hits=hits,
    )
    check_metrics(result)
    return result


def score_rankings(
    rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]]
) -> tuple[dict[str, float], dict[str, float], dict[str, int | None]]:
    """Mean metrics, per-query NDCG@10 and per-query first relevant rank of ranked corpus ids
    (best first) per query id."""
    per_query = {qid: ranking_metrics(ids, relevant[qid]) for qid, ids in rankings.items()}
    means = {
        metric: float(np.mean([values[metric] for values in per_query.values()]))
        for metric in METRICS
    }
    ndcg = {qid: values[HEADLINE] for qid, values in per_query.items()}
    first = {
        qid: first_relevant_rank([doc in relevant[qid] for doc in ids[:TOP_K]])
        for qid, ids in rankings.items()
    }
    return means, ndcg, first


def _encode(
    encode: Callable[..., np.ndarray],
    texts: list[str],
    prompt: str | None,
    batch_size: int,
    advance: Callable[[int], None],
    label: str,
) -> np.ndarray:
    from tqdm.auto import tqdm

    # Slices of several batches: progress moves, and the model still sorts each slice by length.
    step = batch_size * 8
    parts = []
    with tqdm(total=len(texts), desc=label, unit="text", disable=None) as bar:
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            parts.append(
                encode(
                    chunk,
                    prompt=prompt,
                    batch_size=batch_size,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                ).astype(np.float32, copy=False)
            )
            bar.update(len(chunk))
            advance(len(chunk))
    return np.concatenate(parts)


def _rank(
    queries: np.ndarray, texts: np.ndarray, doc_column: np.ndarray, id_order: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The top TOP_K (corpus indices, scores) per query: score descending, then corpus id
    ascending. Documents are scored through their text's column, so copies tie exactly."""
    k = min(TOP_K, len(doc_column))
    rankings = []
    for start in range(0, len(queries), 256):
        scores = (queries[start : start + 256] @ texts.T)[:, doc_column]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, candidates in zip(scores, top, strict=True):
            # Everything tied with the k-th score competes for the last places, by id.
            pool = np.flatnonzero(row >= row[candidates].min())
            best = pool[np.lexsort((id_order[pool], -row[pool]))][:k]
            rankings.append((best, row[best]))
    return rankings


def check_metrics(evaluation: ModelEval) -> None:
    """Raise MetricsError unless every dimension has every metric as a finite number."""
    if not evaluation.metrics:
        raise MetricsError(f"{evaluation.name} has no metrics at all.")
    for dim, values in evaluation.metrics.items():
        missing = [metric for metric in METRICS if metric not in values]
        if missing:
            raise MetricsError(f"{evaluation.name} at dim {dim} lacks {', '.join(missing)}.")
        broken = [
            m for m, v in values.items() if not isinstance(v, float | int) or not np.isfinite(v)
        ]
        if broken:
            raise MetricsError(
                f"{evaluation.name} at dim {dim} has non-finite {', '.join(broken)} "
                f"({', '.join(f'{m}={values[m]}' for m in broken)})."
            )
        per_query = evaluation.ndcg_per_query.get(dim)
        if not per_query:
            raise MetricsError(f"{evaluation.name} at dim {dim} has no per-query NDCG@10.")
        if not all(np.isfinite(v) for v in per_query.values()):
            raise MetricsError(f"{evaluation.name} at dim {dim} has a non-finite per-query NDCG.")


def paired_bootstrap(
    base: Sequence[float],
    tuned: Sequence[float],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of tuned − base over paired queries, with a percentile bootstrap interval.

    Pairing matters: the same queries are hard for both models, so resampling the per-query
    differences gives a much tighter (and honest) interval than comparing two means.
    """
    base_arr = np.asarray(base, dtype=np.float64)
    tuned_arr = np.asarray(tuned, dtype=np.float64)
    if base_arr.shape != tuned_arr.shape:
        raise ValueError(f"Paired scores differ in length: {len(base_arr)} vs {len(tuned_arr)}.")
    if base_arr.size == 0:
        raise MetricsError("Cannot bootstrap an empty set of queries.")
    diffs = tuned_arr - base_arr
    if not np.isfinite(diffs).all():
        raise MetricsError("Per-query scores contain NaN or inf.")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # Blocks bound the index matrix's memory on large query sets.
    block = max(1, 2_000_000 // diffs.size)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        means[start:stop] = diffs[rng.integers(0, diffs.size, (stop - start, diffs.size))].mean(1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(diffs.mean()), float(low), float(high)


def _paired(base: ModelEval, tuned: ModelEval, dim: int) -> tuple[list[float], list[float]]:
    for evaluation in (base, tuned):
        if dim not in evaluation.ndcg_per_query:
            raise ValueError(
                f"{evaluation.name} was not evaluated at dim {dim} (evaluated: {evaluation.dims})."
            )
    base_q, tuned_q = base.ndcg_per_query[dim], tuned.ndcg_per_query[dim]
    if base_q.keys() != tuned_q.keys():
        raise ValueError(
            f"{base.name} and {tuned.name} were evaluated on different queries "
            f"({len(base_q)} vs {len(tuned_q)}); a paired comparison needs the same ones."
        )
    ids = list(base_q)
    return [base_q[q] for q in ids], [tuned_q[q] for q in ids]


def intervals_by_dim(
    base: ModelEval, tuned: ModelEval, seed: int = 0, confidence: float = 0.95
) -> dict[int, tuple[float, float, float]]:
    """The paired NDCG@10 gain and its interval at every dimension both models share."""
    shared = [dim for dim in tuned.dims if dim in base.ndcg_per_query]
    return {
        dim: paired_bootstrap(*_paired(base, tuned, dim), seed=seed, confidence=confidence)
        for dim in shared
    }


def regressions(
    base: ModelEval, tuned: ModelEval, queries: Mapping[str, str], dim: int, n: int = 10
) -> list[dict]:
    """The `n` queries whose first relevant document fell furthest down the tuned ranking.

    A rank beyond the kept depth counts as TOP_K + 1, so "lost entirely" sorts as the worst.
    """
    base_r, tuned_r = base.first_rank[dim], tuned.first_rank[dim]
    beyond = TOP_K + 1
    rows = []
    for qid in base_r.keys() & tuned_r.keys():
        before = base_r[qid] or beyond
        after = tuned_r[qid] or beyond
        if after > before:
            rows.append(
                {
                    "query_id": qid,
                    "query": queries.get(qid, ""),
                    "base_rank": base_r[qid],
                    "tuned_rank": tuned_r[qid],
                    "drop": after - before,
                }
            )
    rows.sort(key=lambda row: (-row["drop"], row["query_id"]))
    return rows[:n]


def choose_dimension(ndcg_by_dim: Mapping[int, float], tolerance: float = 0.01) -> int:
    """The smallest dimension whose NDCG@10 is within `tolerance` (relative) of the best one.

    Smaller vectors are cheaper to store and search; a relative loss under the tolerance is
    below what the query set can resolve anyway.
    """
    if not ndcg_by_dim:
        raise MetricsError("No dimensions to choose from.")
    if any(not np.isfinite(v) for v in ndcg_by_dim.values()):
        raise MetricsError(f"Non-finite NDCG@10 among {dict(ndcg_by_dim)}.")
    best = max(ndcg_by_dim.values())
    floor = best * (1.0 - tolerance)
    return min(dim for dim, value in ndcg_by_dim.items() if value >= floor)


def gate(
    base: ModelEval,
    tuned: ModelEval,
    tolerance: float = 0.01,
    margin: float | None = None,
    seed: int = 0,
) -> GateDecision:
    """Decide whether the tuned model is published, at its chosen dimension.

    Without a margin the gain must be clearly positive: the lower end of the 95% paired
    bootstrap interval above zero. With a margin the mean gain must reach it (a team that has
    measured its own noise can ask for a fixed improvement instead).
    """
    check_metrics(base)
    check_metrics(tuned)
    tuned_ndcg = tuned.headline()
    dim = choose_dimension(tuned_ndcg, tolerance)
    best_dim = max(tuned_ndcg, key=lambda d: (tuned_ndcg[d], d))
    base_scores, tuned_scores = _paired(base, tuned, dim)
    gain, low, high = paired_bootstrap(base_scores, tuned_scores, seed=seed)
    base_at, tuned_at = base.metrics[dim][HEADLINE], tuned_ndcg[dim]
    n = len(base_scores)

    where = (
        f"dim {dim} is the tuned model's best"
        if dim == best_dim
        else f"dim {dim} is the smallest within {tolerance:.0%} of the tuned model's best "
        f"NDCG@10 ({tuned_ndcg[best_dim]:.4f} at dim {best_dim})"
    )
    numbers = (
        f"at dim {dim}, tuned NDCG@10 {tuned_at:.4f} vs base {base_at:.4f}, gain {gain:+.4f} "
        f"with a 95% paired bootstrap interval of [{low:+.4f}, {high:+.4f}] over {n} queries"
    )
    if margin is None:
        publish = low > 0
        if publish:
            verdict = "the whole interval is above zero"
        elif high < 0:
            verdict = "the tuned model is worse than the base: the whole interval is below zero"
        elif gain <= 0:
            verdict = "the tuned model is not better than the base and the interval includes zero"
        else:
            verdict = "the interval includes zero, so the gain is not distinguishable from noise"
    else:
        publish = gain >= margin
        verdict = (
            f"the gain reaches the required margin of {margin:+.4f}"
            if publish
            else f"the gain is below the required margin of {margin:+.4f}"
        )
    action = "Publish" if publish else "Do not publish"
    reason = f"{action}: {numbers}; {verdict} ({where})."
    return GateDecision(
        publish=publish,
        dim=dim,
        reason=reason,
        gain=gain,
        low=low,
        high=high,
        base_ndcg=base_at,
        tuned_ndcg=tuned_at,
    )
