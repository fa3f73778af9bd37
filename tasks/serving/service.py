"""The search service: a `Retriever` over HTTP, for RAG apps in any language, and the door
through which their users' queries reach the query log that `ragtune learn` learns from.

`POST /search` answers a query, `GET /health` says which version answers and with which model,
`/docs` is the OpenAPI page. Queries that arrive together are encoded together: one worker takes
every query waiting when it is free, so under load the model sees batches (which a CPU computes
far faster per query than one at a time) and a lone query waits for nobody. Every search is
appended to the query log by the retriever's one appender.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, field_validator

from tasks.serving.retriever import MAX_K, LiveVersion, Retriever
from tasks.store import chroma
from tasks.store.chroma import AliasNotFound, Hit, StoreError

#: The token a request carries, if any: checked by the app, so a wrong one is a 401 too.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]

#: The longest a batch waits for the searches it expects: a client's turn between an answer and
#: its next query takes a few milliseconds, a second batch several times more.
GATHER_SECONDS = 0.02

#: Most queries one encode takes: beyond this a batch costs more latency than it saves.
DEFAULT_MAX_BATCH = 32


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=4000, description="What to search for.")
    k: int = Field(5, ge=1, le=MAX_K, description="How many chunks to return.")
    rerank: int = Field(
        0, ge=0, le=MAX_K, description="Let the LLM judge reorder this many top chunks; 0: off."
    )
    alias: str | None = Field(None, description="Which published collection; blank: the service's.")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is blank")
        return value

    @field_validator("alias")
    @classmethod
    def _usable_alias(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                chroma.check_name(value, "alias")
            except StoreError as exc:
                raise ValueError(str(exc)) from None
        return value


class SearchResponse(BaseModel):
    alias: str
    collection: str
    hits: list[Hit]


class Health(BaseModel):
    status: str
    alias: str
    collection: str
    model: str
    dim: int
    chunks: int
    #: searches of this alias since the service started, and the encodes that answered them
    searches: int
    batches: int


class QueryBatcher:
    """Searches answered in batches: each waits in a queue, and one worker takes all that are
    waiting (up to `max_batch`) whenever it is free, so batches form from the load itself.

    Closed-loop clients would otherwise split into groups that take turns (while one group's
    batch is encoded, the rest queue up and become the next batch). So the worker remembers how
    many searches were open at once during the last batch, and waits up to `gather_seconds` for
    that many before it encodes: the clients it just answered ask again within milliseconds. A
    lone client is never kept waiting, since only its own search was open.
    """

    def __init__(
        self,
        retriever: Retriever,
        max_batch: int = DEFAULT_MAX_BATCH,
        gather_seconds: float = GATHER_SECONDS,
    ) -> None:
        self.retriever = retriever
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.searches = 0
        self.batches = 0
        self._queue: asyncio.Queue[tuple[str, int, asyncio.Future[Any]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._open = 0
        self._peak = 0

    async def retrieve(self, query: str, k: int) -> tuple[LiveVersion, list[Hit]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(self._queue))
        done = asyncio.get_running_loop().create_future()
        self._open += 1
        self._peak = max(self._peak, self._open)
        await self._queue.put((query, k, done))
        self._arrived.set()
        try:
            return await done
        finally:
            self._open -= 1

    async def _gather(self, queue: asyncio.Queue[Any]) -> None:
        """Wait until as many searches wait as were open at once lately, or the time is up."""
        want = min(self._peak, self.max_batch)
        self._peak = self._open
        deadline = asyncio.get_running_loop().time() + self.gather_seconds
        while queue.qsize() + 1 < want:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _work(self, queue: asyncio.Queue[tuple[str, int, asyncio.Future[Any]]]) -> None:
        while True:
            batch = [await queue.get()]
            await self._gather(queue)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            queries, ks = [q for q, _, _ in batch], [k for _, k, _ in batch]
            self.searches += len(batch)
            self.batches += 1
            try:
                live, ranked = await asyncio.to_thread(self.retriever.retrieve, queries, ks)
            except Exception as exc:
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, _, done), hits in zip(batch, ranked, strict=True):
                if not done.done():
                    done.set_result((live, hits))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)


def create_app(
    retriever: Retriever, *, token: str | None = None, max_batch: int = DEFAULT_MAX_BATCH
) -> FastAPI:
    """The service for `retriever`'s alias (and any other alias a request names in its store).
    With `token`, every search and health check must carry `Authorization: Bearer <token>`."""
    batchers: dict[str, QueryBatcher] = {retriever.alias: QueryBatcher(retriever, max_batch)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers.values():
            await batcher.close()

    app = FastAPI(
        title="ragtune search",
        summary="Search the published collection with the model that embedded it.",
        lifespan=lifespan,
    )

    def authorised(credentials: Credentials) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "a bearer token is required: send `Authorization: Bearer <token>`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def batcher_for(alias: str | None) -> QueryBatcher:
        alias = alias or retriever.alias
        if alias not in batchers:
            try:
                chroma.list_versions(retriever.client, alias)
            except AliasNotFound as exc:
                raise HTTPException(404, f"alias: {exc}") from None
            batchers[alias] = QueryBatcher(retriever.sibling(alias), max_batch)
        return batchers[alias]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.exception_handler(StoreError)
    async def unavailable(request: Request, exc: StoreError) -> JSONResponse:
        # Nothing published yet (or the alias points at a missing version): try again later.
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.post("/search", dependencies=[Depends(authorised)])
    async def search(request: SearchRequest) -> SearchResponse:
        """The top `k` chunks for `query`, embedded the way the live collection was."""
        batcher = batcher_for(request.alias)
        engine = batcher.retriever
        live, hits = await batcher.retrieve(request.query, max(request.k, request.rerank))
        if request.rerank:
            hits = await asyncio.to_thread(engine.rerank_head, request.query, hits, request.rerank)
        hits = hits[: request.k]
        engine.record(live, [request.query], [hits])
        return SearchResponse(
            alias=engine.alias,
            collection=live.name,
            hits=hits,
        )

    @app.get("/health", dependencies=[Depends(authorised)])
    def health() -> Health:
        """Which version answers, with which model and dimension, over how many chunks."""
        own = batchers[retriever.alias]
        return Health(
            status="ok",
            **retriever.live().describe(),
            searches=own.searches,
            batches=own.batches,
        )

    return app
