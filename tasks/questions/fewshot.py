"""A handful of real user queries as few-shot examples, kept out of everything they could inflate.

Promptagator showed that a few real queries (at most 8) steer a generator towards the style of
questions a retriever will actually see. When those queries come from a labelled set that is
also used to measure the retriever, the examples must leave the measured set, and no labelled
query may reach the training data: otherwise the score rewards memorising the test. This module
chooses the examples (a seeded sample) and guards both rules with `LeakageError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.questions.curation import LeakageError
from tasks.retrieval.beir import load_beir
from tasks.text import comparable

#: Promptagator's budget: at most this many labelled queries may be shown to the generator.
MAX_EXAMPLES = 8


def choose_examples(queries: Mapping[str, str], k: int = MAX_EXAMPLES, seed: int = 42) -> list[str]:
    """The ids of `k` queries to show as examples: a seeded hash order, stable and reproducible.

    Ids are ranked by a hash of (seed, id), not shuffled, so the same labelled set and seed give
    the same examples in every run and on every machine.
    """
    if not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(
            f"few-shot examples k must be between 0 and {MAX_EXAMPLES} (Promptagator's budget "
            f"of labelled queries), got {k}"
        )
    if k > len(queries):
        raise ValueError(f"cannot choose {k} few-shot examples from {len(queries)} queries")
    ranked = sorted(queries, key=lambda qid: hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest())
    return sorted(ranked[:k], key=list(queries).index)


def held_out(
    queries: Mapping[str, str],
    relevant: Mapping[str, set[str]],
    example_ids: Iterable[str],
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The queries (and their judgements) left to evaluate once the examples are removed.

    A query is removed when its id is an example's or its text is the same as an example's
    (labelled sets can hold one text under two ids), then `check_held_out` confirms it.
    """
    example_ids = list(example_ids)
    unknown = [qid for qid in example_ids if qid not in queries]
    if unknown:
        raise KeyError(f"few-shot example id(s) {unknown} are not among the labelled queries")
    shown = {comparable(queries[qid]) for qid in example_ids}
    kept = {
        qid: text
        for qid, text in queries.items()
        if qid not in example_ids and comparable(text) not in shown
    }
    judged = {qid: set(relevant[qid]) for qid in kept if qid in relevant}
    check_held_out([queries[qid] for qid in example_ids], kept)
    return kept, judged


def check_held_out(examples: Sequence[str], evaluated: Mapping[str, str]) -> None:
    """Raise `LeakageError` if an example query is among the evaluated queries (by text)."""
    if len(examples) > MAX_EXAMPLES:
        raise LeakageError(
            f"{len(examples)} labelled queries shown as examples; at most {MAX_EXAMPLES} may be"
        )
    shown = {comparable(text): text for text in examples}
    leaked = sorted(qid for qid, text in evaluated.items() if comparable(text) in shown)
    if leaked:
        more = f" (and {len(leaked) - 1} more)" if len(leaked) > 1 else ""
        raise LeakageError(
            f"evaluated query {leaked[0]!r} ({evaluated[leaked[0]]!r}){more} was shown to the "
            "generator as a few-shot example: its score would reward copying the example"
        )


def check_training(anchors: Iterable[str], labelled: Iterable[str]) -> None:
    """Raise `LeakageError` if a training anchor is one of the labelled queries (by text).

    The generator drops exact echoes of the examples it shows; this is the end-to-end check
    that no labelled query, shown or not, became a training question.
    """
    known = {comparable(text): text for text in labelled}
    for anchor in anchors:
        if comparable(anchor) in known:
            raise LeakageError(
                f"training question {anchor!r} is the labelled query "
                f"{known[comparable(anchor)]!r}: the evaluation would measure memorisation"
            )


@dataclass(frozen=True)
class LabelledSplit:
    """A labelled BEIR split divided into few-shot examples and the queries left to evaluate."""

    corpus: dict[str, str]
    #: query ids shown to the generator as examples, and their texts
    example_ids: list[str]
    examples: list[str]
    #: (judged passage, claim) for each example with a judgement: Promptagator's few-shot pairs
    example_pairs: list[tuple[str, str]]
    #: everything else: the queries that are evaluated, with their judgements
    queries: dict[str, str]
    relevant: dict[str, set[str]]


def labelled_split(
    folder: Path, split: str = "dev", k: int = MAX_EXAMPLES, seed: int = 42
) -> LabelledSplit:
    """Load a BEIR folder's split and set `k` of its queries aside as few-shot examples."""
    corpus, queries, relevant = load_beir(Path(folder), split)
    example_ids = choose_examples(queries, k, seed)
    kept, judged = held_out(queries, relevant, example_ids)
    return LabelledSplit(
        corpus=corpus,
        example_ids=example_ids,
        examples=[queries[qid] for qid in example_ids],
        example_pairs=[
            (corpus[min(relevant[qid] & corpus.keys())], queries[qid])
            for qid in example_ids
            if relevant.get(qid, set()) & corpus.keys()
        ],
        queries=kept,
        relevant=judged,
    )
