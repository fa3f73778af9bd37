"""What a judge said about (query, chunk): kept in SQLite so judging is paid for once.

Keyed by (query, chunk id, judge fingerprint): the query in its normalised form (so spacing and
case do not make a new query), the chunk by its content-hash id (so an edited chunk is a new
chunk), and the judge by everything that changes its scores. Each query's scores are committed
together as soon as they are known, so an interrupted `learn` resumes at the next query and a
second run over the same log asks the judge nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from tasks.text import folded


class Judgements:
    """A judgement cache in one SQLite file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgements ("
            " query TEXT NOT NULL, chunk_id TEXT NOT NULL, judge TEXT NOT NULL,"
            " score REAL NOT NULL, PRIMARY KEY (query, chunk_id, judge))"
        )
        self._db.commit()

    def scores(self, query: str, judge: str, chunk_ids: Iterable[str]) -> dict[str, float]:
        """The cached scores of those chunks for `query` by `judge` (missing ones left out)."""
        wanted = list(chunk_ids)
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT chunk_id, score FROM judgements WHERE query = ? AND judge = ? "
            f"AND chunk_id IN ({marks})",
            [folded(query), judge, *wanted],
        )
        return dict(rows.fetchall())

    def record(self, query: str, judge: str, scores: Mapping[str, float]) -> None:
        """Store one query's new scores in one transaction."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?)",
                [(folded(query), cid, judge, float(s)) for cid, s in scores.items()],
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self._db.close()
