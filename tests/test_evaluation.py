"""Retrieval metrics, bootstrap intervals, the dimension choice, the gate and the report.

The metric math is checked on explicit rankings computed by hand, and the ranking and metric code
against sentence-transformers' own InformationRetrievalEvaluator on the same real MiniLM vectors.
Better and worse "models" are real evaluations: MiniLM with and without a poisoned query prompt,
an off-topic prefix longer than the model's 256-token window, so the question never reaches the
model and retrieval is ruined, not nudged. Every assertion on a real model's scores holds with a
margin that float32 kernels on another CPU (cosines move by ~3e-7) cannot cross.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from tasks.retrieval.beir import load_beir
from tasks.retrieval.evaluation import (
    METRICS,
    MetricsError,
    ModelEval,
    check_metrics,
    choose_dimension,
    distinct,
    evaluate_embeddings,
    evaluate_model,
    gate,
    intervals_by_dim,
    matryoshka_eval_dims,
    paired_bootstrap,
    ranking_metrics,
    regressions,
)
from tasks.retrieval.report import CARD_HEADING, card_section, update_model_card, write_report
from tests.conftest import FIXTURES

SOUP = "The recipe for tomato soup needs ripe tomatoes, garlic, olive oil, basil and salt. "
POISON = SOUP * 20
#: A prefix that distracts without drowning the question: dims then score differently.
DISTRACTION = SOUP * 3
DIMS = [384, 256, 128, 64]


@pytest.fixture(scope="module")
def beir_tiny():
    return load_beir(FIXTURES / "beir-tiny")


@pytest.fixture(scope="module")
def plain(minilm, beir_tiny):
    return evaluate_model(minilm, *beir_tiny, DIMS, name="plain", model_ref="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def poisoned(minilm, beir_tiny):
    return evaluate_model(minilm, *beir_tiny, DIMS, name="poisoned", query_prompt=POISON)


# Metric math on explicit rankings


def test_metrics_of_two_relevant_documents_at_ranks_one_and_three():
    values = ranking_metrics(["a", "x", "b", "y"], {"a", "b"})

    assert values["accuracy@1"] == 1.0
    assert values["precision@1"] == 1.0
    assert values["precision@3"] == pytest.approx(2 / 3)
    assert values["precision@5"] == pytest.approx(2 / 5)
    assert values["recall@1"] == 0.5
    assert values["recall@3"] == 1.0
    assert values["mrr@10"] == 1.0
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3).
    assert values["ndcg@10"] == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # Average precision = (1/1 + 2/3) / 2.
    assert values["map@100"] == pytest.approx((1 + 2 / 3) / 2)


def test_metrics_of_one_relevant_document_at_rank_three():
    values = ranking_metrics(["x", "y", "a", "z"], {"a"})

    assert values["accuracy@1"] == 0.0
    assert values["accuracy@3"] == 1.0
    assert values["recall@1"] == 0.0
    assert values["recall@5"] == 1.0
    assert values["precision@10"] == pytest.approx(0.1)
    assert values["mrr@10"] == pytest.approx(1 / 3)
    assert values["ndcg@10"] == pytest.approx(0.5)  # 1/log2(4)
    assert values["map@100"] == pytest.approx(1 / 3)


def test_a_relevant_document_below_the_cutoffs_scores_only_in_map():
    ranking = [f"x{i}" for i in range(11)] + ["a"]

    values = ranking_metrics(ranking, {"a"})

    assert values["ndcg@10"] == values["mrr@10"] == values["accuracy@10"] == 0.0
    assert values["map@100"] == pytest.approx(1 / 12)


def test_a_query_without_relevant_documents_is_an_error():
    with pytest.raises(MetricsError):
        ranking_metrics(["a"], set())


# The whole evaluation, on a real model


class GivenVectorsEvaluator(InformationRetrievalEvaluator):
    """The evaluator, fed vectors computed beforehand instead of encoding with a model."""

    def __init__(self, query_vectors, corpus_vectors, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vectors = {"query": query_vectors, "document": corpus_vectors}

    def embed_inputs(self, model, sentences, encode_fn_name=None, **kwargs):
        table = self.vectors[encode_fn_name]
        return torch.tensor(np.stack([table[text] for text in sentences]))[:, : self.truncate_dim]


def smallest_score_gap(query_vectors, corpus_vectors, dim):
    def unit(vectors):
        matrix = np.stack(list(vectors.values()))[:, :dim]
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    scores = -np.sort(-(unit(query_vectors) @ unit(corpus_vectors).T), axis=1)
    return float(np.diff(-scores, axis=1).min())


def test_metrics_equal_information_retrieval_evaluator_at_every_dim(minilm, beir_tiny):
    """Both rank the same vectors, so only the ranking and metric code is compared."""
    corpus, queries, relevant = beir_tiny
    query_texts, corpus_texts = distinct(queries.values()), distinct(corpus.values())
    query_emb = minilm.encode_query(query_texts, prompt=DISTRACTION)
    query_vectors = dict(zip(query_texts, query_emb, strict=True))
    corpus_vectors = dict(zip(corpus_texts, minilm.encode_document(corpus_texts), strict=True))
    # The evaluator breaks a tie by corpus id only when two scores are bit-equal; the fixture's
    # two copies of one text are left out here (test_equal_scores_rank_by_corpus_id has them).
    corpus = {cid: text for cid, text in corpus.items() if cid != "d26"}
    relevant = {qid: {"d01" if d == "d26" else d for d in docs} for qid, docs in relevant.items()}

    ours = evaluate_embeddings(query_vectors, corpus_vectors, corpus, queries, relevant, DIMS)

    for dim in DIMS:
        # Numpy and torch compute cosines ~3e-7 apart: no two documents may be that close.
        assert smallest_score_gap(query_vectors, corpus_vectors, dim) > 3e-6
        evaluator = GivenVectorsEvaluator(
            query_vectors, corpus_vectors, queries, corpus, relevant, truncate_dim=dim
        )
        theirs = evaluator(minilm)
        for metric in METRICS:
            assert ours.metrics[dim][metric] == pytest.approx(
                theirs[f"cosine_{metric}"], abs=1e-9
            ), (dim, metric)
        # The per-query values the bootstrap uses average to the reported metric.
        assert np.mean(list(ours.ndcg_per_query[dim].values())) == pytest.approx(
            ours.metrics[dim]["ndcg@10"]
        )
    assert ours.metrics[384] != ours.metrics[64]


def test_results_do_not_depend_on_the_encode_batch_size(minilm, beir_tiny, plain):
    """Batches of 1 and 7 pad differently from 64, which moves vectors in the last bits only."""
    for batch_size in (1, 7):
        again = evaluate_model(minilm, *beir_tiny, DIMS, name="plain", batch_size=batch_size)
        assert again.first_rank == plain.first_rank
        for dim in DIMS:
            assert again.metrics[dim] == pytest.approx(plain.metrics[dim], abs=1e-12)


def test_equal_scores_rank_by_corpus_id(plain):
    """d01 and d26 hold the same text; q01's judged document is d26, so d01 ranks first, at
    every dimension and on every CPU: a text is encoded and scored once, so copies tie exactly."""
    for dim in DIMS:
        assert plain.first_rank[dim]["q01"] == 2
        assert plain.ndcg_per_query[dim]["q01"] == pytest.approx(1 / math.log2(3))


def test_model_prompts_are_used_when_none_is_given(minilm, beir_tiny, poisoned):
    saved = minilm.prompts
    minilm.prompts = {"query": POISON, "document": ""}
    try:
        from_model = evaluate_model(minilm, *beir_tiny, DIMS)
    finally:
        minilm.prompts = saved

    assert from_model.query_prompt == POISON
    assert from_model.corpus_prompt is None
    assert from_model.metrics == poisoned.metrics


def test_progress_reaches_every_text(minilm, beir_tiny):
    corpus, queries, relevant = beir_tiny
    calls = []

    evaluate_model(minilm, corpus, queries, relevant, [64], progress=lambda d, t: calls.append(d))

    # Each distinct text is encoded once: d01 and d26 are one text.
    assert calls[-1] == len(set(corpus.values())) + len(queries) == len(corpus) - 1 + len(queries)


def test_nan_embeddings_from_a_broken_model_are_an_error(minilm, beir_tiny):
    broken = copy.deepcopy(minilm)
    with torch.no_grad():
        broken[0].auto_model.embeddings.word_embeddings.weight.fill_(float("nan"))

    with pytest.raises(MetricsError, match="non-finite query embeddings"):
        evaluate_model(broken, *beir_tiny, [64], name="broken")


def test_empty_corpus_and_unjudged_queries_are_errors(minilm):
    with pytest.raises(MetricsError, match="corpus is empty"):
        evaluate_model(minilm, {}, {"q": "a question"}, {"q": {"d"}}, [64])
    with pytest.raises(MetricsError, match="no query has a relevant document"):
        evaluate_model(minilm, {"d": "a document"}, {"q": "a question"}, {}, [64])


def test_dims_wider_than_the_model_are_rejected(minilm, beir_tiny):
    with pytest.raises(ValueError, match=r"within 1\.\.384"):
        evaluate_model(minilm, *beir_tiny, [768])


def test_matryoshka_dims_go_from_full_width_down_to_64():
    assert matryoshka_eval_dims(768) == [768, 512, 256, 128, 64]
    assert matryoshka_eval_dims(384) == [384, 256, 128, 64]
    assert matryoshka_eval_dims(1024) == [1024, 512, 256, 128, 64]
    with pytest.raises(ValueError):
        matryoshka_eval_dims(0)


# Bootstrap, dimension choice, gate


def test_bootstrap_interval_contains_the_observed_difference_and_narrows_with_more_queries():
    rng = np.random.default_rng(1)

    def interval(n: int) -> tuple[float, float, float]:
        base = rng.uniform(0, 1, n)
        tuned = np.clip(base + rng.normal(0.05, 0.2, n), 0, 1)
        return paired_bootstrap(base, tuned)

    few_mean, few_low, few_high = interval(30)
    many_mean, many_low, many_high = interval(3000)

    assert few_low <= few_mean <= few_high
    assert many_low <= many_mean <= many_high
    assert many_high - many_low < (few_high - few_low) / 5
    assert many_low > 0  # a real +0.05 shift is resolved with 3,000 queries


def test_bootstrap_of_identical_scores_is_exactly_zero():
    assert paired_bootstrap([0.2, 0.5, 1.0], [0.2, 0.5, 1.0]) == (0.0, 0.0, 0.0)


def test_bootstrap_rejects_unpaired_and_empty_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(MetricsError):
        paired_bootstrap([], [])
    with pytest.raises(MetricsError):
        paired_bootstrap([0.1, math.nan], [0.1, 0.2])


def test_choose_dimension_picks_the_smallest_within_tolerance():
    ndcg = {768: 0.800, 512: 0.797, 256: 0.793, 128: 0.700, 64: 0.650}

    assert choose_dimension(ndcg, tolerance=0.01) == 256  # 0.793 >= 0.792
    assert choose_dimension(ndcg, tolerance=0.005) == 512
    assert choose_dimension(ndcg, tolerance=0.0) == 768
    # The best need not be the widest.
    assert choose_dimension({384: 0.70, 256: 0.72, 64: 0.60}) == 256


def test_choose_dimension_rejects_nan():
    with pytest.raises(MetricsError):
        choose_dimension({384: math.nan, 64: 0.5})


def test_the_poisoned_prompt_ruins_retrieval_by_a_wide_margin(plain, poisoned):
    """What the gate tests below rely on: a gap no CPU's float32 rounding can close."""
    for dim in DIMS:
        assert plain.metrics[dim]["ndcg@10"] > 0.9
        assert poisoned.metrics[dim]["ndcg@10"] < 0.4


def test_a_worse_tuned_model_is_not_published_and_the_reason_says_why(plain, poisoned):
    decision = gate(base=plain, tuned=poisoned)

    assert not decision.publish
    assert decision.high < 0
    assert decision.dim in DIMS
    assert "worse than the base" in decision.reason
    assert f"dim {decision.dim}" in decision.reason
    assert f"{decision.low:+.4f}" in decision.reason


def test_a_better_tuned_model_is_published_at_the_smallest_good_dim(plain, poisoned):
    decision = gate(base=poisoned, tuned=plain)

    assert decision.publish
    assert decision.low > 0
    # Which dimension is the smallest within 1% of the best is a near-tie on this easy set (1.0
    # or 0.98 at each), so the test asks for the rule, not for one CPU's answer.
    assert decision.dim == choose_dimension(plain.headline())
    assert decision.reason.startswith("Publish")
    assert decision.gain == pytest.approx(
        plain.metrics[64]["ndcg@10"] - poisoned.metrics[64]["ndcg@10"]
    )


def test_a_margin_replaces_the_interval_test(plain, poisoned):
    gain = gate(base=poisoned, tuned=plain).gain

    assert gate(base=poisoned, tuned=plain, margin=gain - 0.01).publish
    blocked = gate(base=poisoned, tuned=plain, margin=gain + 0.01)
    assert not blocked.publish
    assert "below the required margin" in blocked.reason


def test_identical_models_are_not_published(plain):
    decision = gate(plain, plain)

    assert not decision.publish
    assert (decision.gain, decision.low, decision.high) == (0.0, 0.0, 0.0)
    assert "interval" in decision.reason


def test_regressions_list_the_queries_that_fell_furthest(plain, poisoned, beir_tiny):
    _, queries, _ = beir_tiny

    worse = regressions(plain, poisoned, queries, dim=64, n=3)

    assert 0 < len(worse) <= 3
    drops = [row["drop"] for row in worse]
    assert drops == sorted(drops, reverse=True)
    for row in worse:
        assert row["query"] == queries[row["query_id"]]
        assert (row["tuned_rank"] or 101) > row["base_rank"]
    assert regressions(poisoned, poisoned, queries, dim=64) == []


def test_a_document_lost_from_the_top_100_counts_as_the_worst_drop():
    def fake(ranks):
        return ModelEval("m", "m", {}, {}, {64: ranks})

    base = fake({"a": 1, "b": 1})
    tuned = fake({"a": None, "b": 50})

    worse = regressions(base, tuned, {"a": "qa", "b": "qb"}, dim=64)

    assert [row["query_id"] for row in worse] == ["a", "b"]
    assert worse[0]["tuned_rank"] is None


# NaN never reaches a report


def _with_nan(evaluation: ModelEval) -> ModelEval:
    broken = copy.deepcopy(evaluation)
    broken.metrics[64]["mrr@10"] = math.nan
    return broken


def test_nan_metrics_are_an_error_everywhere(plain, tmp_path):
    broken = _with_nan(plain)

    with pytest.raises(MetricsError, match="dim 64 has non-finite mrr@10"):
        check_metrics(broken)
    with pytest.raises(MetricsError):
        gate(plain, broken)
    with pytest.raises(MetricsError):
        write_report(tmp_path / "r", [plain, broken], None, {}, [], "t")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_missing_metrics_are_an_error(plain):
    partial = copy.deepcopy(plain)
    del partial.metrics[128]["map@100"]

    with pytest.raises(MetricsError, match="lacks map@100"):
        check_metrics(partial)
    with pytest.raises(MetricsError, match="no metrics"):
        check_metrics(ModelEval("empty", "m", {}, {}, {}))


# The report and the model card


def test_report_files_hold_the_numbers_and_the_decision(plain, poisoned, beir_tiny, tmp_path):
    decision = gate(base=plain, tuned=poisoned)
    intervals = intervals_by_dim(plain, poisoned)
    worse = regressions(plain, poisoned, beir_tiny[1], decision.dim)

    paths = write_report(tmp_path / "run", [plain, poisoned], decision, intervals, worse, "Tiny")

    data = json.loads(paths["metrics"].read_text())
    assert [m["name"] for m in data["models"]] == ["plain", "poisoned"]
    assert data["models"][1]["metrics"]["128"]["ndcg@10"] == poisoned.metrics[128]["ndcg@10"]
    assert data["decision"]["publish"] is False
    assert set(data["intervals"]) == {str(d) for d in DIMS}
    assert data["regressions"] == worse
    report = paths["report"].read_text()
    assert decision.reason in report
    assert "![NDCG@10 by dimension](ndcg_by_dim.png)" in report
    assert f"{poisoned.metrics[256]['ndcg@10']:.4f}" in report
    assert worse[0]["query"] in report
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_section_is_replaced_not_repeated(plain, poisoned, tmp_path):
    (tmp_path / "README.md").write_text("# My model\n\nIntro.\n\n## Training\n\nDetails.\n")
    (tmp_path / "ragtune.json").write_text(json.dumps({"recipe": "matryoshka-mnrl"}))
    decision = gate(plain, poisoned)
    section = card_section([plain, poisoned], decision, intervals_by_dim(plain, poisoned))

    update_model_card(tmp_path, section, {"dim": 1})
    update_model_card(tmp_path, section, {"dim": decision.dim})

    readme = (tmp_path / "README.md").read_text()
    assert readme.count(CARD_HEADING) == 1
    assert readme.startswith("# My model") and "## Training\n\nDetails." in readme
    assert f"{poisoned.metrics[64]['ndcg@10']:.4f}" in readme
    meta = json.loads((tmp_path / "ragtune.json").read_text())
    assert meta == {"recipe": "matryoshka-mnrl", "evaluation": {"dim": decision.dim}}
