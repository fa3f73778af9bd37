"""Judges behind one small protocol: how relevant is each passage to a query?

`learn` asks a judge about the retriever's top candidates for every logged query and trains the
retriever on the answers, so the judge is the teacher. Three kinds, chosen by name:

- `local`: the bundled Gemma's query likelihood (`tasks.llm.likelihood`), offline, the default;
- `api`: any OpenAI-compatible endpoint. With `mode="logprobs"` the same query likelihood from
  the log-probabilities of the prompt's tokens (`/completions` with `echo` and `logprobs`, as
  OpenAI's legacy API, vLLM and llama.cpp's server return them); with `mode="chat"` a graded
  relevance label from `/chat/completions` for servers that give no prompt log-probabilities;
- `cross-encoder`: a sentence-transformers `CrossEncoder` by hub id or folder.

A judge's `fingerprint()` names what changes its scores, so judgements are cached under it and
a query is never judged twice by the same judge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from pydantic import PrivateAttr

from tasks.learn.settings import (
    JUDGES,
    ApiJudgeSettings,
    CrossEncoderJudgeSettings,
    JudgeSettings,
    LocalJudgeSettings,
)
from tasks.llm.http import ApiCallFailed, ApiClient, Endpoint
from tasks.llm.likelihood import (
    JUDGE_PROMPT,
    MAX_PASSAGE_CHARS,
    STATEMENT_PROMPT,
    is_statement,
    score_grouped,
    style_judges,
)
from tasks.settings import chosen_backend
from tasks.workspace import fingerprint as hash_parts

#: `mode="chat"`: the rubric the model grades each passage by.
GRADE_PROMPT = (
    "Grade how well the passage answers the query, from 0 to 3.\n"
    "3: it answers the query directly. 2: it answers part of it. 1: it is on the topic but "
    "does not answer it. 0: it is about something else.\n\n"
    "Query: {query}\n\nPassage: {passage}\n\nReply with the grade only: one digit."
)


@runtime_checkable
class Judge(Protocol):
    @property
    def name(self) -> str: ...

    def fingerprint(self) -> str:
        """A stable hash of everything that changes the scores (never a secret)."""
        ...

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One score per passage, higher for more relevant; comparable within one query."""
        ...


class LocalJudge(LocalJudgeSettings):
    """The bundled Gemma 3 270M, in the prompt style of each query (question or claim).

    Many queries' candidates are judged in shared batches (`score_many`). `cache_size` > 0
    keeps passage states instead, which pays only where the same chunks recur within the last
    `cache_size` passages read: on SciFact's log half a candidate recurs 1.7 times across 417
    claims, rarely within reach of the cache, so batching is the default.

    The compute path (bfloat16, float32, int8) is left out of the fingerprint: the paths agree
    within tests' tolerance, and a user moving to another CPU should not pay to re-judge a log.
    """

    _judge_for: Callable[[str], Any] = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._judge_for = style_judges(self.cache_size, self.max_passage_tokens)

    @property
    def name(self) -> str:
        return "local"

    def fingerprint(self) -> str:
        parts: list[Any] = ["local", "gemma3-270m", JUDGE_PROMPT, STATEMENT_PROMPT]
        parts.append(MAX_PASSAGE_CHARS)
        if self.max_passage_tokens:
            parts.append(self.max_passage_tokens)
        return hash_parts(*parts)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        return self._judge_for(query).score(query, passages)

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """Several queries' candidates in shared batches, one batch run per prompt style."""
        return score_grouped(self._judge_for, items)


class ApiJudge(ApiJudgeSettings):
    """A model behind an OpenAI-compatible API, through the same client as the api writer
    (retries, timeouts, the key from `api_key_env` or a Prefect Secret, never from settings)."""

    _client: ApiClient = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._client = ApiClient(self)

    @property
    def name(self) -> str:
        return "api"

    @property
    def endpoint(self) -> Endpoint:
        return "completions" if self.mode == "logprobs" else "chat"

    def fingerprint(self) -> str:
        prompts = (JUDGE_PROMPT, STATEMENT_PROMPT) if self.mode == "logprobs" else GRADE_PROMPT
        return hash_parts(
            "api", self._client.base_url, self.model, self.mode, prompts, self.max_passage_chars
        )

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """Scores for all passages, `concurrency` calls at a time. A call that fails after its
        retries raises `ApiCallFailed`: a query is judged whole or not at all, so the cache
        never holds half a candidate list."""
        with (
            self._client.session() as client,
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="ragtune-judge") as pool,
        ):
            one = self._likelihood if self.mode == "logprobs" else self._grade
            return list(pool.map(lambda p: one(client, query, p), passages))

    def _likelihood(self, client: Any, query: str, passage: str) -> float:
        template = STATEMENT_PROMPT if is_statement(query) else JUDGE_PROMPT
        context = template.format(passage=passage[: self.max_passage_chars])
        prompt = f"{context} {query}"
        payload = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 0,
        }
        data = self._client.post(client, self.endpoint, payload)
        url = self._client.url(self.endpoint)
        logprobs = data["choices"][0].get("logprobs") or {}
        offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
        if not offsets or not values:
            raise ApiCallFailed(
                f"{self.model} at {url} returned no prompt log-probabilities "
                "(echo with logprobs): use the judge's mode='chat' for this server"
            )
        # Tokens that start inside the query; the echoed completion token comes after it.
        asked = [
            value
            for offset, value in zip(offsets, values, strict=False)
            if len(context) <= offset < len(prompt) and value is not None
        ]
        if not asked:
            raise ApiCallFailed(f"{self.model} at {url} echoed none of the query")
        return sum(asked) / len(asked)

    def _grade(self, client: Any, query: str, passage: str) -> float:
        message = GRADE_PROMPT.format(query=query, passage=passage[: self.max_passage_chars])
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": message}],
            "max_tokens": 4,
            "temperature": 0.0,
        }
        data = self._client.post(client, self.endpoint, payload)
        content = data["choices"][0]["message"].get("content") or ""
        grade = re.search(r"[0-3]", content)
        if grade is None:
            url = self._client.url(self.endpoint)
            raise ApiCallFailed(f"{self.model} at {url} gave no grade: {content[:80]!r}")
        return float(grade.group())


class CrossEncoderJudge(CrossEncoderJudgeSettings):
    """A sentence-transformers CrossEncoder (hub id or folder) reading (query, passage)."""

    _encoder: Any = PrivateAttr(None)

    @property
    def name(self) -> str:
        return "cross-encoder"

    def fingerprint(self) -> str:
        return hash_parts("cross-encoder", self.model)

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        from sentence_transformers import CrossEncoder

        if self._encoder is None:
            self._encoder = CrossEncoder(self.model)
        pairs = [(query, passage) for passage in passages]
        scores = self._encoder.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        return [float(s) for s in scores]


_BACKENDS: dict[str, type[Judge]] = {
    "local": LocalJudge,
    "api": ApiJudge,
    "cross-encoder": CrossEncoderJudge,
}


def make_judge(settings: JudgeSettings | Mapping[str, Any] | str, **fields: Any) -> Judge:
    """The judge `settings` describe (a model, a dict with `backend`, or a bare backend name),
    with `fields` set on it; unknown backends or settings are a `ValueError` listing what is
    known."""
    chosen = chosen_backend(JudgeSettings, settings, JUDGES, "judge")
    return _BACKENDS[chosen.backend](**(chosen.model_dump(exclude_unset=True) | fields))
