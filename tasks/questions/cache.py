"""Never pay for the same LLM work twice.

Generated questions are cached per (chunk id, generator fingerprint). Chunk ids hash the chunk's
text and fingerprints hash everything that changes a generator's output, so a re-run over an
unchanged corpus generates nothing, a new chunk generates only for itself, and a new prompt or
model generates afresh.

The cache is append-only JSON Lines, one file per fingerprint, written and flushed batch by
batch: a run killed half-way resumes where it stopped, and a line cut short by a crash is
skipped on reading rather than poisoning the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.files import BadLine, append_jsonl, read_jsonl
from tasks.progress import Progress
from tasks.questions.curation import Question
from tasks.questions.generation import Generation

#: runs batches of passages somewhere and yields (batch index, generations) as each finishes
RunBatches = Callable[[list[list[str]]], Iterable[tuple[int, list[Generation]]]]


class QuestionCache:
    """Successful generations by (chunk id, generator fingerprint), in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._loaded: dict[str, dict[str, dict[str, Any]]] = {}

    def _path(self, fingerprint: str) -> Path:
        if not fingerprint or not fingerprint.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"a generator fingerprint must be a plain hash, got {fingerprint!r}")
        return self.folder / f"{fingerprint}.jsonl"

    def _entries(self, fingerprint: str) -> dict[str, dict[str, Any]]:
        if fingerprint not in self._loaded:
            entries: dict[str, dict[str, Any]] = {}
            path = self._path(fingerprint)
            if path.exists():
                for _, record in read_jsonl(path, strict=False):
                    # A BadLine is the tail of a write a crash cut short.
                    if not isinstance(record, BadLine):
                        entries[record["chunk_id"]] = record
            self._loaded[fingerprint] = entries
        return self._loaded[fingerprint]

    def get(self, chunk_id: str, fingerprint: str) -> Generation | None:
        """The cached `Generation` for a chunk, or None if it was never generated."""
        record = self._entries(fingerprint).get(chunk_id)
        if record is None:
            return None
        return Generation(
            questions=list(record["questions"]),
            prompt_tokens=record.get("prompt_tokens", 0),
            completion_tokens=record.get("completion_tokens", 0),
        )

    def put(self, chunk_id: str, fingerprint: str, generation: Any) -> None:
        """Record one successful generation (flushed to disk before returning)."""
        self.put_many(fingerprint, [(chunk_id, generation)])

    def put_many(self, fingerprint: str, items: Iterable[tuple[str, Any]]) -> None:
        """Record several successful generations with one write and one flush to disk."""
        items = list(items)
        for chunk_id, generation in items:
            if generation.error is not None:
                raise ValueError(
                    f"chunk {chunk_id!r} failed ({generation.error}); failures are not cached, "
                    "so the next run retries them"
                )
        records = [
            {
                "chunk_id": chunk_id,
                "questions": list(generation.questions),
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
            }
            for chunk_id, generation in items
        ]
        if not records:
            return
        entries = self._entries(fingerprint)
        path = self._path(fingerprint)
        append_jsonl(path, records, sync=True)
        for record in records:
            entries[record["chunk_id"]] = record


def generate_with_cache(
    chunks: Sequence[dict[str, Any]],
    generator: Any,
    cache: QuestionCache,
    batch_size: int = 16,
    progress: Progress | None = None,
    run_batches: RunBatches | None = None,
) -> tuple[list[Question], dict[str, Any]]:
    """Questions for every chunk, generating only for chunks the cache does not hold.

    Missing chunks go to `generator.generate` in batches of `batch_size`, and each batch is in
    the cache as soon as it is back, so an interrupted run loses at most the batches in flight.
    A failed generation (its `error` set) is counted, not cached, so the next run retries it.

    `run_batches` runs the batches elsewhere (e.g. on Dask workers): it gets every batch's
    passages and yields `(batch index, generations)` in any order. By default the batches run
    here, one after another. Either way a batch holds the same passages, and results are put
    back in chunk order, so where the batches ran does not change the output.

    Returns the raw questions (uncleaned, in chunk order) and stats: `chunks`, `cached`,
    `llm_calls` (passages sent to the generator), `failed`, `errors` (a few distinct messages),
    `prompt_tokens` and `completion_tokens` spent by this run.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    fingerprint = generator.fingerprint()
    unique: dict[str, str] = {}
    for chunk in chunks:
        unique.setdefault(chunk["id"], chunk["text"])
    results: dict[str, Any] = {}
    missing: list[str] = []
    for chunk_id in unique:
        hit = cache.get(chunk_id, fingerprint)
        if hit is None:
            missing.append(chunk_id)
        else:
            results[chunk_id] = hit
    stats: dict[str, Any] = {
        "chunks": len(unique),
        "cached": len(results),
        "llm_calls": 0,
        "failed": 0,
        "errors": [],
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    total = len(unique)
    if progress:
        progress(len(results), total)
    batches = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]

    def here() -> Iterator[tuple[int, list[Generation]]]:
        for index, batch in enumerate(batches):
            done = len(results) + stats["failed"]
            step = (lambda d, t, done=done: progress(done + d, total)) if progress else None
            yield index, generator.generate([unique[c] for c in batch], progress=step)

    if run_batches is not None and batches:
        finished = run_batches([[unique[c] for c in batch] for batch in batches])
    else:
        finished = here()
    for index, generations in finished:
        batch = batches[index]
        if len(generations) != len(batch):
            raise RuntimeError(
                f"generator {generator.name!r} returned {len(generations)} results "
                f"for {len(batch)} passages"
            )
        stats["llm_calls"] += len(batch)
        succeeded = []
        for chunk_id, generation in zip(batch, generations, strict=True):
            stats["prompt_tokens"] += generation.prompt_tokens
            stats["completion_tokens"] += generation.completion_tokens
            if generation.error is not None:
                stats["failed"] += 1
                if generation.error not in stats["errors"] and len(stats["errors"]) < 5:
                    stats["errors"].append(generation.error)
                continue
            results[chunk_id] = generation
            succeeded.append((chunk_id, generation))
        cache.put_many(fingerprint, succeeded)
        if progress:
            progress(len(results) + stats["failed"], total)
    questions = [
        Question(question=text, chunk_id=chunk_id, generator=generator.name)
        for chunk_id in unique
        if chunk_id in results
        for text in results[chunk_id].questions
    ]
    return questions, stats
