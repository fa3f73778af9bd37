"""Search: query the collection an alias points to, the way its documents were embedded.

The query is embedded with the live collection's own model, query prompt and dimension (all read
from the collection's metadata), so a reader needs nothing but the alias and the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefect import flow

from flows.params import SearchParams
from tasks.learn.querylog import append_query
from tasks.retrieval.rerank import reorder_head, rerank
from tasks.store import chroma
from tasks.text import shorten
from tasks.workspace import Workspace

if TYPE_CHECKING:
    pass


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
    client = params.open_store()
    hits = chroma.search(client, params.alias, params.query, k=max(params.k, params.rerank))
    if params.rerank:
        top = hits[: params.rerank]
        hits = reorder_head(
            hits, rerank(params.query, [h.text for h in top], [h.score for h in top])
        )
    hits = hits[: params.k]
    if params.logs_queries():
        append_query(
            Workspace.at(params.workspace).querylog_dir,
            params.query,
            alias=params.alias,
            collection=chroma.resolve_alias(client, params.alias).name,
            hits=[(hit.id, hit.score) for hit in hits],
        )
    print(format_hits(hits))
    return [asdict(hit) for hit in hits]
