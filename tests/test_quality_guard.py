"""The quality benchmark's split guard: labelled claims shown as few-shot examples are never
evaluated, at most 8 are shown, and no evaluated claim becomes a training question."""

from __future__ import annotations

import re
import shutil

import pytest

from tasks.questions.curation import LeakageError
from tasks.questions.fewshot import (
    MAX_EXAMPLES,
    check_held_out,
    check_training,
    choose_examples,
    held_out,
    labelled_split,
)
from tasks.questions.writers import make_generator
from tasks.retrieval.beir import load_beir
from tests.conftest import FIXTURES

BEIR_TINY = FIXTURES / "beir-tiny"


@pytest.mark.parametrize("seed", range(10))
def test_a_claim_used_as_an_example_never_appears_in_the_evaluated_queries(seed):
    _, all_queries, _ = load_beir(BEIR_TINY, "test")

    split = labelled_split(BEIR_TINY, "test", k=MAX_EXAMPLES, seed=seed)

    assert len(split.example_ids) == MAX_EXAMPLES
    assert not set(split.example_ids) & set(split.queries)
    assert not set(split.examples) & set(split.queries.values())
    assert split.examples == [all_queries[qid] for qid in split.example_ids]
    # Everything else is evaluated, with its own judgements and nothing more.
    assert set(split.queries) == set(all_queries) - set(split.example_ids)
    assert set(split.relevant) == set(split.queries)


def test_example_pairs_pair_each_shown_claim_with_a_passage_judged_relevant_to_it():
    corpus, _, relevant = load_beir(BEIR_TINY, "test")

    split = labelled_split(BEIR_TINY, "test", k=4, seed=3)

    assert [claim for _, claim in split.example_pairs] == split.examples
    for (passage, _), qid in zip(split.example_pairs, split.example_ids, strict=True):
        assert passage in {corpus[doc] for doc in relevant[qid]}


def test_the_choice_is_reproducible_and_follows_the_seed():
    _, queries, _ = load_beir(BEIR_TINY, "test")

    assert choose_examples(queries, 8, seed=1) == choose_examples(queries, 8, seed=1)
    assert choose_examples(queries, 8, seed=1) != choose_examples(queries, 8, seed=2)


def test_the_same_claim_text_under_another_id_is_held_out_too():
    queries = {
        "a": "Vitamin D lowers the risk of fractures.",
        "b": "vitamin d lowers the risk of fractures",
        "c": "Aspirin prevents migraines.",
    }
    relevant = {"a": {"d1"}, "b": {"d2"}, "c": {"d3"}}

    kept, judged = held_out(queries, relevant, ["a"])

    assert kept == {"c": "Aspirin prevents migraines."}
    assert judged == {"c": {"d3"}}


def test_more_than_eight_examples_are_refused():
    _, queries, _ = load_beir(BEIR_TINY, "test")

    with pytest.raises(ValueError, match="between 0 and 8"):
        choose_examples(queries, 9)
    with pytest.raises(LeakageError, match="at most 8"):
        check_held_out([f"claim {n}" for n in range(9)], {})


def test_an_example_among_the_evaluated_queries_is_a_leak_named_by_its_id():
    evaluated = {"q7": "Smoking causes lung cancer.", "q8": "Tea contains caffeine."}

    with pytest.raises(LeakageError, match=r"'q7'.*few-shot example"):
        check_held_out(["smoking causes lung cancer"], evaluated)
    check_held_out(["Coffee contains caffeine."], evaluated)


def test_a_training_question_equal_to_an_evaluated_claim_is_a_leak():
    claims = ["Smoking causes lung cancer.", "Tea contains caffeine."]

    with pytest.raises(LeakageError, match="Tea contains caffeine"):
        check_training(["Does smoking cause cancer?", "TEA contains caffeine!"], claims)
    check_training(["Does smoking cause cancer?", "Which drinks contain caffeine?"], claims)


def test_the_generator_is_shown_only_example_claims(tmp_path):
    """The local generator's prompt carries example claims, never an evaluated one."""
    folder = tmp_path / "beir"
    shutil.copytree(BEIR_TINY, folder)
    split = labelled_split(folder, "test", k=4, seed=3)
    generator = make_generator("local", example_queries=split.examples, seed=3)
    _, all_queries, _ = load_beir(folder, "test")

    for passage in load_beir(folder, "test")[0].values():
        shown = set(re.findall(r"^Question: (.+)$", generator.prompt(passage), re.M))
        claims_shown = shown & set(all_queries.values())
        assert claims_shown, "the style block shows the example claims"
        assert claims_shown <= set(split.examples)
        assert not claims_shown & set(split.queries.values())


def test_an_unknown_example_id_is_a_clear_error():
    with pytest.raises(KeyError, match="q99"):
        held_out({"q1": "A claim."}, {"q1": {"d1"}}, ["q99"])
