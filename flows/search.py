"""Search: query the collection an alias points to, the way its documents were embedded.

The query is embedded with the live collection's own model, query prompt and dimension (all read
from the collection's metadata), so a reader needs nothing but the alias and the store.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefect import flow
from pydantic import Field

from flows.params import Params
from tasks.learn.querylog import append_query
from tasks.retrieval.rerank import reorder_head, rerank
from tasks.store import chroma
from tasks.text import shorten
from tasks.workspace import Workspace

if TYPE_CHECKING:
    from chromadb.api import ClientAPI


class StoreParams(Params):
    """Where the Chroma store is: a folder in the workspace, or a `chroma run` server.

    Every flow that reads or writes the store takes these fields, so one setting points the
    whole pipeline, publishing and search at the same place.
    """

    workspace: str = Field("workspace", description="Folder where every stage reads and writes.")
    chroma_path: str | None = Field(
        None, description="Embedded Chroma folder; blank: the workspace's chroma/."
    )
    chroma_host: str | None = Field(
        None, description="Chroma server host (`chroma run`); blank: the embedded store."
    )
    chroma_port: int = Field(8000, description="Chroma server port.")
    chroma_token_env: str | None = Field(
        None, description="Environment variable holding the Chroma server's auth token."
    )

    def store_settings(self) -> dict[str, Any]:
        """Just these fields, to hand on to another flow's parameters."""
        return self.model_dump(include=set(StoreParams.model_fields))

    def open_store(self) -> ClientAPI:
        """A server client when a host is set, else the embedded folder."""
        token = None
        if self.chroma_token_env:
            token = os.environ.get(self.chroma_token_env)
            if not token:
                raise chroma.StoreError(
                    f"chroma_token_env={self.chroma_token_env!r}, "
                    "but that environment variable is empty"
                )
        if self.chroma_host:
            return chroma.connect(host=self.chroma_host, port=self.chroma_port, token=token)
        return chroma.connect(self.chroma_path or Workspace.at(self.workspace).chroma_dir)


class SearchParams(StoreParams):
    query: str = Field(..., description="What to search for, in plain words.")
    k: int = Field(5, ge=1, le=100, description="How many chunks to return.")
    alias: str = Field("docs", description="Stable name of the published collection.")
    rerank: int = Field(
        0,
        ge=0,
        le=100,
        description="Let the bundled LLM read this many top chunks and reorder them with the "
        "retriever (about 1 s per 10 chunks on 2 CPU cores); 0: off.",
    )
    log_queries: bool | None = Field(
        None,
        description="Append the query and the chunk ids it returned to the workspace's "
        "querylog/ (what `ragtune learn` learns from; never sent to Prefect logs or "
        "artifacts); blank: on for the embedded store, off for a Chroma server.",
    )

    def logs_queries(self) -> bool:
        return self.log_queries if self.log_queries is not None else not self.chroma_host


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
