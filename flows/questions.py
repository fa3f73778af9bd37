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
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from flows.artifacts import markdown, progress_artifact
from flows.params import Params
from flows.runners import RunnerParams, fan_out, started_on_first_use
from tasks.models import MINILM, cached_model
from tasks.questions.cache import QuestionCache, RunBatches, generate_with_cache
from tasks.questions.curation import Curation, Question, curate, sample_chunks
from tasks.questions.writers import Generation, QuestionGenerator, make_generator
from tasks.retrieval.report import markdown_table
from tasks.text import shorten
from tasks.workspace import Workspace, load_rows, save_rows

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


class QuestionSettings(Params):
    """How questions are asked, filtered and split: the questions section of the pipeline's
    parameters."""

    generator: str | None = Field(
        None, description="Question generator: local (bundled) or api; blank: the profile's."
    )
    generator_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Generator settings, e.g. base_url and model for api. Keys belong in the "
        "environment, never here.",
    )
    questions_per_chunk: int | None = Field(
        None, ge=1, description="Questions asked per chunk; blank: the profile's."
    )
    max_chunks: int | None = Field(
        None, ge=1, description="Ask about at most this many chunks (a seeded sample); blank: all."
    )
    round_trip_top_k: int = Field(
        10, ge=1, description="Keep a question only if the base model ranks its chunk this high."
    )
    questions_only: bool = Field(
        True,
        description="Keep only generated lines that end with '?'. Turn off when your users "
        "search with statements or keywords (claims, titles) and the few-shot examples in "
        "generator_settings show that style.",
    )
    test_size: float = Field(0.2, ge=0, lt=1, description="Share of questions held out for test.")
    split_by: Literal["chunk", "document"] = Field(
        "chunk", description="Keep each chunk (or each whole document) on one side of the split."
    )
    generation_batch: int = Field(
        16,
        ge=1,
        description="Chunks per generation batch: the question cache is written batch by batch, "
        "and with task_runner=dask each batch is one task on a worker.",
    )


class QuestionParams(QuestionSettings, RunnerParams):
    # Run alone, the stage has no profile: its own defaults.
    generator: str = Field("local", description="Question generator: local (bundled) or api.")
    questions_per_chunk: int = Field(2, ge=1, description="Questions asked per chunk.")
    round_trip_model: str = Field(
        MINILM, description="The base embedding model used for the round-trip filter."
    )
    seed: int = Field(42, description="Seed for the chunk sample, the generator and the split.")

    def generator_kwargs(self) -> dict[str, Any]:
        """The settings the generator is built with: n and seed from these parameters, then
        the user's own settings."""
        return {"n": self.questions_per_chunk, "seed": self.seed, **self.generator_settings}


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
    return ask(params, make_generator(params.generator, **params.generator_kwargs()))


@task(name="generate-questions", cache_policy=NO_CACHE, persist_result=False)
def generate_batch(
    generator: str, settings: dict[str, Any], fingerprint: str, passages: list[str]
) -> list[Generation]:
    """One batch of passages, on whichever worker runs it.

    The worker builds the generator from its name and settings (a local model loads once per
    worker process; an API key is read from the worker's own environment). Its fingerprint must
    match the flow's, or the flow would cache these questions under another generator's key.
    """
    built = make_generator(generator, **settings)
    if built.fingerprint() != fingerprint:
        raise RuntimeError(
            f"the {generator!r} generator on this worker has fingerprint {built.fingerprint()}, "
            f"the flow's has {fingerprint}: run the same ragtune version on workers and flow"
        )
    return built.generate(passages)


def on_runner(
    runner: Callable[[], DaskTaskRunner], params: QuestionParams, fingerprint: str
) -> RunBatches:
    """Run generation batches as `generate_batch` tasks on `runner()`, yielding each as it ends."""
    settings = params.generator_kwargs()

    def run(batches: list[list[str]]) -> Iterator[tuple[int, list[Generation]]]:
        print(f"sending {len(batches)} generation batches to Dask")
        calls = [
            {
                "generator": params.generator,
                "settings": settings,
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
        print(f"generation failed: {_redact(error, params.generator_settings)}")

    summary = curate(
        asked,
        chunks,
        cached_model(params.round_trip_model),
        questions_only=params.questions_only,
        test_size=params.test_size,
        seed=params.seed,
        split_by=params.split_by,
        round_trip_top_k=params.round_trip_top_k,
    )
    path = save_rows(ws.questions_dir, [asdict(q) for q in asked])
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


def _redact(text: str, settings: dict[str, Any]) -> str:
    """Mask secrets an error message may echo (a key in a URL or header): secret-looking
    settings and environment variables."""
    secrets = [
        str(value)
        for name, value in [*settings.items(), *os.environ.items()]
        if any(word in name.lower() for word in _SECRET_WORDS) and len(str(value)) >= 8
    ]
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


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
        f"through `{params.round_trip_model}` at top {params.round_trip_top_k}; split by "
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
        errors = "\n".join(f"- {_redact(e, params.generator_settings)}" for e in stats["errors"])
        text += f"\n## Generation errors (first {len(stats['errors'])})\n\n{errors}\n"
    return text
