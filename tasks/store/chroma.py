"""Chroma: versioned collections behind an alias, idempotent upserts, search.

Readers must never see half a collection, and a re-run must never pay for embeddings twice.
So every publish writes a *new* collection named after what it holds (corpus, model, dimension
and a fingerprint of the chunk-id set), checks it is complete, and only then points a stable
alias at it. Chroma has no alias feature, so the alias is a record in a small registry
collection (`ragtune__aliases`) inside Chroma itself: it works the same embedded or against a
server, and swapping it is one single-record upsert.

Embeddings are always computed here and passed explicitly (no Chroma embedding function), and
each collection's metadata records the model, dimension and query prompt, so `search` embeds a
query exactly the way the collection's documents were embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from tasks.files import hash_file_into
from tasks.models import BUNDLED, cached_model, model_tag, resolve_model
from tasks.progress import Progress
from tasks.store.locks import OnWait, publish_lock
from tasks.vectors import unit_rows
from tasks.workspace import fingerprint

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

REGISTRY = "ragtune__aliases"
#: Collection names: 3-512 characters of [a-zA-Z0-9._-], alphanumeric at both ends.
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]*$")
#: The registry holds no vectors, but Chroma requires one per record.
_REGISTRY_VECTOR = [1.0]
#: Default rows per upsert: small enough for frequent progress, large enough that Chroma's
#: per-call overhead stays negligible (never above the client's max batch size).
DEFAULT_BATCH = 512
_META_KEYS = ("doc_id", "source", "page_start", "page_end", "n_tokens")

#: texts -> their document vectors, made elsewhere (e.g. on Dask workers)
EmbedTexts = Callable[[list[str]], np.ndarray]


class StoreError(RuntimeError):
    """A publish or search problem, with the fix in the message."""


class AliasNotFound(StoreError):
    """No collection is published under the alias (yet)."""


@dataclass
class Hit:
    id: str
    score: float
    source: str
    page_start: int
    page_end: int
    text: str


class PublishResult(BaseModel):
    """What a publish did; also the publish flow's result (a pydantic model, so Prefect can
    store it)."""

    alias: str
    collection: str
    count: int
    embedded: int
    copied: int
    previous: str | None
    swapped: bool
    #: never-aliased versions (left half-written by a killed publish) that this one removed
    removed: list[str] = []


# --- connecting -------------------------------------------------------------------------------


def connect(
    path: str | Path | None = None,
    host: str | None = None,
    port: int = 8000,
    token: str | None = None,
) -> ClientAPI:
    """An embedded store at `path` (default: the default workspace's chroma dir), or the
    `chroma run` server at `host:port` when a host is given (with a bearer token if set)."""
    import chromadb
    from chromadb.config import Settings

    if host:
        settings = Settings(anonymized_telemetry=False)
        if token:
            settings = Settings(
                anonymized_telemetry=False,
                chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
                chroma_client_auth_credentials=token,
            )
        try:
            client = chromadb.HttpClient(host=host, port=int(port), settings=settings)
            client.heartbeat()
        except Exception as exc:
            raise StoreError(
                f"cannot reach the Chroma server at http://{host}:{port} ({exc}); start one with "
                f"`chroma run --path DIR --host {host} --port {port}` or check chroma_host/"
                f"chroma_port"
            ) from exc
        return client
    if path is None:
        from tasks.workspace import Workspace

        path = Workspace.at().chroma_dir
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(str(path), settings=Settings(anonymized_telemetry=False))


def open_store(
    workspace: str | Path = "workspace",
    chroma_path: str | Path | None = None,
    chroma_host: str | None = None,
    chroma_port: int = 8000,
    chroma_token_env: str | None = None,
) -> ClientAPI:
    """The store the flows' store settings name: a `chroma run` server when a host is set
    (its token read from the environment variable `chroma_token_env`), else the embedded
    folder `chroma_path`, by default the workspace's chroma/."""
    from tasks.workspace import Workspace

    token = None
    if chroma_token_env:
        token = os.environ.get(chroma_token_env)
        if not token:
            raise StoreError(
                f"chroma_token_env={chroma_token_env!r}, but that environment variable is empty"
            )
    if chroma_host:
        return connect(host=chroma_host, port=chroma_port, token=token)
    return connect(chroma_path or Workspace.at(workspace).chroma_dir)


def where(client: ClientAPI) -> str:
    """A human description of the store, for error messages."""
    settings = client.get_settings()
    if settings.is_persistent and settings.persist_directory:
        return str(settings.persist_directory)
    return f"http://{settings.chroma_server_host}:{settings.chroma_server_http_port}"


# --- naming -----------------------------------------------------------------------------------


def check_name(value: str, setting: str) -> str:
    if not _NAME.match(value) or len(value) > 200 or "__" in value:
        raise StoreError(
            f"{setting}={value!r} is not usable in a Chroma collection name: use letters, "
            f"digits, '.', '-' or '_' (no '__'), starting with a letter or digit, at most 200"
        )
    return value


def version_name(
    corpus: str,
    model_ref: str,
    dim: int,
    chunk_ids: Iterable[str],
    model_id: str | None = None,
) -> str:
    """`<corpus>__<model tag>-<model hash>__d<dim>__<chunk-set hash>`.

    The chunk-set hash makes a changed corpus a new collection, so a live one is never mutated.
    `model_id` identifies the weights (and document prompt) when a path alone does not: a
    retrained model saved to the same folder must not reuse the old embeddings.
    """
    check_name(corpus, "corpus")
    model_hash = fingerprint(model_id or model_ref)[:4]
    chunks_hash = fingerprint(sorted(set(chunk_ids)))[:5]
    return f"{corpus}__{model_tag(model_ref)}-{model_hash}__d{int(dim)}__{chunks_hash}"


def model_identity(model_ref: str) -> str:
    """A content hash of a model's weights, so that "same model" means same weights.

    Hashes the weight files of a local folder (bundled models resolve to one); a hub id that is
    not a local folder is identified by its name.
    """
    folder = Path(resolve_model(model_ref))
    if not folder.is_dir():
        return model_ref
    weights = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin"}
    )
    if not weights:
        return str(folder)
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weights)
    return _hash_files(stats)


@lru_cache(maxsize=16)
def _hash_files(stats: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by path, size and mtime, so a process hashes a given set of files once."""
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(Path(name).name.encode())
        hash_file_into(digest, Path(name))
    return digest.hexdigest()[:16]


def portable_ref(model_ref: str) -> str:
    """What to record as the model: bundled names and hub ids as given, folders absolute."""
    if model_ref in BUNDLED:
        return model_ref
    path = Path(model_ref).expanduser()
    return str(path.resolve()) if path.exists() else model_ref


# --- embedding --------------------------------------------------------------------------------


def embed(model: SentenceTransformer, texts: Sequence[str], prompt: str, dim: int) -> np.ndarray:
    """Encode, truncate to `dim` (Matryoshka) and re-normalise so cosine = dot product.

    `prompt` is passed explicitly (even when empty) so a model's default prompt never sneaks in.
    """
    vectors = model.encode(
        list(texts),
        prompt=prompt,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return unit_rows(np.asarray(vectors, dtype=np.float32)[:, :dim])


# --- the alias registry -----------------------------------------------------------------------


@dataclass
class _Alias:
    live: str
    previous: list[str]


def _registry(client: ClientAPI) -> Collection:
    return client.get_or_create_collection(REGISTRY, embedding_function=None)


def _read_alias(client: ClientAPI, alias: str) -> _Alias | None:
    names = {c.name for c in client.list_collections()}
    if REGISTRY not in names:
        return None
    got = _registry(client).get(ids=[alias], include=["metadatas"])
    if not got["ids"]:
        return None
    meta = got["metadatas"][0]
    return _Alias(live=str(meta["collection"]), previous=json.loads(str(meta["previous"])))


def _write_alias(client: ClientAPI, alias: str, record: _Alias) -> None:
    """One single-record upsert: readers see the old pointer or the new one, nothing between."""
    _registry(client).upsert(
        ids=[alias],
        embeddings=[_REGISTRY_VECTOR],
        documents=[record.live],
        metadatas=[
            {
                "collection": record.live,
                "previous": json.dumps(record.previous),
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ],
    )


def _all_aliases(client: ClientAPI) -> dict[str, _Alias]:
    if REGISTRY not in {c.name for c in client.list_collections()}:
        return {}
    got = _registry(client).get(include=["metadatas"])
    return {
        id_: _Alias(str(meta["collection"]), json.loads(str(meta["previous"])))
        for id_, meta in zip(got["ids"], got["metadatas"], strict=True)
    }


def _missing_alias(client: ClientAPI, alias: str) -> AliasNotFound:
    return AliasNotFound(
        f"no collection published under alias {alias!r} in {where(client)}; "
        f"run `ragtune publish` (or the pipeline) first"
    )


def resolve_alias(client: ClientAPI, alias: str) -> Collection:
    """The live collection behind `alias`; `AliasNotFound` if nothing is published."""
    record = _read_alias(client, alias)
    if record is None:
        raise _missing_alias(client, alias)
    try:
        return client.get_collection(record.live, embedding_function=None)
    except Exception as exc:
        raise StoreError(
            f"alias {alias!r} points to collection {record.live!r}, which is missing from "
            f"{where(client)}; re-publish, or `rollback` to {record.previous[:1]}"
        ) from exc


def list_versions(client: ClientAPI, alias: str) -> list[str]:
    """The alias's collections, live first, then previous versions newest first."""
    record = _read_alias(client, alias)
    if record is None:
        raise _missing_alias(client, alias)
    return [record.live, *record.previous]


def rollback(client: ClientAPI, alias: str, on_wait: OnWait | None = None) -> str:
    """Point the alias back at its previous version; returns the collection now live.

    The version rolled away from becomes the previous one, so a second rollback undoes the first.
    """
    with publish_lock(client, on_wait=on_wait, what=f"rollback of {alias!r}"):
        record = _read_alias(client, alias)
        if record is None:
            raise _missing_alias(client, alias)
        if not record.previous:
            raise StoreError(
                f"alias {alias!r} has no previous version to roll back to in {where(client)} "
                f"(live: {record.live!r})"
            )
        target = record.previous[0]
        try:
            client.get_collection(target, embedding_function=None)
        except Exception as exc:
            raise StoreError(
                f"cannot roll {alias!r} back: its previous version {target!r} no longer exists "
                f"in {where(client)}"
            ) from exc
        _write_alias(client, alias, _Alias(target, [record.live, *record.previous[1:]]))
        return target


# --- publishing -------------------------------------------------------------------------------


def _unique_rows(chunks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per chunk id (ids are content hashes: a repeated passage is one record)."""
    seen: dict[str, Mapping[str, Any]] = {}
    for row in chunks:
        seen.setdefault(str(row["id"]), row)
    return list(seen.values())


def _record_metadata(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in _META_KEYS if row.get(key) is not None}


def _existing_ids(collection: Collection, page: int) -> set[str]:
    ids: set[str] = set()
    offset = 0
    while True:
        got = collection.get(include=[], limit=page, offset=offset)
        ids.update(got["ids"])
        if len(got["ids"]) < page:
            return ids
        offset += page


def _copy_sources(client: ClientAPI, key: str, exclude: str) -> list[Collection]:
    """Other collections whose vectors were made by the same weights, prompt and dimension."""
    return [
        client.get_collection(c.name, embedding_function=None)
        for c in client.list_collections()
        if c.name != exclude and (c.metadata or {}).get("embedding_key") == key
    ]


def _collection_metadata(
    *,
    model_ref: str,
    dim: int,
    query_prompt: str,
    document_prompt: str,
    corpus: str,
    count: int,
    key: str,
    metrics: Mapping[str, float] | None,
) -> dict[str, Any]:
    # Collection metadata takes str/int/float/bool only (no None, no lists, no dicts).
    meta: dict[str, Any] = {
        "model": model_ref,
        "dim": int(dim),
        "query_prompt": query_prompt,
        "document_prompt": document_prompt,
        "corpus": corpus,
        "chunk_count": int(count),
        "embedding_key": key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for name, value in (metrics or {}).items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise StoreError(f"metric {name!r}={value!r} is not a number; pass flattened scalars")
        if not np.isfinite(value):
            raise StoreError(f"metric {name!r} is {value}: refusing to record it")
        meta[f"metric.{name}"] = float(value)
    return meta


def publish(
    client: ClientAPI,
    chunks: Sequence[Mapping[str, Any]],
    model: SentenceTransformer,
    model_ref: str,
    dim: int,
    alias: str = "docs",
    corpus: str = "docs",
    query_prompt: str = "",
    document_prompt: str = "",
    metrics: Mapping[str, float] | None = None,
    keep_versions: int = 3,
    batch_size: int | None = None,
    progress: Progress | None = None,
    model_id: str | None = None,
    embed_texts: EmbedTexts | None = None,
    lock_timeout: float | None = 3600.0,
    on_wait: OnWait | None = None,
) -> PublishResult:
    """Publish chunks as a complete versioned collection, then point `alias` at it.

    Idempotent and resumable: records are keyed by chunk id; ids already in the target collection
    (an unchanged corpus, or a run that crashed half-way) are skipped; ids embedded by any other
    collection with the same weights, prompt and dimension are copied, not re-embedded. The alias
    moves only after a count check proves the collection complete. Versions beyond
    `keep_versions` are deleted, never the live or the previous one, nor one another alias uses.
    `model_id` identifies the weights (default: a hash of the model folder's weight files).
    `embed_texts` computes the vectors for chunks that need them somewhere else (e.g. shards on
    Dask workers); it must return what `embed(model, texts, document_prompt, dim)` would.
    One publisher writes a store at a time (`tasks.store.locks`): this one waits at most
    `lock_timeout` seconds for another, telling `on_wait` who that is. Once complete, it removes
    versions no alias uses (what killed publishes left half-written).
    """
    check_name(alias, "alias")
    rows = _unique_rows(chunks)
    if not rows:
        raise StoreError("no chunks to publish: run ingest first (the chunk set is empty)")
    width = model.get_embedding_dimension()
    if not 0 < int(dim) <= (width or dim):
        raise StoreError(f"dim={dim} is outside the model's width 1..{width} ({model_ref})")
    model_ref = portable_ref(model_ref)
    identity = model_id or model_identity(model_ref)
    ids = [str(row["id"]) for row in rows]
    version = _Version(
        name=version_name(
            corpus, model_ref, dim, ids, model_id=fingerprint(identity, document_prompt)
        ),
        rows=rows,
        key=fingerprint(identity, document_prompt, int(dim)),
    )
    max_batch = client.get_max_batch_size()
    batch = min(batch_size or DEFAULT_BATCH, max_batch)
    if batch < 1:
        raise StoreError(f"batch_size={batch_size} must be at least 1")

    def embed_fresh(texts: list[str]) -> Any:
        if embed_texts is not None:
            return embed_texts(texts)
        return embed(model, texts, document_prompt, dim)

    with publish_lock(
        client, timeout=lock_timeout, on_wait=on_wait, what=f"publish of {version.name}"
    ) as lock:
        metadata = _collection_metadata(
            model_ref=model_ref,
            dim=dim,
            query_prompt=query_prompt,
            document_prompt=document_prompt,
            corpus=corpus,
            count=len(rows),
            key=version.key,
            metrics=metrics,
        )
        collection = _open_or_create(client, version.name, metadata)
        embedded, copied = _write_missing(
            client, collection, version, embed_fresh, batch, max_batch, progress
        )
        count = _verify(collection, version, alias)
        lock.check()
        previous = _swap_alias(client, alias, version.name)
        _prune(client, alias, keep_versions)
        removed = _remove_unaliased(client)
    return PublishResult(
        alias=alias,
        collection=version.name,
        count=count,
        embedded=embedded,
        copied=copied,
        previous=previous,
        swapped=previous != version.name,
        removed=removed,
    )


@dataclass
class _Version:
    """The collection a publish writes: its name, the rows it must hold, and the key shared by
    every collection whose vectors the same weights, prompt and dimension made."""

    name: str
    rows: list[Mapping[str, Any]]
    key: str


def _write_missing(
    client: ClientAPI,
    collection: Collection,
    version: _Version,
    embed_fresh: EmbedTexts,
    batch: int,
    page: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Write the rows `collection` lacks, in batches: vectors copied from another collection
    with the same key where it has them, embedded otherwise. Returns (embedded, copied)."""
    from tqdm.auto import tqdm

    present = _existing_ids(collection, page)
    # Texts of similar length share a batch: less padding, as fast as one big encode.
    todo = sorted(
        (r for r in version.rows if str(r["id"]) not in present), key=lambda r: len(r["text"])
    )
    sources = _copy_sources(client, version.key, exclude=version.name) if todo else []
    embedded = copied = 0
    total = len(version.rows)
    done = total - len(todo)
    with tqdm(
        total=total, initial=done, desc=f"publish {version.name}", unit="chunk", disable=None
    ) as bar:
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            wanted = [str(r["id"]) for r in part]
            vectors = _copied_vectors(sources, wanted)
            copied += len(vectors)
            fresh = [r for r in part if str(r["id"]) not in vectors]
            if fresh:
                made = embed_fresh([str(r["text"]) for r in fresh])
                if len(made) != len(fresh):
                    raise StoreError(f"embed_texts returned {len(made)} vectors for {len(fresh)}")
                vectors.update(zip((str(r["id"]) for r in fresh), made, strict=True))
                embedded += len(fresh)
            collection.upsert(
                ids=wanted,
                embeddings=[vectors[i] for i in wanted],
                documents=[str(r["text"]) for r in part],
                metadatas=[_record_metadata(r) for r in part],
            )
            done += len(part)
            bar.update(len(part))
            if progress:
                progress(done, total)
    return embedded, copied


def _copied_vectors(sources: Sequence[Collection], wanted: Sequence[str]) -> dict[str, Any]:
    """The vectors of `wanted` ids that `sources` already hold, by id."""
    vectors: dict[str, Any] = {}
    for source in sources:
        if len(vectors) == len(wanted):
            break
        got = source.get(ids=[i for i in wanted if i not in vectors], include=["embeddings"])
        vectors.update(zip(got["ids"], got["embeddings"], strict=True))
    return vectors


def _verify(collection: Collection, version: _Version, alias: str) -> int:
    """The collection's count, which must be the number of rows before the alias may move."""
    count = collection.count()
    if count != len(version.rows):
        raise StoreError(
            f"collection {version.name!r} holds {count} records, expected "
            f"{len(version.rows)}: not swapping alias {alias!r}; re-run publish to complete it"
        )
    return count


def _swap_alias(client: ClientAPI, alias: str, name: str) -> str | None:
    """Point `alias` at `name`, the version it pointed at first in its history; returns that
    previous version (None for a new alias)."""
    record = _read_alias(client, alias)
    previous = record.live if record else None
    if previous != name:
        history = [previous, *record.previous] if record and previous else []
        _write_alias(client, alias, _Alias(name, [v for v in history if v != name]))
    return previous


def _open_or_create(client: ClientAPI, name: str, metadata: dict[str, Any]) -> Collection:
    """Open an existing version untouched (its metadata is part of what readers see), or create
    it in cosine space."""
    from chromadb.errors import NotFoundError

    try:
        return client.get_collection(name, embedding_function=None)
    except NotFoundError:
        return client.create_collection(
            name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
            metadata=metadata,
        )


def _prune(client: ClientAPI, alias: str, keep_versions: int) -> None:
    """Drop versions beyond `keep_versions`; the registry is updated first, so a crash here leaves
    an orphan collection, never an alias pointing at nothing. The previous version is always kept:
    a reader that resolved the alias just before a swap may still be querying it."""
    aliases = _all_aliases(client)
    record = aliases[alias]
    keep = max(int(keep_versions), 2) - 1
    kept, dropped = record.previous[:keep], record.previous[keep:]
    if not dropped:
        return
    _write_alias(client, alias, _Alias(record.live, kept))
    in_use = {
        name
        for other, rec in aliases.items()
        if other != alias
        for name in (rec.live, *rec.previous)
    }
    existing = {c.name for c in client.list_collections()}
    for name in dropped:
        if name not in in_use and name in existing:
            client.delete_collection(name)


def _remove_unaliased(client: ClientAPI) -> list[str]:
    """Delete ragtune versions that no alias points to, live or previous. A publish swaps the
    alias last, so such a version is one a killed publish left behind. Call with the lock held:
    otherwise it could be another publisher's version in the making."""
    aliased = {
        name for record in _all_aliases(client).values() for name in (record.live, *record.previous)
    }
    removed = sorted(
        c.name
        for c in client.list_collections()
        if "embedding_key" in (c.metadata or {}) and c.name not in aliased
    )
    for name in removed:
        client.delete_collection(name)
    return removed


def remove_unaliased(client: ClientAPI, on_wait: OnWait | None = None) -> list[str]:
    """Take the publish lock and delete the versions no alias uses; returns their names."""
    with publish_lock(client, on_wait=on_wait, what="removing unaliased versions"):
        return _remove_unaliased(client)


# --- search -----------------------------------------------------------------------------------


def search(client: ClientAPI, alias: str, query: str, k: int = 5) -> list[Hit]:
    """Top-k chunks for `query`, embedded with the live collection's model, prompt and dim.
    A one-off: an app that searches again should hold a `tasks.serving.retriever.Retriever`,
    which resolves the alias and loads the model once."""
    if not query.strip():
        raise StoreError("the query is empty")
    collection = resolve_alias(client, alias)
    meta = collection.metadata or {}
    model = cached_model(str(meta["model"]))
    vector = embed(model, [query], str(meta.get("query_prompt", "")), int(meta["dim"]))
    return query_hits(collection, vector, k)[0]


def query_hits(collection: Collection, vectors: np.ndarray, k: int) -> list[list[Hit]]:
    """The top-k records of `collection` for each row of `vectors`, in one Chroma query."""
    got = collection.query(
        query_embeddings=vectors,
        n_results=max(1, int(k)),
        include=["documents", "metadatas", "distances"],
    )
    return [
        [
            _hit(id_, doc, row or {}, distance)
            for id_, doc, row, distance in zip(ids, docs, rows, distances, strict=True)
        ]
        for ids, docs, rows, distances in zip(
            got["ids"], got["documents"], got["metadatas"], got["distances"], strict=True
        )
    ]


def _hit(id_: str, doc: str | None, row: Mapping[str, Any], distance: float) -> Hit:
    return Hit(
        id=id_,
        score=1.0 - float(distance),
        source=str(row.get("source", "")),
        page_start=int(row.get("page_start") or 0),
        page_end=int(row.get("page_end") or 0),
        text=doc or "",
    )
