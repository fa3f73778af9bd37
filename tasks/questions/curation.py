"""Turn raw generator output into a clean, leakage-free question set.

A small LLM writes numbered lists, copies sentences from the passage, repeats itself and asks
questions its own passage does not answer. Training on that makes a retriever worse
(docs/library-notes.md: unfiltered Gemma-270M questions cost NDCG@10), so every question passes
cheap text filters, then the Promptagator round trip (the base model must rank the question's
own chunk in its top k), then a seeded split in which no chunk (or document) has questions on
both sides.

Rejected questions are kept with a reason rather than dropped, so reports can say what was
thrown away and why.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tasks.text import QUOTES, collapse_spaces, comparable, is_question, words

#: Reject reasons in the order the filters apply them (reports list them in this order).
REJECT_REASONS = (
    "empty",
    "too_short",
    "too_long",
    "not_a_question",
    "copies_passage",
    "duplicate",
    "near_duplicate",
    "round_trip",
)

SplitBy = Literal["chunk", "document"]


@dataclass
class Question:
    """One generated question about one chunk, with its fate."""

    question: str
    chunk_id: str
    generator: str
    split: str = ""
    kept: bool = True
    reject_reason: str | None = None

    def reject(self, reason: str) -> None:
        self.kept = False
        self.reject_reason = reason
        self.split = ""


class LeakageError(ValueError):
    """A chunk or document has questions in both the train and the test split."""


# Numbering and bullets a model puts in front of a question: "1.", "2)", "(3)", "Q1:", "Q:",
# "-", "*", "•", "Question 2:", markdown bold around a label.
_PREFIX = re.compile(
    r"""^\s*(?:
        \*\*\s*(?:q(?:uestion)?\s*\d*)\s*[:.)]?\s*\*\*\s*[:.)]?   # **Question 1:**
      | (?:q(?:uestion)?\s*\d*\s*[:.)])                         # Q1: / Question: / Q.
      | \(?\d{1,3}\s*[.):\]](?!\d)                              # 1. / 2) / (3), not 3.5
      | \(?[a-z][.)](?=\s)                                     # a. / b) / (c), lettered lists
      | [-*•·‣–—>]+(?=\s|$)                                     # bullets, quote marks
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def clean_question(text: str) -> str:
    """Strip what a model wraps around a question: numbering, bullets, labels, quotes, space.

    Prefixes and quotes can nest ("1. Question: \"What ...?\""), so stripping repeats until the
    text stops changing.
    """
    text = collapse_spaces(text)
    while True:
        before = text
        text = _PREFIX.sub("", text, count=1).strip()
        if text.startswith("**") and text.endswith("**") and len(text) > 4:
            text = text[2:-2].strip()
        if len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES:
            text = text[1:-1].strip()
        if text == before:
            return text


def _copies(question_words: list[str], passage_ngrams: set[tuple[str, ...]], n: int) -> bool:
    return any(
        tuple(question_words[i : i + n]) in passage_ngrams
        for i in range(len(question_words) - n + 1)
    )


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def filter_questions(
    questions: list[Question],
    chunk_texts: Mapping[str, str],
    min_chars: int = 15,
    max_chars: int = 300,
    max_copied_words: int = 8,
    near_dup_threshold: float = 0.85,
    questions_only: bool = True,
) -> list[Question]:
    """Mark questions that fail the text filters as rejected, in place, and return the list.

    - `empty`, `too_short`, `too_long`: length of the question in characters.
    - `not_a_question`: it does not end with a question mark (models also emit statements,
      answers and instructions). Off with `questions_only=False`, for users whose real queries
      are statements or keywords (claims, titles) and whose few-shot examples show that style.
    - `copies_passage`: it shares more than `max_copied_words` consecutive words with its own
      chunk; such questions teach lexical matching, which the base model already does.
    - `duplicate`: same words as an earlier kept question (case and punctuation ignored), across
      the whole set, since duplicates inflate a pair's weight and collide in MNRL batches.
    - `near_duplicate`: word-set Jaccard similarity >= `near_dup_threshold` with an earlier kept
      question. The first occurrence wins, so the result is deterministic in input order.

    Questions already rejected are left as they are and do not count as earlier occurrences.
    """
    if not 0 < near_dup_threshold <= 1:
        raise ValueError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
    n = max_copied_words + 1
    passage_ngrams: dict[str, set[tuple[str, ...]]] = {}
    candidates: list[Question] = []
    for q in questions:
        if not q.kept:
            continue
        text = q.question.strip()
        if not words(text):
            q.reject("empty")
        elif len(text) < min_chars:
            q.reject("too_short")
        elif len(text) > max_chars:
            q.reject("too_long")
        elif questions_only and not is_question(text):
            q.reject("not_a_question")
        else:
            if q.chunk_id not in passage_ngrams:
                passage = chunk_texts.get(q.chunk_id)
                if passage is None:
                    raise KeyError(f"question refers to chunk {q.chunk_id!r}, not in the chunks")
                passage_ngrams[q.chunk_id] = _ngrams(words(passage), n)
            if _copies(words(text), passage_ngrams[q.chunk_id], n):
                q.reject("copies_passage")
            else:
                candidates.append(q)
    _reject_duplicates(candidates, near_dup_threshold)
    return questions


def _reject_duplicates(questions: list[Question], threshold: float) -> None:
    """Exact and near-duplicate removal, first occurrence wins.

    Near duplicates use a prefix-filtered set-similarity join: with the tokens of every set in
    one global order (rarest first), two sets with Jaccard >= t must share a token among the
    first |x| - ceil(t|x|) + 1 of each, so only questions sharing a rare prefix token are
    compared. That is exact, and close to linear on real question sets, where a plain all-pairs
    comparison of thousands of questions would be quadratic.
    """
    token_sets = [frozenset(words(q.question)) for q in questions]
    frequency = Counter(token for tokens in token_sets for token in tokens)
    seen_exact: set[str] = set()
    index: dict[str, list[int]] = defaultdict(list)
    kept_sets: list[frozenset[str]] = []
    for q, tokens in zip(questions, token_sets, strict=True):
        exact = comparable(q.question)
        if exact in seen_exact:
            q.reject("duplicate")
            continue
        ordered = sorted(tokens, key=lambda t: (frequency[t], t))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        candidates = {i for token in prefix for i in index[token]}
        if any(_jaccard(tokens, kept_sets[i]) >= threshold for i in sorted(candidates)):
            q.reject("near_duplicate")
            continue
        seen_exact.add(exact)
        for token in prefix:
            index[token].append(len(kept_sets))
        kept_sets.append(tokens)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def round_trip_filter(
    questions: list[Question],
    chunk_ids: Sequence[str],
    chunk_texts: Sequence[str],
    model: Any,
    top_k: int = 10,
    batch_size: int = 64,
    query_prompt: str | None = None,
) -> list[Question]:
    """Promptagator's round-trip consistency filter, in place: keep a question only if `model`
    (the base embedding model) ranks the question's own chunk within `top_k` of all chunks.

    A question its own passage does not answer better than most others is either off-topic or
    too generic to teach the retriever anything; the notes measured this filter turning a loss
    into a gain. Ranks use cosine similarity of normalised embeddings; a chunk tied with the
    question's own chunk does not push it down.
    """
    if len(chunk_ids) != len(chunk_texts):
        raise ValueError(f"{len(chunk_ids)} chunk ids but {len(chunk_texts)} chunk texts")
    if top_k < 1:
        raise ValueError(f"round-trip top_k must be at least 1, got {top_k}")
    position = {chunk_id: i for i, chunk_id in enumerate(chunk_ids)}
    kept = [q for q in questions if q.kept]
    for q in kept:
        if q.chunk_id not in position:
            raise KeyError(f"question refers to chunk {q.chunk_id!r}, not among the chunks")
    if not kept or top_k >= len(chunk_ids):
        return questions

    import torch

    encode = {"batch_size": batch_size, "normalize_embeddings": True, "convert_to_tensor": True}
    corpus = model.encode(list(chunk_texts), show_progress_bar=len(chunk_texts) >= 1024, **encode)
    queries = model.encode(
        [q.question for q in kept],
        prompt=query_prompt,
        show_progress_bar=len(kept) >= 1024,
        **encode,
    )
    own = torch.tensor([position[q.chunk_id] for q in kept], device=corpus.device)
    # Queries in slices so a large set never holds a full queries x chunks matrix.
    for start in range(0, len(kept), 1024):
        scores = queries[start : start + 1024] @ corpus.T
        own_slice = own[start : start + 1024]
        own_scores = scores.gather(1, own_slice.unsqueeze(1))
        ranks = (scores > own_scores).sum(dim=1) + 1
        for q, rank in zip(kept[start : start + 1024], ranks.tolist(), strict=True):
            if rank > top_k:
                q.reject("round_trip")
    return questions


def sample_chunks(
    chunks: Sequence[dict[str, Any]], max_chunks: int | None, seed: int = 42
) -> list[dict[str, Any]]:
    """At most `max_chunks` chunks (None: all), a seeded sample kept in corpus order.

    Chunks are ranked by a seeded hash of their id, so the sample is reproducible and, as the
    corpus grows, a chunk already sampled stays sampled unless a newcomer outranks it: the
    question cache keeps paying off for demo-sized runs.
    """
    if max_chunks is None or max_chunks >= len(chunks):
        return list(chunks)
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1 (or None for all), got {max_chunks}")
    ranked = sorted(range(len(chunks)), key=lambda i: _seeded_hash(seed, chunks[i]["id"]))
    return [chunks[i] for i in sorted(ranked[:max_chunks])]


def _seeded_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _group_key(q: Question, by: str, doc_of: Mapping[str, str] | None) -> str:
    if by == "chunk":
        return q.chunk_id
    if by == "document":
        if doc_of is None:
            raise ValueError("splitting by document needs doc_of (chunk id -> document id)")
        if q.chunk_id not in doc_of:
            raise KeyError(f"chunk {q.chunk_id!r} has no document in doc_of")
        return doc_of[q.chunk_id]
    raise ValueError(f"split by must be 'chunk' or 'document', got {by!r}")


def split_questions(
    questions: list[Question],
    test_size: float = 0.2,
    seed: int = 42,
    by: SplitBy = "chunk",
    doc_of: Mapping[str, str] | None = None,
) -> list[Question]:
    """Assign `train`/`test` to kept questions, in place, whole chunks (or documents) at a time.

    Questions about one chunk are near-paraphrases of each other; one in train and one in test
    would measure memorisation, not retrieval. Groups are ordered by a seeded hash of their id
    and moved to test until test holds `test_size` of the questions. A hash order, unlike a
    shuffle, is stable as the corpus grows: new chunks slot in without moving old ones across
    the split, so a nightly refresh does not turn yesterday's training data into test data.
    """
    if not 0 <= test_size < 1:
        raise ValueError(f"test_size must be in [0, 1), got {test_size}")
    groups: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        if q.kept:
            groups[_group_key(q, by, doc_of)].append(q)
    if test_size > 0 and len(groups) == 1:
        raise ValueError(
            f"cannot split by {by}: all kept questions belong to one {by}; "
            "use more chunks or documents, or set test_size to 0"
        )
    order = sorted(groups, key=lambda key: _seeded_hash(seed, key))
    target = test_size * sum(len(qs) for qs in groups.values())
    test_keys: list[str] = []
    in_test = 0
    for key in order:
        if in_test < target:
            test_keys.append(key)
            in_test += len(groups[key])
    if test_keys and len(test_keys) == len(groups):
        test_keys.pop()
    chosen = set(test_keys)
    for key, group in groups.items():
        for q in group:
            q.split = "test" if key in chosen else "train"
    assert_no_leakage(questions, by=by, doc_of=doc_of)
    return questions


def assert_no_leakage(
    questions: Sequence[Question], by: SplitBy = "chunk", doc_of: Mapping[str, str] | None = None
) -> None:
    """Raise `LeakageError` if any chunk (or document) has kept questions in train and test."""
    splits: dict[str, set[str]] = defaultdict(set)
    for q in questions:
        if q.kept and q.split in ("train", "test"):
            splits[_group_key(q, by, doc_of)].add(q.split)
    leaked = sorted(key for key, sides in splits.items() if len(sides) > 1)
    if leaked:
        more = f" (and {len(leaked) - 1} more)" if len(leaked) > 1 else ""
        raise LeakageError(
            f"{by} {leaked[0]!r}{more} has questions in both train and test: "
            "the test score would reward memorising the training questions"
        )


@dataclass(frozen=True)
class Curation:
    """What curation kept of a set of generated questions, and why it dropped the rest."""

    generated: int
    kept: int
    #: every reject reason, with zero where nothing was dropped for it
    rejected: dict[str, int]
    train: int
    test: int
    chunks_covered: int

    @property
    def dropped(self) -> dict[str, int]:
        """Only the reasons that dropped something."""
        return {reason: n for reason, n in self.rejected.items() if n}


def summarise(questions: Sequence[Question]) -> Curation:
    """Counts for reports: generated, kept, rejected per reason, train, test, chunks covered."""
    rejected = Counter(q.reject_reason for q in questions if not q.kept)
    reasons = {reason: rejected.pop(reason, 0) for reason in REJECT_REASONS}
    reasons.update(sorted((str(reason), n) for reason, n in rejected.items()))
    kept = [q for q in questions if q.kept]
    return Curation(
        generated=len(questions),
        kept=len(kept),
        rejected=reasons,
        train=sum(q.split == "train" for q in kept),
        test=sum(q.split == "test" for q in kept),
        chunks_covered=len({q.chunk_id for q in kept}),
    )


def curate(
    questions: list[Question],
    chunks: Sequence[Mapping[str, Any]],
    model: Any,
    *,
    questions_only: bool = True,
    test_size: float = 0.2,
    seed: int = 42,
    split_by: SplitBy = "chunk",
    round_trip_top_k: int = 10,
) -> Curation:
    """Clean, filter, split and round-trip generated questions in place; returns the counts.

    The round trip (`model` must rank a question's own chunk in its top k) filters training
    questions only: filtering the test questions by the base model's own ranking would hand the
    base model a test it is guaranteed to do well on.
    """
    from tasks.models import model_prompts

    for q in questions:
        q.question = clean_question(q.question)
    filter_questions(questions, {c["id"]: c["text"] for c in chunks}, questions_only=questions_only)
    if any(q.kept for q in questions):
        split_questions(
            questions,
            test_size=test_size,
            seed=seed,
            by=split_by,
            doc_of={c["id"]: c["doc_id"] for c in chunks},
        )
    round_trip_filter(
        [q for q in questions if q.kept and q.split == "train"],
        [c["id"] for c in chunks],
        [c["text"] for c in chunks],
        model,
        top_k=round_trip_top_k,
        query_prompt=model_prompts(model)[0] or None,
    )
    return summarise(questions)
