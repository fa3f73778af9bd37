"""Nightly refresh: bring the published collection up to date with the documents.

New or changed documents are ingested, questions are generated for their new chunks only (the
rest come from the cache, ready for the next retrain), and the collection is re-published with
the model that is live now. No training, no evaluation: on an unchanged corpus every stage is
skipped or a no-op, and the run takes seconds.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.params import RefreshParams
from flows.pipeline import ingest_and_ask
from flows.publish import publish
from tasks.models import local_model
from tasks.store.chroma import AliasNotFound, resolve_alias
from tasks.workspace import Workspace


class RefreshResult(BaseModel):
    chunks: int
    new_llm_calls: int
    collection: str | None
    embedded: int
    reused: list[str]
    seconds: dict[str, float]


@flow(name="refresh", log_prints=True)
def refresh(params: RefreshParams | None = None) -> RefreshResult:
    """Ingest new or changed documents, ask about new chunks, re-publish with the live model."""
    p = (params or RefreshParams()).resolved()
    stages, chunked, asked = ingest_and_ask(p)
    model, dim = _live_model(p)
    published = stages.run("publish", publish, p.publish_params(p.publish, model=model, dim=dim))
    new_calls = 0 if "questions" in stages.reused else asked.llm_calls
    return RefreshResult(
        chunks=chunked.chunks,
        new_llm_calls=new_calls,
        collection=published.collection,
        embedded=published.embedded,
        reused=stages.reused,
        seconds=stages.seconds,
    )


def _live_model(p: RefreshParams) -> tuple[str | None, int | None]:
    """The model and dimension readers use now; before the first publish, the publish
    flow's own default (the newest tuned model at full width)."""
    client = p.open_store()
    try:
        metadata = resolve_alias(client, p.publish.alias).metadata or {}
    except AliasNotFound:
        return None, None
    ref = metadata.get("model")
    moved = local_model(str(ref), Workspace.at(p.workspace).models_dir) if ref else None
    return moved, metadata.get("dim")
