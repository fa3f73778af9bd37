"""Questions from any OpenAI-compatible endpoint: OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp.

Two endpoints, because two kinds of model. `chat` (`/chat/completions`) sends an instruction and
suits instruction-tuned models. `completions` (`/completions`) sends the same few-shot document
the local generator uses and suits *base* models, which answer a chat request with empty content
(docs/library-notes.md).

Calls go through `tasks.llm.http.ApiClient` (retries, Retry-After, the key in a header only). A
passage that still fails gets `Generation.error` and the run goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx
from pydantic import Field, PrivateAttr

from tasks.llm.http import ApiCallFailed, ApiClient
from tasks.progress import Progress
from tasks.questions.generation import Generation
from tasks.questions.prompts import (
    STOP_MARKERS,
    chat_messages,
    drop_echoes,
    passage_seed,
    split_questions,
)
from tasks.questions.settings import ApiGeneratorSettings
from tasks.workspace import fingerprint as hash_parts

#: tokens allowed per question asked for
TOKENS_PER_QUESTION = 48


class ApiGenerator(ApiGeneratorSettings):
    """Questions from an OpenAI-compatible HTTP API, with bounded concurrency and retries."""

    n: int = Field(1, ge=1)
    #: the request's `seed` (per passage) where the server supports it; None omits it
    seed: int | None = 0
    show_progress: bool = True
    _client: ApiClient = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._client = ApiClient(self)
        self.base_url = self._client.base_url
        if not self.send_seed:
            self.seed = None

    @property
    def name(self) -> str:
        return "api"

    @property
    def url(self) -> str:
        return self._client.url(self.endpoint)

    def fingerprint(self) -> str:
        return hash_parts(
            "api",
            self.base_url,
            self.endpoint,
            self.model,
            self.n,
            self.temperature,
            self.max_tokens,
            self.seed,
            self.chat_system if self.endpoint == "chat" else None,
            self.chat_template if self.endpoint == "chat" else None,
            self.template if self.endpoint == "completions" else None,
            self.few_shot if self.endpoint == "completions" else None,
            self.few_shot_k if self.endpoint == "completions" else None,
            self.example_queries,
            self.max_passage_chars,
        )

    def generate(
        self, passages: Sequence[str], progress: Progress | None = None
    ) -> list[Generation]:
        from tqdm.auto import tqdm

        results: dict[int, Generation] = {}
        done = 0
        with (
            self._client.session() as client,
            ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="ragtune-api"
            ) as pool,
            tqdm(
                total=len(passages),
                desc="questions (api)",
                unit="passage",
                disable=not self.show_progress,
            ) as bar,
        ):
            futures = {
                pool.submit(self._one, client, passage): i for i, passage in enumerate(passages)
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                bar.update(1)
                if progress:
                    progress(done, len(passages))
        return [results[i] for i in range(len(passages))]

    def _one(self, client: httpx.Client, passage: str) -> Generation:
        if not passage.strip():
            return Generation([], error="empty passage")
        result = Generation([])
        try:
            if self.endpoint == "chat":
                self._chat(client, passage, result)
            else:
                self._completions(client, passage, result)
        except ApiCallFailed as exc:
            result.questions, result.error = [], self._client.redact(str(exc))
        return result

    def _chat(self, client: httpx.Client, passage: str, result: Generation) -> None:
        messages = chat_messages(
            passage,
            n=self.n,
            seed=self.seed or 0,
            system=self.chat_system,
            template=self.chat_template,
            example_queries=self.example_queries,
            max_chars=self.max_passage_chars,
        )
        payload = self._payload(passage, 0, messages=messages)
        payload["max_tokens"] = self.max_tokens or TOKENS_PER_QUESTION * self.n
        data = self._client.post(client, self.endpoint, payload, result)
        content = data["choices"][0]["message"].get("content") or ""
        questions = split_questions(content, limit=self.n)
        result.questions = drop_echoes(questions, self.example_queries)
        if not questions:
            raise ApiCallFailed(
                f"{self.model} at {self.url} answered with no question "
                "(a base model does not chat: use endpoint='completions')"
            )

    def _completions(self, client: httpx.Client, passage: str, result: Generation) -> None:
        prompt = self.few_shot_document(passage, self.seed or 0)
        answered: list[str] = []
        shown = self.shown_questions()
        # Ask for all n at once; servers that ignore `n` answer one choice, so ask again (with a
        # new seed) until n questions came back or n calls were made.
        for call in range(self.n):
            missing = self.n - len(result.questions)
            if missing <= 0:
                break
            payload = self._payload(passage, call, prompt=prompt, stop=list(STOP_MARKERS))
            payload["max_tokens"] = self.max_tokens or TOKENS_PER_QUESTION
            if missing > 1:
                payload["n"] = missing
            data = self._client.post(client, self.endpoint, payload, result)
            for choice in data["choices"][:missing]:
                answered += split_questions(choice.get("text") or "", limit=1)
            result.questions = drop_echoes(answered, shown)
        if not answered:
            raise ApiCallFailed(f"{self.model} at {self.url} answered with no question")

    def _payload(self, passage: str, call: int, **fields: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "temperature": self.temperature, **fields}
        if self.seed is not None:
            payload["seed"] = passage_seed(passage, self.seed, call) % 2**31
        return payload
