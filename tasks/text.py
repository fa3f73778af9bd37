"""The forms texts are compared, hashed and shown in, one function each.

Which form a caller needs depends on what must count as "the same": a chunk id hashes the
Unicode-normalised text with its spacing collapsed (`canonical`), the query log compares queries
ignoring case and spacing (`folded`), and de-duplication and the few-shot leakage checks ignore
punctuation too (`comparable`).
"""

from __future__ import annotations

import re
import unicodedata

#: Quote marks a model wraps around a question, or a user around a query.
QUOTES = "\"'`“”‘’«»"

_WORD = re.compile(r"[a-z0-9]+")


def collapse_spaces(text: str) -> str:
    """Every run of whitespace one space, none at the ends."""
    return " ".join(text.split())


def canonical(text: str) -> str:
    """NFKC (ligatures, full-width forms, compatibility spaces), then spacing collapsed."""
    return collapse_spaces(unicodedata.normalize("NFKC", text))


def folded(text: str) -> str:
    """Spacing collapsed and case folded: "What is X?" and " what is  x?" are one query."""
    return collapse_spaces(text).casefold()


def words(text: str) -> list[str]:
    """The lower-cased ASCII words and numbers of `text`, punctuation dropped."""
    return _WORD.findall(text.lower())


def comparable(text: str) -> str:
    """Case, spacing and punctuation ignored: "Claim X." and "claim x" compare equal."""
    return " ".join(words(text))


def shorten(text: str, limit: int) -> str:
    """`text` on one line, cut to at most `limit` characters with an ellipsis."""
    text = collapse_spaces(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def is_question(text: str) -> bool:
    """Ends with a question mark, allowing closing quotes and brackets after it."""
    return text.rstrip(QUOTES + " )").endswith("?")
