"""Search a published collection from an app, the way its chunks were embedded.

An app that opens the Chroma collection itself has to embed its queries exactly as ragtune
embedded the chunks: the same model, query prompt and Matryoshka dimension. The collection's
metadata records all three; a `Retriever` reads them, loads the model once, and follows the
alias when a publish swaps it, so a long-running app serves each new version without a restart.

    retriever = Retriever.open("docs", workspace="workspace")
    for hit in retriever.search("What is confabulation?", k=3):
        print(hit.score, hit.source, hit.page_start, hit.text[:80])
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.learn.querylog import LoggedSearch, QueryLog
from tasks.models import cached_model, local_model
from tasks.retrieval import rerank as reranking
from tasks.store import chroma
from tasks.store.chroma import Hit, StoreError
from tasks.workspace import Workspace

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from tasks.llm.likelihood import QueryLikelihood

__all__ = ["Hit", "LiveVersion", "Retriever", "provenance"]

#: The most chunks one query may ask for, as the search flow allows.
MAX_K = 100


@dataclass(frozen=True)
class LiveVersion:
    """One published version and what its queries are embedded with. A swap replaces it whole,
    so a query never meets a new collection with the old model."""

    alias: str
    collection: Collection
    model: SentenceTransformer
    model_ref: str
    query_prompt: str
    dim: int

    @property
    def name(self) -> str:
        return self.collection.name

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        vectors = chroma.embed(self.model, queries, self.query_prompt, self.dim)
        return chroma.query_hits(self.collection, vectors, k)

    def describe(self) -> dict[str, Any]:
        """What `GET /health` reports: which version answers, with which model."""
        return {
            "alias": self.alias,
            "collection": self.name,
            "model": self.model_ref,
            "dim": self.dim,
            "chunks": self.collection.count(),
        }


def open_version(client: ClientAPI, alias: str, models_dir: Path | None = None) -> LiveVersion:
    """The version `alias` points to now, with its model loaded (once per process); a model
    folder that is not where the publish recorded it is looked for in `models_dir`."""
    collection = chroma.resolve_alias(client, alias)
    meta = collection.metadata or {}
    model_ref = local_model(str(meta["model"]), models_dir)
    return LiveVersion(
        alias=alias,
        collection=collection,
        model=cached_model(model_ref),
        model_ref=model_ref,
        query_prompt=str(meta.get("query_prompt", "")),
        dim=int(meta["dim"]),
    )


class Retriever:
    """Top-k chunks of the collection behind `alias` in `client`'s store.

    The alias is re-read at most every `recheck_seconds` (0: before every query), so a swap
    is served from the next query after it is seen. Every search is appended to `querylog`
    (what `ragtune learn` learns from) unless it is None. `judge` re-ranks when a search asks
    for it (default: the bundled Gemma, loaded on first use). A model folder that is not where
    the publish recorded it is looked for in `models_dir` (`Retriever.open`: the workspace's).
    """

    def __init__(
        self,
        client: ClientAPI,
        alias: str = "docs",
        *,
        querylog: QueryLog | None = None,
        recheck_seconds: float = 1.0,
        judge: QueryLikelihood | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.models_dir = models_dir
        self.alias = chroma.check_name(alias, "alias")
        self.querylog = querylog
        self.recheck_seconds = float(recheck_seconds)
        self.judge = judge
        self._lock = threading.Lock()
        self._encoding = threading.Lock()
        self._judging = threading.Lock()
        self._live: LiveVersion | None = None
        self._checked = -math.inf

    @classmethod
    def open(
        cls,
        alias: str = "docs",
        *,
        workspace: str | Path = "workspace",
        chroma_path: str | Path | None = None,
        chroma_host: str | None = None,
        chroma_port: int = 8000,
        chroma_token_env: str | None = None,
        log_queries: bool | None = None,
        recheck_seconds: float = 1.0,
    ) -> Retriever:
        """A retriever on the store the flows use with the same settings. Queries go to the
        workspace's query log unless `log_queries` is off (blank: on for the embedded store,
        off for a Chroma server, as `ragtune search` does)."""
        client = chroma.open_store(
            workspace, chroma_path, chroma_host, chroma_port, chroma_token_env
        )
        logs = log_queries if log_queries is not None else not chroma_host
        ws = Workspace.at(workspace)
        return cls(
            client,
            alias,
            querylog=QueryLog(ws.querylog_dir) if logs else None,
            recheck_seconds=recheck_seconds,
            models_dir=ws.models_dir,
        )

    def live(self) -> LiveVersion:
        """The version now behind the alias (`AliasNotFound` while nothing is published)."""
        current = self._live
        if current is not None and time.monotonic() - self._checked < self.recheck_seconds:
            return current
        with self._lock:
            if self._live is None or chroma.list_versions(self.client, self.alias)[0] != (
                self._live.name
            ):
                self._live = open_version(self.client, self.alias, self.models_dir)
            self._checked = time.monotonic()
            return self._live

    def search(self, query: str, k: int = 5, rerank: int = 0) -> list[Hit]:
        """The top `k` chunks for `query`; with `rerank`, the judge reorders the top `rerank`
        first (`score` stays the cosine similarity)."""
        return self.search_many([query], k, rerank)[0]

    def search_many(
        self, queries: Sequence[str], k: int | Sequence[int] = 5, rerank: int = 0
    ) -> list[list[Hit]]:
        """`search` for each query, encoded as one batch; `k` may differ per query."""
        ks = [k] * len(queries) if isinstance(k, int) else [int(n) for n in k]
        check_request(queries, ks, rerank)
        if not queries:
            return []
        live, ranked = self.retrieve(queries, [max(n, rerank) for n in ks])
        ranked = [
            self.rerank_head(query, hits, rerank)[:n]
            for query, hits, n in zip(queries, ranked, ks, strict=True)
        ]
        self.record(live, queries, ranked)
        return ranked

    def retrieve(
        self, queries: Sequence[str], ks: Sequence[int]
    ) -> tuple[LiveVersion, list[list[Hit]]]:
        """The live version and each query's top `ks` hits from it, encoded as one batch; no
        re-ranking, nothing logged. One thread encodes at a time: tokenizers are not safe to
        share between threads."""
        with self._encoding:
            live = self.live()
            ranked = live.search(queries, max(ks))
        return live, [hits[:n] for hits, n in zip(ranked, ks, strict=True)]

    def rerank_head(self, query: str, hits: list[Hit], rerank: int) -> list[Hit]:
        """`hits` with the top `rerank` reordered by the judge (unchanged for 0)."""
        if not rerank:
            return hits
        head = hits[:rerank]
        with self._judging:
            order = reranking.rerank(
                query, [h.text for h in head], [h.score for h in head], self.judge
            )
        return reranking.reorder_head(head, order) + hits[rerank:]

    def record(
        self, live: LiveVersion, queries: Sequence[str], ranked: Sequence[Sequence[Hit]]
    ) -> None:
        """Append these searches to the query log (nothing when logging is off)."""
        if self.querylog is not None:
            self.querylog.append(
                LoggedSearch(query, self.alias, live.name, [(h.id, h.score) for h in hits])
                for query, hits in zip(queries, ranked, strict=True)
            )

    def sibling(self, alias: str) -> Retriever:
        """A retriever on another alias of the same store, logging to the same log."""
        return Retriever(
            self.client,
            alias,
            querylog=self.querylog,
            recheck_seconds=self.recheck_seconds,
            judge=self.judge,
            models_dir=self.models_dir,
        )


def provenance(hit: Hit) -> dict[str, Any]:
    """Where a hit comes from, as framework adapters put it in a document's metadata."""
    return {
        "chunk_id": hit.id,
        "source": hit.source,
        "page_start": hit.page_start,
        "page_end": hit.page_end,
        "score": hit.score,
    }


def check_request(queries: Sequence[str], ks: Sequence[int], rerank: int) -> None:
    """Refuse what no search can answer, naming the field (`StoreError`)."""
    if len(ks) != len(queries):
        raise StoreError(f"{len(queries)} queries but {len(ks)} values of k")
    for n, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            raise StoreError(f"query {n} is empty" if len(queries) > 1 else "the query is empty")
    for n in ks:
        if not 1 <= n <= MAX_K:
            raise StoreError(f"k={n} is out of range: ask for 1 to {MAX_K} chunks")
    if not 0 <= rerank <= MAX_K:
        raise StoreError(f"rerank={rerank} is out of range: 0 (off) to {MAX_K}")
