"""Prompts shared by every question generator, and the light parsing of what comes back.

Two prompt shapes exist because two kinds of model exist. A *base* model (the bundled Gemma
270M, or a base model behind a `/v1/completions` endpoint) only continues text, so it gets a
few-shot document: "Passage: ... Question: ..." examples, then the target passage and an open
"Question:". An *instruction* model behind `/v1/chat/completions` gets a plain instruction.

The few-shot examples rotate per passage (a sample from a pool, seeded by the passage's hash):
with the same examples for every passage and greedy decoding, a small base model collapses into
one template and asks the same question of every passage (docs/library-notes.md). Real user
queries, when given, replace the pool's questions as the style to imitate (Promptagator).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.questions.curation import clean_question
from tasks.text import folded

FewShot = tuple[str, str]

#: General, deliberately varied (topic, length, question word) passage/question pairs.
DEFAULT_FEW_SHOT: tuple[FewShot, ...] = (
    (
        "Photosynthesis converts light energy into chemical energy stored in glucose. It takes "
        "place mainly in the chloroplasts of leaf cells, where chlorophyll absorbs red and blue "
        "light and reflects green.",
        "Which pigment absorbs light during photosynthesis?",
    ),
    (
        "The Peace of Westphalia, signed in 1648, ended the Thirty Years' War and set out the "
        "principle that each state has sovereignty over its own territory and domestic affairs.",
        "Which war ended with the Peace of Westphalia?",
    ),
    (
        "A hash table stores key-value pairs in an array of buckets. A hash function maps each "
        "key to a bucket index, so lookups take constant time on average, but many collisions "
        "make lookups slower.",
        "Why do collisions slow down lookups in a hash table?",
    ),
    (
        "Adults should get at least 150 minutes of moderate aerobic activity a week, such as "
        "brisk walking, plus muscle-strengthening activities on two or more days.",
        "How many minutes of moderate exercise a week are recommended for adults?",
    ),
    (
        "A fixed-rate mortgage keeps the same interest rate for the whole term of the loan, "
        "while an adjustable-rate mortgage resets its rate periodically based on a market index.",
        "How does an adjustable-rate mortgage differ from a fixed-rate mortgage?",
    ),
    (
        "Employees who wish to appeal a disciplinary decision must send a written request to the "
        "review board within 30 days of receiving the decision. Late requests are not considered.",
        "What is the deadline for appealing a disciplinary decision?",
    ),
    (
        "Multi-factor authentication asks a user for two or more independent credentials, such "
        "as a password and a one-time code from a phone, so a stolen password alone is not "
        "enough to sign in.",
        "Is a stolen password enough to sign in when multi-factor authentication is on?",
    ),
    (
        "Marie Curie was the first person to win Nobel Prizes in two different sciences: physics "
        "in 1903, shared with Pierre Curie and Henri Becquerel, and chemistry in 1911.",
        "Who shared the 1903 Nobel Prize in Physics with Marie Curie?",
    ),
)

#: The few-shot (base model) document; `{examples}` is the rendered examples, each ending in a
#: blank line, and the model continues after "Question:".
DEFAULT_FEW_SHOT_TEMPLATE = "{examples}Passage: {passage}\nQuestion:"
EXAMPLE_TEMPLATE = "Passage: {passage}\nQuestion: {question}\n\n"
#: Shown before the examples when real user queries set the style.
QUERY_STYLE_TEMPLATE = "Questions people ask look like these:\n{queries}\n\n"

DEFAULT_CHAT_SYSTEM = (
    "You write search questions for a retrieval test set. Each question must be answerable "
    "from the given passage alone, ask about its specific content, and read like something a "
    "person would type into a search box. Do not copy sentences from the passage."
)
#: The chat user message; `{n}` questions, `{passage}`, and `{style}` (real user queries or
#: empty).
DEFAULT_CHAT_TEMPLATE = (
    "{style}Write {n} different question(s) about this passage, one per line, with no numbering "
    "and no other text.\n\nPassage:\n{passage}"
)
CHAT_STYLE_TEMPLATE = "Match the style of these real user questions:\n{queries}\n\n"

#: Where a base model that keeps going starts a new example: the end of its question.
STOP_MARKERS = ("\n", "Passage:")


def passage_seed(passage: str, seed: int, index: int = 0) -> int:
    """A seed that depends only on the passage, the user's seed and the sample index, so a
    passage gets the same examples and the same sample whatever else is in its batch."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{passage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def truncate(passage: str, max_chars: int) -> str:
    """Cut a long passage at a word boundary: prompt length is the main cost of generation, and
    a question about the first ~300 tokens of a chunk still retrieves that chunk."""
    text = " ".join(passage.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut) + " ..."


def choose_examples(passage: str, pool: Sequence[FewShot], k: int, seed: int) -> list[FewShot]:
    """A seeded sample of `k` examples from the pool, different from passage to passage."""
    if not pool:
        return []
    rng = random.Random(passage_seed(passage, seed, -1))
    return rng.sample(list(pool), min(k, len(pool)))


def choose_queries(passage: str, queries: Sequence[str], k: int, seed: int) -> list[str]:
    if not queries:
        return []
    rng = random.Random(passage_seed(passage, seed, -2))
    return rng.sample(list(queries), min(k, len(queries)))


def few_shot_prompt(
    passage: str,
    *,
    pool: Sequence[FewShot] = DEFAULT_FEW_SHOT,
    k: int = 3,
    seed: int = 0,
    template: str = DEFAULT_FEW_SHOT_TEMPLATE,
    example_queries: Sequence[str] = (),
    max_chars: int = 1500,
) -> str:
    """The base-model prompt for one passage: rotated examples, optional query style, passage."""
    examples = "".join(
        EXAMPLE_TEMPLATE.format(passage=truncate(p, max_chars), question=q.strip())
        for p, q in choose_examples(passage, pool, k, seed)
    )
    queries = choose_queries(passage, example_queries, 5, seed)
    if queries:
        lines = "\n".join(f"Question: {q.strip()}" for q in queries)
        examples = QUERY_STYLE_TEMPLATE.format(queries=lines) + examples
    return template.format(examples=examples, passage=truncate(passage, max_chars))


def chat_messages(
    passage: str,
    *,
    n: int = 1,
    seed: int = 0,
    system: str = DEFAULT_CHAT_SYSTEM,
    template: str = DEFAULT_CHAT_TEMPLATE,
    example_queries: Sequence[str] = (),
    max_chars: int = 1500,
) -> list[dict[str, str]]:
    """The chat prompt for one passage (an instruction model needs no examples)."""
    queries = choose_queries(passage, example_queries, 5, seed)
    style = CHAT_STYLE_TEMPLATE.format(queries="\n".join(queries)) if queries else ""
    user = template.format(n=n, passage=truncate(passage, max_chars), style=style)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def split_questions(text: str, limit: int | None = None) -> list[str]:
    """One question per non-empty line of a model's answer, lightly stripped.

    Lines that only introduce a list ("Here are three questions:") are dropped; anything deeper
    (length bounds, copies of the passage, duplicates) is questions.py's job.
    """
    text = text.split("Passage:")[0]
    questions = [clean_question(line) for line in text.splitlines()]
    questions = [q for q in questions if q and not q.endswith(":")]
    return questions[:limit] if limit is not None else questions


def _echo_key(text: str) -> str:
    return folded(text).rstrip("?.! ")


def drop_echoes(questions: Sequence[str], shown: Sequence[str]) -> list[str]:
    """Drop questions that repeat an example question word for word.

    A small base model sometimes copies an example's question ("How many minutes of moderate
    exercise a week...") instead of asking about the passage; only the generator knows which
    examples it showed, so this is the one cleaning step done here.
    """
    echoes = {_echo_key(q) for q in shown}
    return [q for q in questions if _echo_key(q) not in echoes]


def as_few_shot(pool: Sequence[Any]) -> list[FewShot]:
    """Examples as (passage, question) pairs, from pairs or {"passage", "question"} objects (the
    shapes a flow parameter arrives in), with an error naming the bad entry."""
    examples: list[FewShot] = []
    for index, item in enumerate(pool):
        if isinstance(item, Mapping) and {"passage", "question"} <= set(item):
            passage, question = item["passage"], item["question"]
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            passage, question = item
        else:
            raise ValueError(
                f"few_shot[{index}] must be a (passage, question) pair or an object with "
                f"'passage' and 'question'; got {item!r}"
            )
        if not str(passage).strip() or not str(question).strip():
            raise ValueError(f"few_shot[{index}] has an empty passage or question")
        examples.append((str(passage), str(question)))
    return examples


def check_template(template: str, fields: Sequence[str], setting: str) -> str:
    """Fail at construction, naming the setting, when a custom template lacks a placeholder."""
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ValueError(
            f"{setting} must contain the placeholder(s) "
            f"{', '.join('{' + f + '}' for f in missing)}; got {template!r}"
        )
    return template
