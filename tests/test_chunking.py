"""Chunking with the model's own tokenizer: limits, boundaries, overlap, provenance, stable ids."""

from __future__ import annotations

import itertools
import re

import pytest

from tasks.ingest.chunking import Chunk, chunk_id, chunk_pages, max_chunk_tokens
from tasks.ingest.documents import Page, read_document
from tasks.text import canonical
from tests.conftest import FIXTURES, read_nist


@pytest.fixture(scope="module")
def nist_pages() -> list[Page]:
    return list(read_nist())


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return minilm.tokenizer


@pytest.fixture(scope="module")
def nist_chunks(nist_pages, tokenizer) -> list[Chunk]:
    return chunk_pages(nist_pages, tokenizer, max_tokens=254, overlap=32)


RAGAS_PDF = FIXTURES / "RAGAS_2309.15217.pdf"


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_max_chunk_tokens_is_the_window_minus_cls_and_sep(minilm):
    assert minilm.max_seq_length == 256
    assert max_chunk_tokens(minilm) == 254


def test_no_chunk_exceeds_the_limit_and_counts_are_exact(nist_chunks, tokenizer):
    assert len(nist_chunks) > 100
    for chunk in nist_chunks:
        assert chunk.n_tokens == count(tokenizer, chunk.text)
        assert chunk.n_tokens <= 254
    # the limit is used, not just respected: most chunks are well filled
    filled = [c for c in nist_chunks if c.n_tokens >= 127]
    assert len(filled) >= 0.8 * len(nist_chunks)


@pytest.mark.parametrize(
    ("phrase", "page"),
    [
        ("GAI risks may materialize abruptly or across extended periods", 7),
        ("Conduct appropriate diligence on training data use to assess intellectual property", 31),
        ("Provable Robust Watermarking for AI-Generated Text", 64),
    ],
)
def test_chunks_know_the_pages_they_come_from(nist_chunks, phrase, page):
    """Each phrase was looked up by hand on its page of the PDF (1-based, as a viewer shows)."""
    holding = [c for c in nist_chunks if phrase in flat(c.text)]
    assert holding, phrase
    for chunk in holding:
        assert chunk.page_start <= page <= chunk.page_end
        assert chunk.doc_id == chunk.source == "NIST.AI.600-1.pdf"


def test_chunks_span_pages_within_a_document(nist_chunks):
    assert any(c.page_start < c.page_end for c in nist_chunks)
    starts = [c.page_start for c in nist_chunks]
    assert starts == sorted(starts)


def test_no_running_page_number_survives_in_the_chunks(nist_pages, nist_chunks):
    """NIST prints its page number alone at the top of pages 5-64 (see test_documents). Where a
    chunk runs across a page break, the end of one page must lead straight into the start of
    the next, with no number between them."""
    text = "\n".join(flat(c.text) for c in nist_chunks)
    joined = 0
    for page in range(6, 65):
        tail = flat(nist_pages[page - 2].text)[-25:]
        head = flat(nist_pages[page - 1].text)[:25]
        assert not re.search(rf"{re.escape(tail)}\s+{page - 4}\s+{re.escape(head)}", text)
        joined += f"{tail} {head}" in text
    assert joined >= 30  # most page breaks fall inside some chunk


def test_ids_are_identical_across_runs(nist_pages, tokenizer, nist_chunks):
    again = chunk_pages(nist_pages, tokenizer, 254, 32)
    assert [c.id for c in again] == [c.id for c in nist_chunks]
    assert len({c.id for c in nist_chunks}) == len(nist_chunks)
    # reading included: two independent reads of a PDF give the same chunk ids
    first, second = (read_document(RAGAS_PDF) for _ in range(2))
    assert [c.id for c in chunk_pages(first, tokenizer)] == [
        c.id for c in chunk_pages(second, tokenizer)
    ]


def test_chunk_id_hashes_the_normalised_text():
    assert canonical("  ﬁne\n\n tuning\t") == "fine tuning"
    assert chunk_id("fine tuning") == chunk_id("  ﬁne\n\n tuning\t")
    # a fixed value: ids must not change between machines or versions
    assert chunk_id("fine tuning") == "e9d7ac65848d240b"
    assert re.fullmatch(r"[0-9a-f]{16}", chunk_id("x"))


def test_paragraph_breaks_are_preferred(tokenizer):
    paragraphs = [
        " ".join(f"Paragraph {p} makes point {s} about retrieval." for s in range(6))
        for p in range(4)
    ]  # ~60 tokens each
    page = Page("doc.txt", "doc.txt", 1, "\n\n".join(paragraphs))
    chunks = chunk_pages([page], tokenizer, max_tokens=150, overlap=0)
    assert [c.text for c in chunks] == [
        "\n\n".join(paragraphs[:2]),
        "\n\n".join(paragraphs[2:]),
    ]


def test_neighbouring_chunks_overlap_by_whole_sentences(tokenizer):
    sentences = [f"Fact number {i} is about topic {i}." for i in range(60)]
    page = Page("doc.txt", "doc.txt", 1, " ".join(sentences))
    chunks = chunk_pages([page], tokenizer, max_tokens=64, overlap=24)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        shared = [s for s in sentences if s in before.text and s in after.text]
        assert shared, (before.text, after.text)
        assert after.text.startswith(shared[0])
        assert sum(count(tokenizer, s) for s in shared) <= 24
        assert before.text.endswith(shared[-1])
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sentences)


def test_an_over_long_sentence_is_split_by_tokens(tokenizer):
    words = " ".join(f"word{i}" for i in range(400))  # one 'sentence', ~1,600 tokens
    giant = "x" * 3000  # one 'word' longer than any chunk
    page = Page("doc.txt", "doc.txt", 1, f"{words}\n\n{giant}")
    chunks = chunk_pages([page], tokenizer, max_tokens=64, overlap=8)
    assert all(c.n_tokens <= 64 for c in chunks)
    joined = " ".join(c.text for c in chunks)
    assert all(f"word{i}" in joined for i in range(400))
    assert sum(c.text.count("x") for c in chunks) >= 3000


def test_chunks_never_span_documents_and_duplicates_are_dropped(tokenizer):
    a = [Page("a.md", "a.md", 1, "Alpha text about apples."), Page("a.md", "a.md", 2, "More.")]
    b = [Page("b.md", "b.md", 1, "Beta text about bananas.")]
    copy = [Page("c.md", "c.md", 1, "Alpha text about apples.\n\nMore.")]
    chunks = chunk_pages(a + b + copy, tokenizer, max_tokens=64, overlap=8)
    assert [(c.doc_id, c.page_start, c.page_end) for c in chunks] == [
        ("a.md", 1, 2),
        ("b.md", 1, 1),
    ]
    assert "Beta" not in chunks[0].text and "Alpha" not in chunks[1].text


def test_records_and_the_two_column_paper_chunk_in_order(tokenizer):
    pages = read_document(RAGAS_PDF)
    chunks = chunk_pages(pages, tokenizer, max_tokens=128, overlap=16)
    text = " ".join(flat(c.text) for c in chunks)
    assert text.index("two fundamental limitations") < text.index("usefulness of retrieval")
    assert all(c.doc_id == "RAGAS_2309.15217.pdf" for c in chunks)
    assert chunks[-1].page_end == 8


@pytest.mark.parametrize(("max_tokens", "overlap"), [(15, 0), (64, 64), (64, 100), (64, -1)])
def test_bad_settings_are_rejected(tokenizer, max_tokens, overlap):
    page = Page("d", "d", 1, "Some text.")
    with pytest.raises(ValueError, match=r"max_tokens|overlap"):
        chunk_pages([page], tokenizer, max_tokens=max_tokens, overlap=overlap)


def test_hard_wrapped_lines_never_split_a_sentence(tokenizer):
    """Markdown and text files wrap prose at a fixed width: a line break is not a boundary."""
    sentences = [f"Sentence {i} talks about\nthe topic number {i} today." for i in range(12)]
    page = Page("a.md", "a.md", 1, "# Notes\n\n" + " ".join(sentences))
    chunks = chunk_pages([page], tokenizer, max_tokens=30, overlap=0)
    assert chunks[0].text.startswith("# Notes")
    for chunk in chunks[1:]:
        assert chunk.text.startswith("Sentence") and chunk.text.endswith("today."), chunk.text
    assert "talks about the topic" in chunks[1].text
