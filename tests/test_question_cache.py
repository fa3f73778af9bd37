"""The question cache: LLM work is never paid twice, and an interrupted run resumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from tasks.questions.cache import QuestionCache, generate_with_cache
from tasks.questions.generation import Generation


@dataclass
class CountingGenerator:
    """A deterministic question generator that records every passage it is asked about.

    Passages containing a word in `fail_on` come back failed (as an API generator reports a
    chunk that exhausted its retries); call number `crash_on_call` raises, like a killed run.
    """

    version: str = "v1"
    fail_on: tuple[str, ...] = ()
    crash_on_call: int | None = None
    calls: list[list[str]] = field(default_factory=list)
    name: str = "counting"

    def fingerprint(self) -> str:
        return f"counting-{self.version}"

    def generate(self, passages: Sequence[str], progress=None) -> list[Generation]:
        self.calls.append(list(passages))
        if self.crash_on_call == len(self.calls):
            raise ConnectionError("the generator went away")
        out = []
        for i, passage in enumerate(passages):
            if any(word in passage for word in self.fail_on):
                out.append(Generation([], error="429 Too Many Requests", prompt_tokens=7))
            else:
                topic = passage.split()[0]
                out.append(
                    Generation(
                        [f"What is {topic}?", f"Why does {topic} matter?"],
                        prompt_tokens=len(passage.split()),
                        completion_tokens=9,
                    )
                )
            if progress:
                progress(i + 1, len(passages))
        return out

    @property
    def passages_sent(self) -> list[str]:
        return [p for call in self.calls for p in call]


def chunk(topic: str) -> dict:
    return {"id": f"id-{topic}", "text": f"{topic} is the subject of this passage."}


TOPICS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def test_a_second_run_makes_no_generator_calls(tmp_path):
    chunks = [chunk(t) for t in TOPICS]
    first_gen = CountingGenerator()
    first, stats = generate_with_cache(chunks, first_gen, QuestionCache(tmp_path), batch_size=4)
    assert len(first_gen.calls) == 2
    assert stats["llm_calls"] == 6 and stats["cached"] == 0 and stats["failed"] == 0
    assert stats["prompt_tokens"] == 6 * 7 and stats["completion_tokens"] == 6 * 9
    assert [x.question for x in first[:2]] == ["What is alpha?", "Why does alpha matter?"]
    assert {x.generator for x in first} == {"counting"}

    # a new cache object on the same folder, as a new process would open it
    second_gen = CountingGenerator()
    second, stats = generate_with_cache(chunks, second_gen, QuestionCache(tmp_path))
    assert second_gen.calls == []
    assert stats["llm_calls"] == 0 and stats["cached"] == 6
    assert stats["prompt_tokens"] == 0  # nothing was spent this time
    assert [(x.question, x.chunk_id) for x in second] == [(x.question, x.chunk_id) for x in first]


def test_a_new_chunk_is_the_only_one_generated(tmp_path):
    generate_with_cache(
        [chunk(t) for t in TOPICS[:3]], CountingGenerator(), QuestionCache(tmp_path)
    )
    gen = CountingGenerator()
    questions, stats = generate_with_cache(
        [chunk(t) for t in TOPICS[:4]], gen, QuestionCache(tmp_path)
    )
    assert gen.passages_sent == [chunk("delta")["text"]]
    assert stats["cached"] == 3 and stats["llm_calls"] == 1
    assert {x.chunk_id for x in questions} == {f"id-{t}" for t in TOPICS[:4]}


def test_a_changed_generator_regenerates_everything(tmp_path):
    chunks = [chunk(t) for t in TOPICS[:3]]
    generate_with_cache(chunks, CountingGenerator(version="v1"), QuestionCache(tmp_path))
    gen = CountingGenerator(version="v2")
    generate_with_cache(chunks, gen, QuestionCache(tmp_path))
    assert len(gen.passages_sent) == 3


def test_an_interrupted_run_resumes_without_redoing_finished_batches(tmp_path):
    chunks = [chunk(t) for t in TOPICS]
    crashing = CountingGenerator(crash_on_call=2)
    with pytest.raises(ConnectionError):
        generate_with_cache(chunks, crashing, QuestionCache(tmp_path), batch_size=2)
    assert len(crashing.calls) == 2

    resumed = CountingGenerator()
    questions, stats = generate_with_cache(chunks, resumed, QuestionCache(tmp_path), batch_size=2)
    finished_first = {c["text"] for c in chunks[:2]}
    assert not finished_first & set(resumed.passages_sent)
    assert resumed.passages_sent == [c["text"] for c in chunks[2:]]
    assert stats["cached"] == 2
    assert len(questions) == 12


def test_failed_generations_are_counted_not_cached_and_retried_next_run(tmp_path):
    chunks = [chunk(t) for t in TOPICS[:4]]
    flaky = CountingGenerator(fail_on=("gamma",))
    questions, stats = generate_with_cache(chunks, flaky, QuestionCache(tmp_path))
    assert stats["failed"] == 1
    assert stats["errors"] == ["429 Too Many Requests"]
    assert stats["prompt_tokens"] == 3 * 7 + 7  # a failed call still costs its prompt
    assert "id-gamma" not in {x.chunk_id for x in questions}

    healthy = CountingGenerator()
    questions, stats = generate_with_cache(chunks, healthy, QuestionCache(tmp_path))
    assert healthy.passages_sent == [chunk("gamma")["text"]]
    assert stats["failed"] == 0 and stats["cached"] == 3
    assert "id-gamma" in {x.chunk_id for x in questions}


def test_progress_reaches_the_total_and_duplicate_chunks_are_asked_once(tmp_path):
    seen: list[tuple[int, int]] = []
    chunks = [chunk(t) for t in TOPICS[:3]] + [chunk("alpha")]
    gen = CountingGenerator()
    questions, stats = generate_with_cache(
        chunks,
        gen,
        QuestionCache(tmp_path),
        batch_size=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert len(gen.passages_sent) == 3 and stats["chunks"] == 3
    assert len(questions) == 6
    assert seen[-1] == (3, 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_line_cut_short_by_a_crash_is_skipped_and_later_writes_stay_readable(tmp_path):
    cache = QuestionCache(tmp_path)
    cache.put("a", "fp1", Generation(["What is a?"], prompt_tokens=3))
    path = tmp_path / "fp1.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"chunk_id": "b", "questions": ["What')  # no newline: the crash
    reopened = QuestionCache(tmp_path)
    assert reopened.get("b", "fp1") is None
    reopened.put("c", "fp1", Generation(["What is c?"]))

    fresh = QuestionCache(tmp_path)
    assert fresh.get("a", "fp1").questions == ["What is a?"]
    assert fresh.get("a", "fp1").prompt_tokens == 3
    assert fresh.get("c", "fp1").questions == ["What is c?"]
    assert fresh.get("b", "fp1") is None


def test_the_cache_refuses_failures_and_odd_fingerprints(tmp_path):
    cache = QuestionCache(tmp_path)
    with pytest.raises(ValueError, match="not cached"):
        cache.put("a", "fp1", Generation([], error="timeout"))
    with pytest.raises(ValueError, match="fingerprint"):
        cache.get("a", "../escape")
    assert cache.get("a", "fp1") is None


def test_a_generator_that_loses_passages_is_an_error_naming_it(tmp_path):
    class Lossy(CountingGenerator):
        def generate(self, passages, progress=None):
            return super().generate(passages, progress)[:-1]

    with pytest.raises(RuntimeError, match="'counting' returned 1 results for 2 passages"):
        generate_with_cache([chunk("alpha"), chunk("beta")], Lossy(), QuestionCache(tmp_path))
    assert QuestionCache(tmp_path).get("id-alpha", "counting-v1") is None
