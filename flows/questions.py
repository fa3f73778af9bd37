"""Questions: the workspace's chunks → a clean, leakage-free question set.

Builds the generator named in the parameters, asks it about chunks the cache has not seen,
cleans and filters what comes back (text filters, then the round trip through the base
embedding model), splits by chunk or document, and saves every question, kept or rejected with
its reason, to `questions/`. The dashboard gets a progress bar while generating and a summary
with counts, reasons, samples and token totals. With `task_runner="dask"` the generation batches
run as Prefect tasks on Dask workers (`flows.runners`); cleaning and filtering stay here.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel

from flows.artifacts import markdown, progress_artifact
from flows.params import QuestionParams
from flows.runners import fan_out, started_on_first_use
from tasks.llm.http import redact
from tasks.models import cached_model
from tasks.questions.cache import QuestionCache, RunBatches, generate_with_cache
from tasks.questions.curation import Curation, Question, curate, sample_chunks
from tasks.questions.generation import Generation, QuestionGenerator
from tasks.questions.settings import GeneratorSettings
from tasks.questions.writers import make_generator
from tasks.retrieval.report import markdown_table
from tasks.text import shorten
from tasks.workspace import Workspace, load_rows, save_rows

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


class QuestionsResult(BaseModel):
    questions_path: str
    chunks: int
    generated: int
    kept: int
    train: int
    test: int
    llm_calls: int
    cached: int
    failed: int
    rejected: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


@flow(name="questions", log_prints=True)
def questions(params: QuestionParams = QuestionParams()) -> QuestionsResult:  # noqa: B008
    """Generate, filter and split questions about the workspace's chunks."""
    return ask(params, writer(params.generator, params.questions_per_chunk, params.seed))


def writer(settings: GeneratorSettings | dict[str, Any], n: int, seed: int) -> QuestionGenerator:
    """The question writer `settings` describe, asking `n` questions per chunk with the stage's
    seed: what the flow and every Dask worker build."""
    return make_generator(settings, n=n, seed=seed)


@task(name="generate-questions", cache_policy=NO_CACHE, persist_result=False)
def generate_batch(
    settings: dict[str, Any], n: int, seed: int, fingerprint: str, passages: list[str]
) -> list[Generation]:
    """One batch of passages, on whichever worker runs it.

    The worker builds the writer from its settings (a local model loads once per worker
    process; an API key is read from the worker's own environment). Its fingerprint must match
    the flow's, or the flow would cache these questions under another writer's key.
    """
    built = writer(settings, n, seed)
    if built.fingerprint() != fingerprint:
        raise RuntimeError(
            f"the {built.name!r} generator on this worker has fingerprint "
            f"{built.fingerprint()}, the flow's has {fingerprint}: run the same ragtune version "
            "on workers and flow"
        )
    return built.generate(passages)


def on_runner(
    runner: Callable[[], DaskTaskRunner], params: QuestionParams, fingerprint: str
) -> RunBatches:
    """Run generation batches as `generate_batch` tasks on `runner()`, yielding each as it ends."""
    settings = params.generator.model_dump()

    def run(batches: list[list[str]]) -> Iterator[tuple[int, list[Generation]]]:
        print(f"sending {len(batches)} generation batches to Dask")
        calls = [
            {
                "settings": settings,
                "n": params.questions_per_chunk,
                "seed": params.seed,
                "fingerprint": fingerprint,
                "passages": passages,
            }
            for passages in batches
        ]
        index = {future: i for i, future in enumerate(fan_out(runner(), generate_batch, calls))}
        for future in as_completed(list(index)):
            yield index[future], future.result()

    return run


def ask(params: QuestionParams, generator: QuestionGenerator) -> QuestionsResult:
    """The body of the `questions` flow for an already-built generator.

    Separate from the flow so that the choice of generator (a name and settings, resolved by
    `make_generator`) stays the only thing the flow itself decides.
    """
    ws = Workspace.at(params.workspace)
    chunks = load_rows(ws.chunks_dir)
    if not chunks:
        raise ValueError(f"{ws.chunks_dir} holds no chunks: ingest found no text to ask about")
    chosen = sample_chunks(chunks, params.max_chunks, params.seed)
    print(
        f"asking {generator.name} (fingerprint {generator.fingerprint()}) about "
        f"{len(chosen)} of {len(chunks)} chunks"
    )
    progress = progress_artifact("questions-generation", "Chunks with generated questions")
    cache = QuestionCache(ws.question_cache)
    runner = params.dask_runner()
    with contextlib.ExitStack() as stack:
        asked, stats = generate_with_cache(
            chosen,
            generator,
            cache,
            batch_size=params.generation_batch,
            progress=progress,
            run_batches=on_runner(
                started_on_first_use(stack, runner), params, generator.fingerprint()
            )
            if runner
            else None,
        )
    print(
        f"{stats['cached']} chunks from the cache, {stats['llm_calls']} sent to the generator, "
        f"{stats['failed']} failed"
    )
    for error in stats["errors"]:
        print(f"generation failed: {redact(error, _secrets(params.generator))}")

    summary = curate(
        asked,
        chunks,
        cached_model(params.base_model),
        questions_only=params.questions_only,
        test_size=params.test_size,
        seed=params.seed,
        split_by=params.split_by,
        round_trip_top_k=params.round_trip_top_k,
    )
    path = save_rows(ws.questions_dir, [asdict(q) for q in asked])
    # Rows the judge made of an earlier question set must not stand in for this one's.
    shutil.rmtree(ws.judged_questions_dir, ignore_errors=True)
    rejected = summary.dropped
    print(
        f"{summary.generated} questions generated, {summary.kept} kept "
        f"({summary.train} train, {summary.test} test); rejected: {rejected or 'none'}"
    )
    markdown(
        "questions-summary",
        _report(params, generator, asked, chunks, len(chosen), summary, stats),
        description="Questions generated, kept, dropped and why",
    )
    if not summary.kept:
        raise ValueError(
            f"No question survived the filters ({summary.generated} generated, rejected: "
            f"{rejected or 'none'}, {stats['failed']} chunks failed); see {path}"
        )
    return QuestionsResult(
        questions_path=str(path),
        chunks=len(chosen),
        generated=summary.generated,
        kept=summary.kept,
        train=summary.train,
        test=summary.test,
        llm_calls=stats["llm_calls"],
        cached=stats["cached"],
        failed=stats["failed"],
        rejected=rejected,
        prompt_tokens=stats["prompt_tokens"],
        completion_tokens=stats["completion_tokens"],
    )


_SECRET_WORDS = ("key", "token", "secret", "password", "auth")


def _secrets(settings: BaseModel) -> list[str]:
    """What an error message may echo that must not reach a log (a key in a URL or header):
    secret-looking settings and environment variables."""
    return [
        str(value)
        for name, value in [*settings.model_dump().items(), *os.environ.items()]
        if any(word in name.lower() for word in _SECRET_WORDS) and len(str(value)) >= 8
    ]


def _report(
    params: QuestionParams,
    generator: QuestionGenerator,
    asked: list[Question],
    chunks: list[dict[str, Any]],
    chosen: int,
    summary: Curation,
    stats: dict[str, Any],
) -> str:
    counts = [
        {
            "chunks asked about": chosen,
            "from cache": stats["cached"],
            "sent to generator": stats["llm_calls"],
            "failed": stats["failed"],
            "generated": summary.generated,
            "kept": summary.kept,
            "train": summary.train,
            "test": summary.test,
        }
    ]
    dropped = [{"reason": reason, "dropped": n} for reason, n in summary.rejected.items()]
    tokens = [
        {
            "prompt tokens": stats["prompt_tokens"],
            "completion tokens": stats["completion_tokens"],
        }
    ]
    text_of = {c["id"]: c["text"] for c in chunks}
    kept = [q for q in asked if q.kept]
    samples = [
        {"question": q.question, "chunk": shorten(text_of[q.chunk_id], 240)}
        for q in random.Random(params.seed).sample(kept, min(5, len(kept)))
    ]
    text = (
        f"# Questions\n\nGenerator `{generator.name}` (fingerprint `{generator.fingerprint()}`), "
        f"{params.questions_per_chunk} per chunk, {chosen} of {len(chunks)} chunks; round trip "
        f"through `{params.base_model}` at top {params.round_trip_top_k}; split by "
        f"{params.split_by}, test share {params.test_size}.\n\n"
        + markdown_table(counts)
        + "\n## Dropped, by reason\n\n"
        + markdown_table(dropped)
        + "\n## Tokens spent by this run\n\n"
        + markdown_table(tokens)
        + "\n## Samples\n\n"
        + markdown_table(samples)
    )
    if stats["errors"]:
        errors = "\n".join(f"- {redact(e, _secrets(params.generator))}" for e in stats["errors"])
        text += f"\n## Generation errors (first {len(stats['errors'])})\n\n{errors}\n"
    return text
