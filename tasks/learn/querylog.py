"""The queries users really ask: a log the search flow appends to, and the logs users bring.

The log is the raw material of `learn`: real queries, no labels. It lives in the workspace
(`querylog/queries.jsonl`, one JSON object a line) and nowhere else: never in a Prefect log or
artifact, since queries can be personal. Each search is one line, written with a single
`write` to a file opened for appending, so concurrent searches do not interleave their lines.
"""

from __future__ import annotations

import csv
import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.files import append_jsonl, read_jsonl
from tasks.text import folded

LOG_NAME = "queries.jsonl"


@dataclass(frozen=True)
class LoggedSearch:
    """One search as the log keeps it: the query, where it was asked, what it returned."""

    query: str
    alias: str
    collection: str
    hits: Sequence[tuple[str, float]]

    def record(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "alias": self.alias,
            "collection": self.collection,
            "hits": [{"id": i, "score": round(float(score), 6)} for i, score in self.hits],
        }


class QueryLog:
    """The query log in `folder`, written by one appender: a lock orders the writes of this
    process's threads (a search service answers many requests at once) and each batch of
    searches is one append-mode `write`, so other processes' lines never interleave with them."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOG_NAME
        self._lock = threading.Lock()

    def append(self, searches: Iterable[LoggedSearch]) -> None:
        records = [search.record() for search in searches]
        with self._lock:
            # Queries are the users' words: the log is readable by its owner only.
            append_jsonl(self.path, records, mode=0o600)


def read_queries(path: str | os.PathLike[str], field: str = "query") -> list[str]:
    """Query texts from a log: ragtune's own JSONL, any JSONL or CSV with a `field` column,
    or plain text with one query per line (any other suffix). Blank entries are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no query log at {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = [_field(row, field, path, n) for n, row in read_jsonl(path)]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if field not in (reader.fieldnames or []):
                raise ValueError(
                    f"{path} has no column {field!r} (columns: {reader.fieldnames}); "
                    "name the query column with queries_field"
                )
            texts = [row[field] or "" for row in reader]
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    return [text.strip() for text in texts if text and text.strip()]


def unique_queries(queries: Iterable[str]) -> list[str]:
    """Queries in first-seen order, each counted once however it is spaced or cased."""
    seen: dict[str, str] = {}
    for query in queries:
        key = folded(query)
        if key and key not in seen:
            seen[key] = " ".join(query.split())
    return list(seen.values())


def is_held_out(query: str, share: float, seed: int = 42) -> bool:
    """Whether `query` belongs to the seeded held-out share of the log. Decided by a hash of
    the normalised text, so a query stays on its side however the log grows or is reordered,
    and a retrain never sees a query an earlier report was measured on."""
    if not 0 <= share < 1:
        raise ValueError(f"the held-out share must be in [0, 1), got {share}")
    digest = hashlib.sha256(f"{seed}\0{folded(query)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _field(row: Any, field: str, path: Path, n: int) -> str:
    if not isinstance(row, dict) or field not in row:
        raise ValueError(
            f"{path}, line {n}: no field {field!r}; name the query field with queries_field"
        )
    return str(row[field] or "")
