"""Documents (PDF, Markdown, text, record files) → cleaned pages with provenance.

Every page remembers the document and the 1-based page it came from, so a chunk, a question and
a search hit can all be traced back to a page a person can open. Cleaning removes what would
pollute retrieval (running headers and footers, page numbers, words broken across lines,
ligatures) and keeps what chunking needs (paragraph breaks as blank lines).

A bad file never stops a run: it is reported by name with a specific reason and the rest goes
on. Only when nothing at all could be read is that an error.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.files import BadLine, read_jsonl

SUPPORTED = {".pdf", ".md", ".markdown", ".txt"}
#: Files of records (one document per row or line), read with `read_records`.
RECORD_TYPES = {".jsonl", ".csv"}


class DocumentError(Exception):
    """A file that cannot be read, with the reason in words a user can act on."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NoDocumentsError(DocumentError):
    """Nothing could be read from the given sources; the message lists every file and why."""


@dataclass(frozen=True)
class Page:
    doc_id: str
    source: str
    page: int
    text: str
    #: the text encoding detected for a text file that is not UTF-8; None for UTF-8 and PDFs
    encoding: str | None = None


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass(frozen=True)
class RecordFields:
    """Which fields of a record file hold the id, the text and (optionally) the title."""

    id_field: str = "_id"
    text_field: str = "text"
    title_field: str | None = "title"


# --------------------------------------------------------------------------------------------
# Finding files


def find_documents(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """Every file under the given files and folders, as (file, root it was found under).

    The root makes ids relative (`sub/notes.md`), so the same corpus gets the same ids wherever
    it lives. Hidden files and folders (`.git`, `.DS_Store`) are not documents and are left out;
    unsupported types are kept so that the reader can say they were skipped. A path that does
    not exist is an error: it is almost always a typo in the settings.
    """
    found: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DocumentError(str(raw), "no such file or folder")
        if path.is_file():
            found.setdefault(path.resolve(), path.resolve().parent)
            continue
        root = path.resolve()
        for file in sorted(root.rglob("*")):
            relative = file.relative_to(root)
            hidden = any(part.startswith(".") for part in relative.parts)
            # A broken link is kept, so that the reader reports it instead of it vanishing.
            if (file.is_file() or file.is_symlink()) and not hidden:
                found.setdefault(file, root)
    return sorted(found.items(), key=lambda item: (str(item[1]), item[0].relative_to(item[1])))


def _relative(path: Path, root: Path | None) -> str:
    if root is None:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().relative_to(root.resolve()).as_posix()


# --------------------------------------------------------------------------------------------
# Reading one document


def read_document(path: Path, root: Path | None = None) -> list[Page]:
    """Read one PDF, Markdown or text file into cleaned, non-empty pages.

    `doc_id` and `source` are the path relative to `root` (the file name when no root is given).
    Raises `DocumentError` with a specific reason when the file cannot be used.
    """
    path = Path(path)
    name = _relative(path, root)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise DocumentError(name, f"unsupported file type {kind}")
    if path.is_symlink() and not path.exists():
        raise DocumentError(name, f"broken symbolic link to {os.readlink(path)}")
    if path.stat().st_size == 0:
        raise DocumentError(name, "empty file")
    encoding = None
    if suffix == ".pdf":
        texts = _pdf_pages(path, name)
    else:
        text, encoding = _read_text(path, name)
        texts = [clean_markdown(text) if suffix in {".md", ".markdown"} else clean_text(text)]
    pages = [
        Page(doc_id=name, source=name, page=number, text=text, encoding=encoding)
        for number, text in enumerate(texts, start=1)
        if text.strip()
    ]
    if not pages:
        reason = "no extractable text (scanned or image-only?)" if suffix == ".pdf" else "no text"
        raise DocumentError(name, reason)
    return pages


def _read_text(path: Path, name: str) -> tuple[str, str | None]:
    """The text and, when it is not UTF-8, the encoding charset-normalizer detected (files
    saved by older Windows or Mac editors are often Windows-1252 or Latin-1)."""
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise DocumentError(name, "binary content, not text")
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        from charset_normalizer import from_bytes

        matches = list(from_bytes(data))
        if not matches:
            raise DocumentError(
                name, f"not UTF-8 (byte {exc.start}) and no other text encoding fits"
            ) from exc
        # Short texts often fit several code pages equally well (é is 0xE9 in cp1250 and
        # cp1252 alike, è is not); among equals, Windows-1252, the commonest legacy encoding.
        best = matches[0]
        equals = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
        chosen = next((m for m in equals if m.encoding == "cp1252"), best)
        return str(chosen), chosen.encoding


def _pdf_pages(path: Path, name: str) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    # pypdf logs every recoverable oddity of real-world PDFs as a warning; the outcome that
    # matters (readable or not) is reported per file instead.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(name, "encrypted: needs a password")
        raw = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except FileNotDecryptedError as exc:
        raise DocumentError(name, "encrypted: needs a password") from exc
    except Exception as exc:
        # A damaged file can fail anywhere inside the parser, with any exception type; each is
        # the same outcome for the user: this file cannot be read.
        raise DocumentError(name, f"not a readable PDF: {exc}") from exc
    return clean_pdf_pages(raw)


# --------------------------------------------------------------------------------------------
# Cleaning PDF text

_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"), None)
_ROMAN = r"(?=[ivxlc])c{0,3}(?:x[cl]|l?x{0,3})(?:i[xv]|v?i{0,3})"  # i to cccxcix: front matter
_PAGE_NUMBER = re.compile(
    rf"^(?:page\s*)?(?:\d{{1,4}}|{_ROMAN})(?:\s*(?:of|/)\s*\d{{1,4}})?$", re.IGNORECASE
)
_BULLET = re.compile(r"^(?:[•◦▪‣∙·●○■□➢►–—*-]|\(?\d{1,2}[.)]|\(?[a-z][.)])\s")
_LINE_END_HYPHEN = re.compile(r"(\w)-$")
_EDGE_LINES = 2


def clean_pdf_pages(raw_pages: list[str]) -> list[str]:
    """Clean the extracted text of every page of one PDF, document-wide.

    Running headers and footers can only be recognised across pages, and whether a hyphen at a
    line end is typesetting (`retrie-/val`) or a real compound (`third-/party`) is decided by
    how the rest of the same document spells the word.
    """
    pages = [_lines(text) for text in raw_pages]
    pages = _drop_running_lines(pages)
    joiner = _HyphenJoiner([line for lines in pages for line in lines])
    return [_paragraphs(lines, joiner) for lines in pages]


def _lines(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    # Dot leaders (tables of contents) cost a token per dot and carry no meaning.
    text = re.sub(r"(?:\. ?){4,}", " ", text)
    return [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]


def _edge_indexes(lines: list[str]) -> list[int]:
    filled = [i for i, line in enumerate(lines) if line]
    return sorted(set(filled[:_EDGE_LINES] + filled[-_EDGE_LINES:]))


def _edge_key(line: str) -> str:
    return re.sub(r"\d+", "#", line.lower())


def _drop_running_lines(pages: list[list[str]]) -> list[list[str]]:
    """Blank out page numbers and lines repeated near the top or bottom of most pages."""
    counts: Counter[str] = Counter()
    for lines in pages:
        counts.update({_edge_key(lines[i]) for i in _edge_indexes(lines)})
    # "Most pages" of the pages that have text: a blank cover or divider page is no evidence.
    with_text = sum(1 for lines in pages if any(lines))
    running = (
        {key for key, n in counts.items() if n >= max(3, with_text // 2 + 1)}
        if with_text >= 3
        else set()
    )
    cleaned = []
    for lines in pages:
        lines = list(lines)
        for i in _edge_indexes(lines):
            if _PAGE_NUMBER.match(lines[i]) or _edge_key(lines[i]) in running:
                lines[i] = ""
        cleaned.append(lines)
    return cleaned


class _HyphenJoiner:
    """Decides, for one document, whether `word-` + `next` at a line break is one word."""

    def __init__(self, lines: list[str]) -> None:
        self.words: set[str] = set()
        self.compounds: set[str] = set()
        for line in lines:
            self.words.update(w.lower() for w in re.findall(r"[^\W\d_]+", line))
            self.compounds.update(
                c.lower() for c in re.findall(r"[^\W\d_]+-[^\W\d_]+(?=\W|$)", line)
            )
        self.votes = Counter(
            self._known(a, b) for a, b in re.findall(r"([^\W\d_]+)-\n([a-z]+)", "\n".join(lines))
        )
        # Text set with hyphenation (two-column papers) breaks words; ragged-right text (reports)
        # only wraps after real compounds. The document's own known cases say which it is.
        self.default_join = self.votes["join"] >= self.votes["keep"]

    def _known(self, head: str, tail: str) -> str | None:
        if (head + tail).lower() in self.words:
            return "join"
        if f"{head}-{tail}".lower() in self.compounds:
            return "keep"
        return None

    def join(self, line: str, following: str) -> str:
        """Join `line` (ending in a hyphen) with the following line, as one word or a compound."""
        head = re.search(r"([^\W\d_]+)-$", line)
        tail = re.match(r"[a-z]+", following)
        if head and tail:
            verdict = self._known(head.group(1), tail.group(0))
            if verdict == "join" or (verdict is None and self.default_join):
                return line[:-1] + following
        return line + following


def _paragraphs(lines: list[str], joiner: _HyphenJoiner) -> str:
    """Lines → paragraphs separated by blank lines; wrapped lines joined into one line.

    Extracted PDF text rarely marks paragraphs with blank lines, so a bullet starts one and a
    line shorter than the page's usual line ends one when it reads like an ending: the last
    line of a justified paragraph (closing punctuation) or a heading (several words, the next
    line starting a new sentence). Extractors also emit stray short lines mid-sentence
    ("In" / "March 2020, ..."); those are neither, and are joined.
    """
    lengths = [len(line) for line in lines if len(line) > 1]
    usual = statistics.median(lengths) if lengths else 0
    following = _next_lines(lines)
    paragraphs: list[str] = []
    current = ""
    for line, after in zip(lines, following, strict=True):
        if not line:
            if current:
                paragraphs.append(current)
            current = ""
            continue
        if current and _BULLET.match(line):
            paragraphs.append(current)
            current = ""
        if not current:
            current = line
        elif _LINE_END_HYPHEN.search(current) and re.match(r"\w", line):
            current = joiner.join(current, line)
        else:
            current = f"{current} {line}"
        if _ends_paragraph(line, after, len(line) / usual if usual else 1.0):
            paragraphs.append(current)
            current = ""
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs)


def _next_lines(lines: list[str]) -> list[str]:
    """For each line, the next non-empty line (or "")."""
    following, nxt = [], ""
    for line in reversed(lines):
        following.append(nxt)
        if line:
            nxt = line
    return following[::-1]


def _ends_paragraph(line: str, after: str, share: float) -> bool:
    """`share`: the line's length relative to the page's usual line."""
    if share < 0.8 and re.search(r"[.!?:;][\"'”’)\]]*$", line):
        return True
    heading = len(line.split()) >= 2 and not re.search(r"[,\-–(]$", line)
    starts = not after or bool(re.match(r"[\"“(\[]?[A-Z0-9•]", after))
    return share < 0.6 and heading and starts


# --------------------------------------------------------------------------------------------
# Cleaning Markdown and plain text


def clean_text(text: str) -> str:
    """Plain text as is, with line endings and trailing spaces normalised."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_FRONT_MATTER = re.compile(r"\A---\n.*?\n(?:---|\.\.\.)\n", re.DOTALL)
_MD_INLINE = [
    (re.compile(r"<!--.*?-->", re.DOTALL), ""),
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image → its alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link → its text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # reference link → its text
    (re.compile(r"<(https?://[^>]+)>"), r"\1"),  # autolink → the address
    (re.compile(r"</?[A-Za-z][^>]*>"), ""),  # HTML tags
    (re.compile(r"`([^`]+)`"), r"\1"),
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),
    (re.compile(r"~~(.+?)~~"), r"\1"),
]


def clean_markdown(text: str) -> str:
    """Markdown → its readable text: headings, list items and code stay; markup goes."""
    text = clean_text(text)
    text = _FRONT_MATTER.sub("", text + "\n")
    for pattern, replacement in _MD_INLINE[:1]:
        text = pattern.sub(replacement, text)
    out: list[str] = []
    for line in text.split("\n"):
        stripped = line.strip()
        if re.fullmatch(r"(```|~~~).*", stripped):
            out.append("")  # a code block is a paragraph of its own
            continue
        if re.fullmatch(r"(?:[-*_]\s*){3,}|=+|-+", stripped):
            out.append("")  # horizontal rule, or the underline that ends a setext heading
            continue
        if re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", stripped):
            continue  # table separator row
        if re.match(r"^\[[^\]]+\]:\s*\S+", stripped):
            continue  # reference link definition
        heading = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:  # a heading is a paragraph of its own: chunks prefer to start there
            line = heading.group(1)
            out.append("")
        line = re.sub(r"^\s*(?:>\s?)+", "", line)
        if stripped.startswith("|") and stripped.endswith("|"):
            line = " | ".join(cell.strip() for cell in stripped.strip("|").split("|"))
        for pattern, replacement in _MD_INLINE[1:]:
            line = pattern.sub(replacement, line)
        out.append(line.rstrip())
        if heading:
            out.append("")
    return clean_text("\n".join(out))


# --------------------------------------------------------------------------------------------
# Record files (JSONL, CSV, BEIR corpus.jsonl)


def read_records(
    path: Path,
    id_field: str = "_id",
    text_field: str = "text",
    title_field: str | None = "title",
    root: Path | None = None,
) -> tuple[list[Page], list[Skipped]]:
    """One page per record of a JSONL or CSV file (a BEIR `corpus.jsonl` reads as is).

    A record without text is skipped and named by its id; a file whose records have no id
    field at all is a `DocumentError` that lists the fields it does have.
    """
    path = Path(path)
    name = _relative(path, root)
    suffix = path.suffix.lower()
    if suffix not in RECORD_TYPES:
        raise DocumentError(name, f"not a record file (expected {', '.join(sorted(RECORD_TYPES))})")
    if path.stat().st_size == 0:
        raise DocumentError(name, "empty file")
    rows = _jsonl_rows(path, name) if suffix == ".jsonl" else _csv_rows(path, name)
    pages: list[Page] = []
    skipped: list[Skipped] = []
    fields_seen: set[str] = set()
    any_id = False
    for where, row in rows:
        if isinstance(row, Skipped):
            skipped.append(row)
            continue
        fields_seen.update(row)
        record_id = row.get(id_field)
        if record_id is None or str(record_id).strip() == "":
            skipped.append(Skipped(f"{name}:{where}", f"no id field '{id_field}'"))
            continue
        any_id = True
        record_id = str(record_id).strip()
        source = f"{name}#{record_id}"
        text = row.get(text_field)
        if text is None:
            skipped.append(Skipped(source, f"missing text field '{text_field}'"))
            continue
        text = clean_text(str(text))
        if not text:
            skipped.append(Skipped(source, f"empty text field '{text_field}'"))
            continue
        title = clean_text(str(row.get(title_field) or "")) if title_field else ""
        pages.append(
            Page(
                doc_id=record_id,
                source=source,
                page=1,
                text=f"{title}\n\n{text}" if title else text,
            )
        )
    if not any_id and fields_seen:
        raise DocumentError(
            name, f"no id field '{id_field}' (fields: {', '.join(sorted(fields_seen))})"
        )
    if not pages and not skipped:
        raise DocumentError(name, "no records")
    return pages, skipped


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, dict | Skipped]]:
    for number, row in read_jsonl(path, encoding="utf-8-sig", strict=False):
        where = f"line {number}"
        if isinstance(row, BadLine):
            yield where, Skipped(f"{name}:{where}", f"invalid JSON: {row.reason}")
        elif not isinstance(row, dict):
            yield where, Skipped(f"{name}:{where}", "not a JSON object")
        else:
            yield where, row


def _csv_rows(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            # The header is line 1, so the first record is on line 2.
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield f"line {number}", {k: v for k, v in row.items() if k is not None}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DocumentError(name, f"not a readable CSV file: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Reading many


def read_documents(
    paths: Iterable[str | Path],
    progress: Callable[[int, int], None] | None = None,
    records: RecordFields | None = None,
) -> tuple[list[Page], list[Skipped]]:
    """Read every document under `paths`; bad files are skipped and reported, not fatal.

    `.jsonl` and `.csv` files are record files, read with `records` (BEIR field names by
    default). Raises `NoDocumentsError` when no page at all could be read.
    """
    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    found = find_documents(paths)
    records = records or RecordFields()
    pages: list[Page] = []
    skipped: list[Skipped] = []
    for done, (file, root) in enumerate(tqdm(found, desc="reading", unit="file", disable=None)):
        try:
            if file.suffix.lower() in RECORD_TYPES:
                read, bad = read_records(
                    file, records.id_field, records.text_field, records.title_field, root=root
                )
                pages.extend(read)
                skipped.extend(bad)
            else:
                pages.extend(read_document(file, root))
        except DocumentError as exc:
            skipped.append(Skipped(exc.source, exc.reason))
        except OSError as exc:
            skipped.append(Skipped(_relative(file, root), f"cannot open: {exc.strerror or exc}"))
        if progress is not None:
            progress(done + 1, len(found))
    if not pages:
        where = ", ".join(paths) or "(no paths)"
        if not found:
            raise NoDocumentsError(
                where, f"no files found (supported: {', '.join(sorted(SUPPORTED | RECORD_TYPES))})"
            )
        listing = "\n".join(f"  - {s.source}: {s.reason}" for s in skipped)
        raise NoDocumentsError(where, f"no document could be read:\n{listing}")
    return pages, skipped
