"""Cleaning, filtering, round trip and split of generated questions."""

from __future__ import annotations

import pytest

from tasks.questions.curation import (
    LeakageError,
    Question,
    assert_no_leakage,
    clean_question,
    filter_questions,
    round_trip_filter,
    sample_chunks,
    split_questions,
    summarise,
)

PASSAGES = {
    "photo": (
        "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant "
        "cells, chlorophyll absorbs sunlight, and the plant uses that energy to turn carbon "
        "dioxide and water into glucose, releasing oxygen as a by-product."
    ),
    "volcano": (
        "A volcano erupts when magma from the Earth's mantle rises through cracks in the crust. "
        "Pressure from dissolved gases drives lava, ash and volcanic bombs out of the vent, and "
        "pyroclastic flows can race down the slopes at hundreds of kilometres per hour."
    ),
    "tcp": (
        "TCP congestion control keeps senders from overwhelming the network. Slow start doubles "
        "the congestion window every round trip until packet loss is detected, after which the "
        "sender halves its window and grows it linearly again."
    ),
    "coffee": (
        "Espresso is brewed by forcing hot water at about nine bars of pressure through finely "
        "ground coffee. A good shot takes 25 to 30 seconds and is topped by crema, a foam of "
        "emulsified oils and carbon dioxide."
    ),
    "revolution": (
        "The French Revolution began in 1789 with the storming of the Bastille. It abolished the "
        "monarchy, proclaimed the First Republic in 1792 and ended with Napoleon Bonaparte's "
        "coup of 18 Brumaire in 1799."
    ),
    "bitcoin": (
        "Bitcoin miners compete to find a nonce whose block hash falls below the network target. "
        "The winner appends the block to the blockchain and earns the block subsidy plus the "
        "transaction fees of the transactions it includes."
    ),
}


def q(text: str, chunk_id: str = "photo") -> Question:
    return Question(question=text, chunk_id=chunk_id, generator="test")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("1. What is photosynthesis?", "What is photosynthesis?"),
        ("  12) What is photosynthesis?  ", "What is photosynthesis?"),
        ("Q1: What is photosynthesis?", "What is photosynthesis?"),
        ("Question: What is photosynthesis?", "What is photosynthesis?"),
        ("**Question 2:** What is photosynthesis?", "What is photosynthesis?"),
        ("- What is photosynthesis?", "What is photosynthesis?"),
        ("* What is photosynthesis?", "What is photosynthesis?"),
        ("• What is photosynthesis?", "What is photosynthesis?"),
        ('"What is photosynthesis?"', "What is photosynthesis?"),
        ("3. “What is photosynthesis?”", "What is photosynthesis?"),
        ("- Q: 'What   is\nphotosynthesis?'", "What is photosynthesis?"),
        ("b) What is photosynthesis?", "What is photosynthesis?"),
        ("(c) What is photosynthesis?", "What is photosynthesis?"),
        # numbers that are part of the question stay
        ("3.5 million people live where?", "3.5 million people live where?"),
        ("Why did 1789 matter?", "Why did 1789 matter?"),
    ],
)
def test_clean_question_strips_numbering_bullets_labels_and_quotes(raw, clean):
    assert clean_question(raw) == clean


def test_length_and_form_filters_give_their_reason():
    questions = [
        q("   "),
        q("Why light?"),
        q("What " + "very " * 80 + "long question is this?"),
        q("Photosynthesis is how plants make sugar."),
        q("Explain the role of chlorophyll in plants"),
        q("What pigment absorbs sunlight in chloroplasts?"),
    ]
    filter_questions(questions, PASSAGES)
    assert [x.reject_reason for x in questions] == [
        "empty",
        "too_short",
        "too_long",
        "not_a_question",
        "not_a_question",
        None,
    ]
    assert [x.kept for x in questions] == [False] * 5 + [True]


def test_statements_are_kept_when_users_search_with_statements():
    claims = [
        q("Chlorophyll absorbs mostly green light."),
        q("Plants make sugar from sunlight and water"),
        q("Why light?"),
    ]

    filter_questions(claims, PASSAGES, questions_only=False)

    assert [x.reject_reason for x in claims] == [None, None, "too_short"]


def test_a_question_copying_a_long_run_of_its_passage_is_rejected():
    copied = "Does the plant use that energy to turn carbon dioxide and water into glucose?"
    short_overlap = "Which gas does the plant release as a by-product?"
    questions = [q(copied), q(short_overlap)]
    filter_questions(questions, PASSAGES, max_copied_words=8)
    assert questions[0].reject_reason == "copies_passage"
    assert questions[1].kept
    # the same words copied from *another* chunk's passage are fine: the rule is about its own
    other = [q(copied, chunk_id="volcano")]
    filter_questions(other, PASSAGES)
    assert other[0].kept


def test_exact_duplicates_are_removed_across_chunks_first_occurrence_wins():
    questions = [
        q("What does chlorophyll absorb?", "photo"),
        q("what does CHLOROPHYLL absorb ?", "volcano"),
        q("What does chlorophyll absorb?", "photo"),
    ]
    filter_questions(questions, PASSAGES)
    assert [x.reject_reason for x in questions] == [None, "duplicate", "duplicate"]


def test_near_duplicates_are_removed_but_different_questions_stay():
    questions = [
        q("What does chlorophyll absorb in the chloroplasts of plant cells?"),
        q("What does chlorophyll absorb in the chloroplasts of green plant cells?"),
        q("Which gas is released as a by-product of photosynthesis?"),
        q("What do chloroplasts contain that absorbs sunlight?"),
    ]
    filter_questions(questions, PASSAGES, near_dup_threshold=0.85)
    assert [x.reject_reason for x in questions] == [None, "near_duplicate", None, None]
    # a stricter threshold keeps the paraphrase
    again = [
        q("What does chlorophyll absorb in the chloroplasts of plant cells?"),
        q("What does chlorophyll absorb in the chloroplasts of green plant cells?"),
    ]
    filter_questions(again, PASSAGES, near_dup_threshold=0.99)
    assert all(x.kept for x in again)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
def test_near_duplicate_detection_matches_all_pairs_comparison(threshold):
    """The prefix-filtered join must find exactly what comparing every pair finds."""
    import random

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(25)]
    word_lists = [rng.sample(vocab, rng.randint(3, 9)) for _ in range(200)]
    for _ in range(200):  # paraphrase-like variants: one word added or dropped
        words = list(rng.choice(word_lists))
        if rng.random() < 0.5 and len(words) > 3:
            words.pop(rng.randrange(len(words)))
        else:
            words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
        word_lists.append(words)
    questions = [q(" ".join(words) + "?") for words in word_lists]
    filter_questions(questions, PASSAGES, min_chars=1, near_dup_threshold=threshold)

    kept: list[frozenset[str]] = []
    expected = []
    for text in (x.question for x in questions):
        words = frozenset(text.rstrip("?").split())
        if any(len(words & k) / len(words | k) >= threshold for k in kept):
            expected.append(False)
        else:
            expected.append(True)
            kept.append(words)
    assert [x.kept for x in questions] == expected
    assert 0 < sum(expected) < len(expected)


def test_rejected_questions_are_not_counted_as_earlier_occurrences():
    first = q("What does chlorophyll absorb?")
    first.reject("copies_passage")
    second = q("What does chlorophyll absorb?")
    filter_questions([first, second], PASSAGES)
    assert first.reject_reason == "copies_passage"
    assert second.kept


def test_filter_names_a_chunk_it_does_not_know():
    with pytest.raises(KeyError, match="nope"):
        filter_questions([q("What does chlorophyll absorb?", "nope")], PASSAGES)


def test_round_trip_drops_questions_their_own_chunk_does_not_answer(minilm):
    ids, texts = list(PASSAGES), list(PASSAGES.values())
    questions = [
        q("How do plants turn sunlight into glucose?", "photo"),
        q("What drives lava and ash out of a volcanic vent?", "volcano"),
        q("How does slow start grow the congestion window?", "tcp"),
        # off-topic for the chunk it claims to come from
        q("How long should an espresso shot take to brew?", "revolution"),
        q("When was the Bastille stormed?", "bitcoin"),
    ]
    round_trip_filter(questions, ids, texts, minilm, top_k=1)
    assert [x.reject_reason for x in questions] == [None, None, None, "round_trip", "round_trip"]
    # with every chunk inside top_k nothing can fail, and nothing needs embedding
    again = [q("How long should an espresso shot take to brew?", "revolution")]
    round_trip_filter(again, ids, texts, minilm, top_k=len(ids))
    assert again[0].kept


def test_round_trip_ignores_already_rejected_questions_and_checks_ids(minilm):
    ids, texts = list(PASSAGES), list(PASSAGES.values())
    rejected = q("When was the Bastille stormed?", "bitcoin")
    rejected.reject("too_short")
    round_trip_filter([rejected], ids, texts, minilm, top_k=1)
    assert rejected.reject_reason == "too_short"
    with pytest.raises(KeyError, match="missing"):
        round_trip_filter([q("What is this about?", "missing")], ids, texts, minilm, top_k=1)


def many_questions() -> list[Question]:
    return [q(f"Question {i} about chunk {c}?", f"c{c}") for c in range(20) for i in range(3)]


def test_split_never_shares_a_chunk_and_is_reproducible():
    first = split_questions(many_questions(), test_size=0.25, seed=3)
    sides: dict[str, set[str]] = {}
    for x in first:
        sides.setdefault(x.chunk_id, set()).add(x.split)
    assert all(len(s) == 1 for s in sides.values())
    test = [x for x in first if x.split == "test"]
    assert len(test) == 15  # 5 whole chunks of 3 questions: a quarter of 60
    again = split_questions(many_questions(), test_size=0.25, seed=3)
    assert [x.split for x in again] == [x.split for x in first]
    other_seed = split_questions(many_questions(), test_size=0.25, seed=4)
    assert [x.split for x in other_seed] != [x.split for x in first]


def test_split_is_stable_when_new_chunks_arrive():
    """A nightly refresh adds chunks; questions already split must stay on their side."""
    before = {x.question: x.split for x in split_questions(many_questions()[:30], seed=1)}
    grown = many_questions() + [q(f"Extra {i}?", f"new{i}") for i in range(5)]
    after = {x.question: x.split for x in split_questions(grown, seed=1)}
    moved = [text for text, side in before.items() if after[text] != side]
    assert len(moved) <= 3  # at most the one boundary chunk moves


def test_split_by_document_keeps_each_document_on_one_side():
    questions = many_questions()
    doc_of = {f"c{c}": f"doc{c % 4}" for c in range(20)}
    split_questions(questions, test_size=0.25, seed=0, by="document", doc_of=doc_of)
    sides: dict[str, set[str]] = {}
    for x in questions:
        sides.setdefault(doc_of[x.chunk_id], set()).add(x.split)
    assert all(len(s) == 1 for s in sides.values())
    assert {x.split for x in questions} == {"train", "test"}


def test_split_leaves_rejected_questions_out_and_refuses_impossible_splits():
    questions = many_questions()
    questions[0].reject("duplicate")
    split_questions(questions, seed=0)
    assert questions[0].split == ""
    assert {x.split for x in questions[1:]} == {"train", "test"}
    one_chunk = [q("What is it?", "c0"), q("Why is it?", "c0")]
    with pytest.raises(ValueError, match="one chunk"):
        split_questions(one_chunk)
    with pytest.raises(ValueError, match="doc_of"):
        split_questions(many_questions(), by="document")
    with pytest.raises(ValueError, match="test_size"):
        split_questions(many_questions(), test_size=1.0)


def test_assert_no_leakage_names_the_leaking_chunk_and_document():
    questions = [q("A?", "c1"), q("B?", "c1"), q("C?", "c2")]
    questions[0].split, questions[1].split, questions[2].split = "train", "test", "train"
    with pytest.raises(LeakageError, match="'c1'"):
        assert_no_leakage(questions)
    questions[1].split = "train"
    questions[2].split = "test"
    assert_no_leakage(questions)
    with pytest.raises(LeakageError, match="document 'same-doc'"):
        assert_no_leakage(questions, by="document", doc_of={"c1": "same-doc", "c2": "same-doc"})


def test_summarise_counts_every_fate():
    questions = many_questions()[:6]
    questions[0].reject("duplicate")
    questions[1].reject("round_trip")
    questions[2].reject("round_trip")
    for x, side in zip(questions[3:], ["train", "train", "test"], strict=True):
        x.split = side
    summary = summarise(questions)
    assert summary.generated == 6
    assert summary.kept == 3
    assert summary.train == 2 and summary.test == 1
    assert summary.chunks_covered == 1
    assert summary.rejected["round_trip"] == 2
    assert summary.rejected["duplicate"] == 1
    assert summary.rejected["too_long"] == 0
    assert summary.dropped == {"duplicate": 1, "round_trip": 2}


def test_sample_chunks_is_seeded_in_corpus_order_and_stable_as_the_corpus_grows():
    chunks = [{"id": f"c{i}", "text": f"chunk {i}"} for i in range(50)]
    picked = sample_chunks(chunks, 10, seed=1)
    assert len(picked) == 10
    assert picked == sorted(picked, key=lambda c: int(c["id"][1:]))
    assert sample_chunks(chunks, 10, seed=1) == picked
    assert sample_chunks(chunks, 10, seed=2) != picked
    grown = sample_chunks([*chunks, *({"id": f"n{i}", "text": "new"} for i in range(5))], 10, 1)
    assert len({c["id"] for c in picked} & {c["id"] for c in grown}) >= 5
    assert sample_chunks(chunks, None) == chunks
    with pytest.raises(ValueError, match="max_chunks"):
        sample_chunks(chunks, 0)
