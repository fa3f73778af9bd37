"""Reading documents: real PDFs in, clean pages with provenance out; bad files named, not fatal."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
from pypdf import PdfReader, PdfWriter

from tasks.ingest.documents import (
    DocumentError,
    NoDocumentsError,
    Page,
    Skipped,
    clean_pdf_pages,
    find_documents,
    read_document,
    read_documents,
    read_records,
)
from tests.conftest import FIXTURES, NIST_PDF, read_nist

RAGAS_PDF = FIXTURES / "RAGAS_2309.15217.pdf"


@pytest.fixture(scope="module")
def nist_pages() -> list[Page]:
    return list(read_nist())


@pytest.fixture(scope="module")
def ragas_pages() -> list[Page]:
    return read_document(RAGAS_PDF, RAGAS_PDF.parent)


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# --- provenance and cleaning on real PDFs ------------------------------------------------------


def test_pdf_pages_are_numbered_from_one_with_relative_ids(nist_pages):
    assert [p.page for p in nist_pages] == list(range(1, 65))
    assert {p.doc_id for p in nist_pages} == {"NIST.AI.600-1.pdf"}
    assert {p.source for p in nist_pages} == {"NIST.AI.600-1.pdf"}


def test_ligatures_are_normalised(nist_pages):
    """NIST is set with fi/ffi ligatures (U+FB01...): NFKC turns them into plain letters."""
    text = " ".join(p.text for p in nist_pages)
    assert "\ufb01" not in text and "\ufb03" not in text
    assert "artificial intelligence" in text


def test_nist_running_page_numbers_are_removed(nist_pages):
    """NIST's running header is the printed page number, alone on the first line of pages 5-64
    (checked on the raw pypdf text of a sample of pages first, so the test cannot pass
    vacuously)."""
    reader = PdfReader(NIST_PDF)
    for index in range(4, 64, 6):
        raw = reader.pages[index].extract_text()
        first_line = next(line.strip() for line in raw.splitlines() if line.strip())
        assert first_line == str(index - 3)
    for page in nist_pages[4:]:
        first = page.text.split("\n", 1)[0]
        assert first.strip() != str(page.page - 4), page.page
        assert not re.fullmatch(r"\d+", first.strip())
    # and the body around where it stood reads on: page 6 starts with its first sentence
    assert nist_pages[5].text.startswith("This work was informed by public feedback")


def test_two_column_paper_reads_column_by_column(ragas_pages):
    """RAGAS is set in two columns: consecutive sentences of the left column must come out
    adjacent, and the left column must come before the right one."""
    page1 = flat(ragas_pages[0].text)
    assert "after they were trained. Second, even the largest models struggle to memorise" in page1
    left_end = page1.index("thus making it possible to use retrieval-augmented strategies")
    right_start = page1.index("While the usefulness of retrieval-augmented strategies is clear")
    assert left_end < right_start


def test_words_hyphenated_at_line_ends_are_joined(ragas_pages, nist_pages):
    """`fundamen-/tal` (typesetting) becomes one word; `retrieval-/augmented` stays a compound
    because the paper spells it so elsewhere; NIST wraps only after real compounds."""
    raw = PdfReader(RAGAS_PDF).pages[0].extract_text()
    assert "fundamen-\ntal" in raw and "retrieval-\naugmented" in raw
    page1 = flat(ragas_pages[0].text)
    assert "two fundamental limitations" in page1
    assert "fundamen-" not in page1
    assert "use retrieval-augmented strategies" in page1
    nist = flat(" ".join(p.text for p in nist_pages))
    assert "red-teaming" in nist and "redteaming" not in nist
    assert "third-party" in nist and "thirdparty" not in nist


def test_hyphens_within_a_line_are_kept_and_line_end_breaks_joined():
    pages = clean_pdf_pages(
        ["Good retrie-\nval needs well-known facts.\nRetrieval is the topic of this text here."]
    )
    assert "retrieval needs well-known facts" in flat(pages[0])


def test_running_headers_footers_and_page_numbers_are_dropped():
    """Lines that repeat (digits aside) at the top or bottom of most pages go; body lines that
    repeat the same way in the middle of the page stay."""
    body = [
        "The quarterly revenue grew in every region this year.",
        "Costs fell as the plant in Ohio reached full capacity.",
        "The board approved the plan for the next two years.",
    ]
    raw = [
        f"ACME Corp Annual Report 2021\nChapter {i}\n{body[i % 3]} Item {i}.\n"
        f"More text on page {i} here.\n{body[(i + 1) % 3]}\n{body[(i + 2) % 3]}\n"
        f"Page {i + 1} of 6"
        for i in range(6)
    ]
    cleaned = clean_pdf_pages(raw)
    for i, text in enumerate(cleaned):
        assert "ACME Corp" not in text
        assert "Chapter" not in text
        assert "Page" not in text
        assert f"Item {i}." in text
        assert f"More text on page {i} here." in text


@pytest.mark.parametrize(
    ("last_line", "dropped"),
    [("12", True), ("Page 3 of 64", True), ("3 / 10", True), ("iv", True), ("civil", False)],
)
def test_bare_page_numbers_are_dropped_even_on_a_single_page(last_line, dropped):
    [text] = clean_pdf_pages([f"A body sentence that is long enough to be a line.\n{last_line}"])
    assert (last_line not in text) is dropped


def test_a_line_repeated_on_few_pages_is_kept():
    raw = [f"Results\nBody text of page {i} goes here, long enough." for i in range(6)]
    raw[0] = "Summary\n" + raw[0]
    cleaned = clean_pdf_pages(raw)
    assert cleaned[0].startswith("Summary")


# --- Markdown and text -----------------------------------------------------------------------


def test_markdown_keeps_text_and_drops_markup(tmp_path):
    (tmp_path / "notes.md").write_text(
        "---\ntitle: Notes\n---\n# Chunking *guide*\n\nSee [the docs](https://x.org) and "
        "**bold** `code`.\n\n![diagram](d.png)\n\n```python\nprint('kept')\n```\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted line\n",
        encoding="utf-8",
    )
    [page] = read_document(tmp_path / "notes.md", tmp_path)
    assert page.doc_id == "notes.md" and page.page == 1
    assert page.text.split("\n\n")[0] == "Chunking guide"
    assert "See the docs and bold code." in page.text
    assert "print('kept')" in page.text
    assert "1 | 2" in page.text and "quoted line" in page.text
    for noise in ("---", "#", "**", "](", "```", "title: Notes", "|---"):
        assert noise not in page.text


def test_text_is_read_as_is_with_nested_relative_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("First para.\r\nStill first.\n\n\n\nSecond para.\n")
    [page] = read_document(tmp_path / "sub" / "a.txt", tmp_path)
    assert page.doc_id == page.source == "sub/a.txt"
    assert page.text == "First para.\nStill first.\n\nSecond para."


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_text_in_another_encoding_is_decoded_with_its_accents_and_the_encoding_reported(
    tmp_path, encoding
):
    text = (
        "Le café de la gare reçoit les voyageurs matinaux. Après le déjeuner, "
        "le maître d'hôtel sert une crème brûlée et un thé glacé à la terrasse.\n"
    )
    (tmp_path / "menu.txt").write_bytes(text.encode(encoding))

    pages, skipped = read_documents([tmp_path])

    assert skipped == []
    [page] = pages
    assert page.text == text.strip()
    assert page.encoding is not None and page.encoding != "utf_8"


def test_utf8_text_reports_no_encoding(tmp_path):
    (tmp_path / "a.txt").write_text("Déjà vu.", encoding="utf-8")
    [page] = read_document(tmp_path / "a.txt", tmp_path)
    assert page.text == "Déjà vu." and page.encoding is None


def test_find_documents_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ["b.md", "a.txt", "sub/c.pdf", ".hidden.md", ".git/x.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = find_documents([tmp_path])
    assert [f.relative_to(root).as_posix() for f, root in found] == ["a.txt", "b.md", "sub/c.pdf"]
    assert find_documents([tmp_path]) == found
    with pytest.raises(DocumentError, match="no such file or folder"):
        find_documents([tmp_path / "missing"])


# --- bad input -------------------------------------------------------------------------------


def make_bad_files(folder) -> dict[str, str]:
    """Real broken inputs, made from the real paper; returns the reason each must get."""
    data = RAGAS_PDF.read_bytes()
    writer = PdfWriter(clone_from=RAGAS_PDF)
    writer.encrypt("secret", algorithm="AES-256")
    writer.write(folder / "locked.pdf")
    (folder / "truncated.pdf").write_bytes(data[: len(data) // 2])
    (folder / "empty.txt").write_bytes(b"")
    blank = PdfWriter()
    blank.add_blank_page(612, 792)
    blank.write(folder / "scan.pdf")
    (folder / "report.docx").write_bytes(b"PK\x03\x04 not really a docx")
    (folder / "moved.pdf").symlink_to(folder / "was-here.pdf")
    return {
        "locked.pdf": "encrypted: needs a password",
        "truncated.pdf": "not a readable PDF: ",
        "empty.txt": "empty file",
        "scan.pdf": "no extractable text (scanned or image-only?)",
        "report.docx": "unsupported file type '.docx'",
        "moved.pdf": f"broken symbolic link to {folder / 'was-here.pdf'}",
    }


def test_each_bad_file_is_reported_and_the_good_ones_are_read(tmp_path):
    expected = make_bad_files(tmp_path)
    shutil.copy(RAGAS_PDF, tmp_path / "ragas.pdf")
    (tmp_path / "notes.md").write_text("# Notes\n\nA good note.\n")
    seen: list[tuple[int, int]] = []

    pages, skipped = read_documents([tmp_path], progress=lambda d, t: seen.append((d, t)))

    assert {p.doc_id for p in pages} == {"ragas.pdf", "notes.md"}
    assert len([p for p in pages if p.doc_id == "ragas.pdf"]) == 8
    reasons = {s.source: s.reason for s in skipped}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert seen[-1] == (8, 8)


def test_all_files_bad_raises_no_documents_error_listing_each(tmp_path):
    expected = make_bad_files(tmp_path)
    with pytest.raises(NoDocumentsError) as info:
        read_documents([tmp_path])
    message = str(info.value)
    for name, reason in expected.items():
        assert f"{name}: {reason}" in message


def test_an_empty_folder_raises_no_documents_error(tmp_path):
    with pytest.raises(NoDocumentsError, match="no files found"):
        read_documents([tmp_path])


def test_document_error_names_the_file():
    error = DocumentError("a/b.pdf", "empty file")
    assert (error.source, error.reason, str(error)) == (
        "a/b.pdf",
        "empty file",
        "a/b.pdf: empty file",
    )


# --- record files ----------------------------------------------------------------------------


def test_beir_corpus_reads_one_page_per_record_with_title(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    records = [
        {"_id": "4983", "title": "White matter imaging", "text": "Diffusion tensor MRI."},
        {"_id": "5836", "title": "", "text": "Induction of myelodysplasia."},
        {"_id": "7912", "title": "No text here"},
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pages, skipped = read_records(corpus)
    assert pages == [
        Page("4983", "corpus.jsonl#4983", 1, "White matter imaging\n\nDiffusion tensor MRI."),
        Page("5836", "corpus.jsonl#5836", 1, "Induction of myelodysplasia."),
    ]
    assert skipped == [Skipped("corpus.jsonl#7912", "missing text field 'text'")]


def test_jsonl_and_csv_with_custom_field_names(tmp_path):
    jsonl = tmp_path / "faq.jsonl"
    jsonl.write_text(
        json.dumps({"key": 1, "heading": "Refunds", "body": "Refunds take 5 days."})
        + "\n"
        + json.dumps({"key": 2, "body": "Shipping is free."})
        + "\n"
    )
    pages, skipped = read_records(jsonl, id_field="key", text_field="body", title_field="heading")
    assert [(p.doc_id, p.text) for p in pages] == [
        ("1", "Refunds\n\nRefunds take 5 days."),
        ("2", "Shipping is free."),
    ]
    assert skipped == []

    table = tmp_path / "kb.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["article", "content"])
        writer.writerow(["a-1", "Passwords expire after 90 days."])
        writer.writerow(["a-2", ""])
    pages, skipped = read_records(table, id_field="article", text_field="content", title_field=None)
    assert [(p.doc_id, p.source, p.text) for p in pages] == [
        ("a-1", "kb.csv#a-1", "Passwords expire after 90 days.")
    ]
    assert skipped == [Skipped("kb.csv#a-2", "empty text field 'content'")]


def test_record_file_without_the_id_field_is_an_error_naming_its_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "1", "text": "x"}) + "\n")
    with pytest.raises(DocumentError, match=r"docs.jsonl: no id field '_id' \(fields: id, text\)"):
        read_records(path)


def test_record_files_found_in_sources_are_read_as_records(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "text": "Alpha."}) + "\n" + json.dumps({"_id": "d2"}) + "\n"
    )
    (tmp_path / "readme.txt").write_text("Plain text.")
    pages, skipped = read_documents([tmp_path])
    assert [p.doc_id for p in pages] == ["d1", "readme.txt"]
    assert skipped == [Skipped("corpus.jsonl#d2", "missing text field 'text'")]
