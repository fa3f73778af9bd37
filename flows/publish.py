"""Publish: embed the workspace's chunks with a model and point an alias at the result.

The work (versioned collection, copy-not-re-embed, count check, alias swap, pruning) is in
`tasks.store.chroma.publish`, and one publisher at a time is `tasks.store.locks`; this flow
chooses defaults (the newest model in the workspace at its full width, the model's own
prompts), says in the log and the dashboard when it waits for another publisher, and reports
what it published.
With `task_runner="dask"` the chunks that need embedding are encoded in shards on Dask workers
(`flows.runners`); the store is written from this process only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import markdown, progress_artifact
from flows.params import PublishParams, PublishSettings
from flows.runners import fan_out, started_on_first_use, worker_slots
from tasks.models import cached_model, load_model, model_prompts
from tasks.retrieval.report import markdown_table
from tasks.store import chroma
from tasks.store.locks import Holder
from tasks.workspace import Workspace, fingerprint, load_rows

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner
    from sentence_transformers import SentenceTransformer


def report_waiting(holder: Holder | None) -> None:
    """Say at once, in the log and on the dashboard, that this publish waits and for whom."""
    who = holder.describe() if holder else "another process (it has not said who yet)"
    print(f"waiting for the publish lock: held by {who}")
    markdown(
        "publish-waiting",
        f"# Waiting for another publisher\n\nThe store's publish lock is held by {who}. "
        "This run goes on as soon as it is released; a publisher that dies releases it.",
        description="Who holds the publish lock this run waits for.",
    )


@task(name="embed-shard", cache_policy=NO_CACHE, persist_result=False)
def embed_shard(model_ref: str, texts: list[str], prompt: str, dim: int) -> np.ndarray:
    """One shard of texts, on whichever worker runs it (the model loads once per process)."""
    return chroma.embed(cached_model(model_ref), texts, prompt, dim)


def embed_on(
    runner: Callable[[], DaskTaskRunner], model_ref: str, prompt: str, dim: int
) -> chroma.EmbedTexts:
    """Embed texts as one `embed_shard` task per worker thread of the Dask cluster, in order.

    Workers load the model by reference, so a folder must be at the same path on every worker
    (a shared volume), or be a hub id the workers can load.
    """
    model_ref = chroma.portable_ref(model_ref)

    def run(texts: list[str]) -> np.ndarray:
        dask = runner()
        size = -(-len(texts) // worker_slots(dask))
        calls = [
            {"model_ref": model_ref, "texts": texts[i : i + size], "prompt": prompt, "dim": dim}
            for i in range(0, len(texts), size)
        ]
        return np.concatenate([future.result() for future in fan_out(dask, embed_shard, calls)])

    return run


def nudged(
    ws: Workspace,
    chunks: list[dict],
    model: SentenceTransformer,
    model_ref: str,
    prompts: tuple[str, str],
    dim: int,
    embed_texts: chroma.EmbedTexts | None,
    settings: PublishSettings,
) -> tuple[chroma.EmbedTexts, str]:
    """An embedder that nudges the chunks `learn` recorded choices for (`learned/nudge.json`)
    towards their queries, and the identity of the weights plus the nudge: a nudged version
    is its own collection, never copied into a plain one or from one."""
    from tasks.learn.rows import nudge

    path = ws.learned_dir / "nudge.json"
    if not path.exists():
        raise FileNotFoundError(f"nudge=true needs {path}: run `ragtune learn` first")
    record = json.loads(path.read_text())
    if settings.nudge_step is not None:
        record["step"] = settings.nudge_step
    query_prompt, document_prompt = prompts
    text_of = {row["id"]: row["text"] for row in chunks}
    choices = [(query, text_of[cid]) for query, cid in record["choices"] if cid in text_of]
    vectors = chroma.embed(model, [query for query, _ in choices], query_prompt, dim)
    step = float(record["step"])
    print(f"nudging the chunks of {len(choices)} judged queries, step {step:g}")

    def embed(texts: list[str]) -> np.ndarray:
        made = (embed_texts or (lambda t: chroma.embed(model, t, document_prompt, dim)))(texts)
        row = {text: i for i, text in enumerate(texts)}
        mine = [i for i, (_, text) in enumerate(choices) if text in row]
        if not mine or step == 0:
            return made
        return nudge(made, vectors[mine], [row[choices[i][1]] for i in mine], step)

    identity = fingerprint(chroma.model_identity(chroma.portable_ref(model_ref)), record)
    return embed, identity


@flow(name="publish", log_prints=True)
def publish(params: PublishParams = PublishParams()) -> chroma.PublishResult:  # noqa: B008
    """Publish the workspace's chunks as a complete new version and swap the alias to it."""
    ws = Workspace.at(params.workspace)
    chunks = load_rows(ws.chunks_dir)
    model_ref = params.model or str(ws.newest_model())
    model = load_model(model_ref)
    width = model.get_embedding_dimension()
    dim = params.dim or width
    query_prompt, document_prompt = model_prompts(model)
    client = params.open_store()
    print(f"publishing {len(chunks)} chunks with {model_ref} at dim {dim} as {params.alias!r}")

    runner = params.dask_runner()
    with contextlib.ExitStack() as stack:
        embed_texts = (
            embed_on(started_on_first_use(stack, runner), model_ref, document_prompt, dim)
            if runner
            else None
        )
        model_id = None
        if params.nudge:
            embed_texts, model_id = nudged(
                ws,
                chunks,
                model,
                model_ref,
                (query_prompt, document_prompt),
                dim,
                embed_texts,
                params,
            )
        done = chroma.publish(
            client,
            chunks,
            model,
            model_ref=model_ref,
            dim=dim,
            alias=params.alias,
            corpus=params.corpus,
            query_prompt=query_prompt,
            document_prompt=document_prompt,
            metrics=params.metrics,
            keep_versions=params.keep_versions,
            progress=progress_artifact("publish", f"Embedding and storing {len(chunks)} chunks"),
            embed_texts=embed_texts,
            model_id=model_id,
            lock_timeout=params.lock_timeout_s,
            on_wait=report_waiting,
        )

    action = (
        f"`{done.alias}` now points to `{done.collection}`"
        + (f" (was `{done.previous}`)." if done.previous else ".")
        if done.swapped
        else f"`{done.alias}` already pointed to `{done.collection}`: nothing to swap."
    )
    if done.removed:
        action += (
            f" Removed {len(done.removed)} version(s) no alias used (left by an interrupted "
            f"publish): {', '.join(f'`{name}`' for name in done.removed)}."
        )
    markdown(
        "publish-summary",
        f"# Published `{done.alias}`\n\n{action}\n\n"
        + markdown_table(
            [
                {
                    "alias": done.alias,
                    "collection": done.collection,
                    "chunks": done.count,
                    "embedded": done.embedded,
                    "copied": done.copied,
                    "model": model_ref,
                    "dim": dim,
                    "query prompt": repr(query_prompt),
                    "store": chroma.where(client),
                }
            ]
        ),
        description="Which collection the alias serves and what it cost to build.",
    )
    print(
        f"{done.alias} -> {done.collection}: {done.count} chunks, {done.embedded} embedded, "
        f"{done.copied} copied, swapped={done.swapped}"
        + (f", removed unaliased {done.removed}" if done.removed else "")
    )
    return done
