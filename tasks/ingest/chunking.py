"""Token-aware splitting of pages into chunks, with content-hash ids.

Chunks are measured with the embedding model's own tokenizer because that is what truncates:
a chunk longer than the model's window is silently cut at embedding time, and the cut-off text
can never be retrieved. Boundaries prefer paragraphs, then sentences, and only split inside a
sentence when one sentence alone is too long. Consecutive chunks overlap by whole sentences so
that a fact on a boundary is whole in at least one chunk.

A chunk's id is a hash of its normalised text: the same text gets the same id on every run and
machine, which is what makes question caching and idempotent publishing work.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from tasks.ingest.documents import Page
from tasks.text import canonical

MIN_TOKENS = 16


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    source: str
    page_start: int
    page_end: int
    text: str
    n_tokens: int


def chunk_id(text: str) -> str:
    """A stable id for a chunk's content (16 hex digits of SHA-256 of the normalised text)."""
    return hashlib.sha256(canonical(text).encode("utf-8")).hexdigest()[:16]


def max_chunk_tokens(model: Any) -> int:
    """The most text tokens a model embeds without truncating: its window minus special tokens."""
    window = model.max_seq_length or model.tokenizer.model_max_length
    return int(window) - model.tokenizer.num_special_tokens_to_add(pair=False)


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a piece of an over-long one): the smallest thing a chunk is built from."""

    text: str
    page: int
    n_tokens: int
    starts_paragraph: bool


# A sentence ends at . ! ? (optionally closed by quotes or brackets) followed by a space and
# what looks like the start of the next sentence. Abbreviations such as "e.g. the" are safe
# because a lower-case word follows them.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9•])")


_LIST_ITEM = re.compile(r"^\s*(?:[-*+•◦▪–]|\d{1,3}[.)])\s")


def _sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences. Hard-wrapped lines (Markdown, text) are one run of prose; a
    line that starts a list item starts a new sentence."""
    blocks: list[str] = []
    for line in paragraph.split("\n"):
        if blocks and not _LIST_ITEM.match(line):
            blocks[-1] += " " + line.strip()
        else:
            blocks.append(line.strip())
    return [s.strip() for block in blocks for s in _SENTENCE_END.split(block) if s.strip()]


def chunk_pages(
    pages: Sequence[Page], tokenizer: Any, max_tokens: int = 256, overlap: int = 32
) -> list[Chunk]:
    """Split pages into chunks of at most `max_tokens` tokens, document by document.

    Chunks may span the pages of one document (`page_start`/`page_end` say which) but never two
    documents. Duplicate texts (boilerplate repeated across files) are kept once, first seen.
    The caller clamps `max_tokens` to the model's window (see `max_chunk_tokens`).
    """
    if max_tokens < MIN_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_TOKENS}, got {max_tokens}")
    if overlap < 0 or overlap >= max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} with {max_tokens}")
    counter = _Counter(tokenizer)
    documents = [list(group) for _, group in groupby(pages, key=lambda page: page.doc_id)]
    bodies: list[tuple[Page, list[_Unit]]] = []
    for doc_pages, units in zip(documents, _units(documents, counter, max_tokens), strict=True):
        bodies.extend((doc_pages[0], body) for body in _pack(units, counter, max_tokens, overlap))
    texts = [_join(body) for _, body in bodies]
    counts = counter.many(texts)
    chunks: list[Chunk] = []
    seen: set[str] = set()
    for (first, body), text, n_tokens in zip(bodies, texts, counts, strict=True):
        # Counts of parts do not always add up to the count of their join (subword merges
        # across a join): the rare chunk that ends up over the limit is halved until it fits.
        parts = [(body, text, n_tokens)]
        if n_tokens > max_tokens:
            parts = _fit_body(body, counter, max_tokens)
        for part, part_text, part_tokens in parts:
            chunk = Chunk(
                id=chunk_id(part_text),
                doc_id=first.doc_id,
                source=first.source,
                page_start=min(u.page for u in part),
                page_end=max(u.page for u in part),
                text=part_text,
                n_tokens=part_tokens,
            )
            if chunk.id not in seen:
                seen.add(chunk.id)
                chunks.append(chunk)
    return chunks


def _fit_body(
    body: list[_Unit], counter: _Counter, max_tokens: int
) -> list[tuple[list[_Unit], str, int]]:
    text = _join(body)
    n_tokens = counter.one(text)
    if n_tokens <= max_tokens or len(body) == 1:
        return [(body, text, n_tokens)]
    half = len(body) // 2
    return _fit_body(body[:half], counter, max_tokens) + _fit_body(body[half:], counter, max_tokens)


class _Counter:
    """Token counts with the model's tokenizer, without special tokens, batched."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend counts without building Python-side encodings (a
        # third of the time on a large corpus). It is a copy with truncation and padding off:
        # tokenizer.json files often set them (MiniLM's truncates at 128), which would cap
        # every count silently.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()

    def many(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self.backend is not None:
            return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        # verbose=False: texts longer than the model's window are expected here (that is what
        # is being measured), so the tokenizer's warning about them is noise.
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def one(self, text: str) -> int:
        return self.many([text])[0]


def _units(documents: list[list[Page]], counter: _Counter, max_tokens: int) -> list[list[_Unit]]:
    """Each document's sentences in order, each ≤ max_tokens, marked where paragraphs start.

    All sentences of all documents are counted in one tokenizer call: a corpus of many short
    records is otherwise dominated by per-call overhead.
    """
    raw: list[tuple[int, str, int, bool]] = []
    for index, pages in enumerate(documents):
        for page in pages:
            for paragraph in re.split(r"\n\s*\n", page.text):
                for i, sentence in enumerate(_sentences(paragraph)):
                    raw.append((index, sentence, page.page, i == 0))
    counts = counter.many([text for _, text, _, _ in raw])
    units: list[list[_Unit]] = [[] for _ in documents]
    for (index, text, page, starts), n in zip(raw, counts, strict=True):
        if n <= max_tokens:
            units[index].append(_Unit(text, page, n, starts))
            continue
        for j, piece in enumerate(_split_long(text, counter, max_tokens)):
            units[index].append(_Unit(piece, page, counter.one(piece), starts and j == 0))
    return units


def _split_long(text: str, counter: _Counter, max_tokens: int) -> list[str]:
    """Split an over-long sentence at word boundaries; a word too long alone, by characters."""
    words = text.split()
    counts = counter.many(words)
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for word, n in zip(words, counts, strict=True):
        if n > max_tokens:
            if current:
                pieces.append(" ".join(current))
                current, size = [], 0
            pieces.extend(_split_chars(word, counter, max_tokens))
            continue
        if current and size + n > max_tokens:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(word)
        size += n
    if current:
        pieces.append(" ".join(current))
    return [p for piece in pieces for p in _fit(piece, counter, max_tokens)]


def _split_chars(word: str, counter: _Counter, max_tokens: int) -> list[str]:
    pieces = []
    while word:
        low, high = 1, len(word)
        while low < high:  # the longest prefix that fits
            mid = (low + high + 1) // 2
            if counter.one(word[:mid]) <= max_tokens:
                low = mid
            else:
                high = mid - 1
        pieces.append(word[:low])
        word = word[low:]
    return pieces


def _fit(text: str, counter: _Counter, max_tokens: int) -> list[str]:
    """Word counts do not always add up exactly (subword merges): re-check and halve if over."""
    if counter.one(text) <= max_tokens:
        return [text]
    words = text.split()
    if len(words) == 1:
        return _split_chars(text, counter, max_tokens)
    half = len(words) // 2
    return _fit(" ".join(words[:half]), counter, max_tokens) + _fit(
        " ".join(words[half:]), counter, max_tokens
    )


def _join(units: Sequence[_Unit]) -> str:
    text = ""
    for unit in units:
        if not text:
            text = unit.text
        else:
            text += ("\n\n" if unit.starts_paragraph else " ") + unit.text
    return text


def _pack(
    units: list[_Unit], counter: _Counter, max_tokens: int, overlap: int
) -> list[list[_Unit]]:
    """Greedy packing of whole units; a chunk ends at a paragraph break when one falls in its
    second half, and the next chunk starts with up to `overlap` tokens of its end."""
    bodies: list[list[_Unit]] = []
    prefix: list[_Unit] = []  # the overlap carried from the previous chunk
    start = 0
    while start < len(units):
        size = sum(u.n_tokens for u in prefix)
        end = start
        while end < len(units) and size + units[end].n_tokens <= max_tokens:
            size += units[end].n_tokens
            end += 1
        if end < len(units):
            end = _paragraph_cut(units, start, end, size, max_tokens)
        bodies.append(prefix + units[start:end])
        if end >= len(units):
            break
        room = min(overlap, max_tokens - units[end].n_tokens)
        prefix = _overlap(units[start:end], room, counter)
        start = end
    return bodies


def _paragraph_cut(units: list[_Unit], start: int, end: int, size: int, max_tokens: int) -> int:
    """Move a chunk's end back to the last paragraph start in its second half, if any."""
    for cut in range(end - 1, start, -1):
        size -= units[cut].n_tokens
        if size < max_tokens // 2:
            break
        if units[cut].starts_paragraph:
            return cut
    return end


def _overlap(body: list[_Unit], room: int, counter: _Counter) -> list[_Unit]:
    """The end of a chunk to repeat at the start of the next: the last whole sentences that fit
    in `room` tokens, or, when even the last sentence is longer, its last words that fit."""
    if room <= 0 or not body:
        return []
    taken: list[_Unit] = []
    size = 0
    for unit in reversed(body):
        if size + unit.n_tokens > room:
            break
        taken.insert(0, unit)
        size += unit.n_tokens
    if taken:
        return taken
    last = body[-1]
    words = last.text.split()
    counts = counter.many(words)
    keep, size = 0, 0
    for n in reversed(counts):
        if size + n > room:
            break
        keep += 1
        size += n
    if keep == 0:
        return []
    return [_Unit(" ".join(words[-keep:]), last.page, size, starts_paragraph=False)]
