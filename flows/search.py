"""Search: query the collection an alias points to, the way its documents were embedded.

The query is embedded with the live collection's own model, query prompt and dimension (all read
from the collection's metadata), so a reader needs nothing but the alias and the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from prefect import flow

from flows.params import SearchParams
from tasks.serving.retriever import Retriever
from tasks.store import chroma
from tasks.text import shorten


def format_hits(hits: Iterable[chroma.Hit | Mapping[str, Any]], width: int = 160) -> str:
    """Ranked hits as terminal lines: rank, score, source and pages, a one-line snippet."""
    lines = []
    for rank, hit in enumerate(hits, start=1):
        row = asdict(hit) if isinstance(hit, chroma.Hit) else dict(hit)
        pages = (
            f"p.{row['page_start']}"
            if row["page_start"] == row["page_end"]
            else f"p.{row['page_start']}-{row['page_end']}"
        )
        snippet = shorten(str(row["text"]), width)
        lines.append(f"{rank:>2}. {row['score']:.3f}  {row['source']} {pages}\n    {snippet}")
    return "\n".join(lines) if lines else "(no hits)"


@flow(name="search", log_prints=True)
def search(params: SearchParams) -> list[dict[str, Any]]:
    """Embed the query like the live collection's documents and return the top k chunks,
    reordered by the LLM judge when `rerank` is set (`score` stays the cosine similarity).
    The query goes to the workspace's query log unless `log_queries` is off, and never into
    this run's logs: only the hits are printed."""
    retriever = Retriever.open(
        params.alias, **params.store_settings(), log_queries=params.log_queries
    )
    hits = retriever.search(params.query, params.k, params.rerank)
    print(format_hits(hits))
    return [asdict(hit) for hit in hits]
