"""Questions from any OpenAI-compatible endpoint: OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp.

Two endpoints, because two kinds of model. `chat` (`/chat/completions`) sends an instruction and
suits instruction-tuned models. `completions` (`/completions`) sends the same few-shot document
the local generator uses and suits *base* models, which answer a chat request with empty content
(docs/library-notes.md).

Failures are per passage: rate limits (429, honouring Retry-After), server errors (5xx, 408),
timeouts, connection errors and malformed answers are retried with capped exponential backoff
and jitter; other client errors (401, 404, 400...) are not, since repeating them cannot help.
A passage that still fails gets `Generation.error` and the run goes on.

The API key comes from an environment variable or a Prefect Secret block. It is sent in a header
and nowhere else: not in logs, errors, `repr` or the fingerprint.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from tasks.generators import Generation, Progress
from tasks.generators.prompts import (
    DEFAULT_CHAT_SYSTEM,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_FEW_SHOT,
    DEFAULT_FEW_SHOT_TEMPLATE,
    STOP_MARKERS,
    FewShot,
    as_few_shot,
    chat_messages,
    check_template,
    drop_echoes,
    few_shot_prompt,
    passage_seed,
    split_questions,
)
from tasks.workspace import fingerprint as hash_parts

log = logging.getLogger(__name__)

#: tokens allowed per question asked for
TOKENS_PER_QUESTION = 48


class ApiCallFailed(RuntimeError):
    """A call that failed for good (after retries, or at once for errors retrying cannot fix)."""


@dataclass
class ApiGenerator:
    """Questions from an OpenAI-compatible HTTP API, with bounded concurrency and retries."""

    #: the API root including its version, e.g. https://api.openai.com/v1 or
    #: http://127.0.0.1:11434/v1 (Ollama); empty uses $OPENAI_BASE_URL, else OpenAI
    base_url: str = ""
    model: str = "gpt-4o-mini"
    #: "chat" for instruction models, "completions" (few-shot prompt) for base models
    endpoint: Literal["chat", "completions"] = "chat"
    api_key_env: str = "OPENAI_API_KEY"
    #: name of a Prefect Secret block holding the key; loaded only when given
    api_key_secret: str | None = None
    #: header that carries the key: "Authorization" sends "Bearer KEY"; Azure also takes "api-key"
    auth_header: str = "Authorization"
    #: extra query parameters, e.g. {"api-version": "2024-10-21"} for Azure OpenAI
    query_params: dict[str, str] = field(default_factory=dict)
    n: int = 1
    temperature: float = 0.7
    #: completion tokens per call; None allows 48 per question asked for
    max_tokens: int | None = None
    #: sent as the request's `seed` (per passage) where the server supports it; None omits it
    seed: int | None = 0
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    #: the longest Retry-After honoured, so a misbehaving server cannot park a run for hours
    retry_after_max_s: float = 120.0
    chat_system: str = DEFAULT_CHAT_SYSTEM
    #: chat user message, a str.format template with {n}, {passage} and {style}
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    #: few-shot document for `completions`, a str.format template with {examples} and {passage}
    template: str = DEFAULT_FEW_SHOT_TEMPLATE
    few_shot: Sequence[FewShot] = DEFAULT_FEW_SHOT
    few_shot_k: int = 3
    example_queries: Sequence[str] = ()
    max_passage_chars: int = 1500
    show_progress: bool = True
    name: str = field(default="api", init=False)
    _key: str | None = field(default=None, init=False, repr=False, compare=False)
    _key_loaded: bool = field(default=False, init=False, repr=False, compare=False)
    _key_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.base_url = (
            self.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        ).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(
                f"endpoint must be 'chat' or 'completions', got {self.endpoint!r} "
                "(use 'completions' for base models)"
            )
        check_template(self.chat_template, ["passage"], "chat_template")
        check_template(self.template, ["examples", "passage"], "template")
        for setting in ("n", "concurrency", "few_shot_k", "max_passage_chars"):
            if int(getattr(self, setting)) < 1:
                raise ValueError(f"{setting} must be at least 1, got {getattr(self, setting)!r}")
        for setting in ("max_retries", "backoff_s", "backoff_max_s", "retry_after_max_s"):
            if getattr(self, setting) < 0:
                raise ValueError(f"{setting} must be >= 0, got {getattr(self, setting)!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        self.few_shot = as_few_shot(self.few_shot)
        self.example_queries = [str(q) for q in self.example_queries]

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

    @property
    def url(self) -> str:
        return self.base_url + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    def generate(
        self, passages: Sequence[str], progress: Progress | None = None
    ) -> list[Generation]:
        from tqdm.auto import tqdm

        results: dict[int, Generation] = {}
        headers = self.headers()
        limits = httpx.Limits(max_connections=self.concurrency)
        done = 0
        with (
            httpx.Client(timeout=self.timeout_s, limits=limits) as client,
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
                pool.submit(self._one, client, headers, passage): i
                for i, passage in enumerate(passages)
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                bar.update(1)
                if progress:
                    progress(done, len(passages))
        return [results[i] for i in range(len(passages))]

    def _one(self, client: httpx.Client, headers: dict[str, str], passage: str) -> Generation:
        if not passage.strip():
            return Generation([], error="empty passage")
        result = Generation([])
        try:
            if self.endpoint == "chat":
                self._chat(client, headers, passage, result)
            else:
                self._completions(client, headers, passage, result)
        except ApiCallFailed as exc:
            result.questions, result.error = [], self.redact(str(exc))
        return result

    def _chat(
        self, client: httpx.Client, headers: dict[str, str], passage: str, result: Generation
    ) -> None:
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
        data = self.post(client, headers, payload, result)
        content = data["choices"][0]["message"].get("content") or ""
        questions = split_questions(content, limit=self.n)
        result.questions = drop_echoes(questions, self.example_queries)
        if not questions:
            raise ApiCallFailed(
                f"{self.model} at {self.url} answered with no question "
                "(a base model does not chat: use endpoint='completions')"
            )

    def _completions(
        self, client: httpx.Client, headers: dict[str, str], passage: str, result: Generation
    ) -> None:
        prompt = few_shot_prompt(
            passage,
            pool=self.few_shot,
            k=self.few_shot_k,
            seed=self.seed or 0,
            template=self.template,
            example_queries=self.example_queries,
            max_chars=self.max_passage_chars,
        )
        answered: list[str] = []
        shown = [q for _, q in self.few_shot] + list(self.example_queries)
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
            data = self.post(client, headers, payload, result)
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

    def post(
        self,
        client: httpx.Client,
        headers: dict[str, str],
        payload: dict[str, Any],
        result: Generation,
    ) -> dict[str, Any]:
        """One call to `url` with retries; adds the call's token usage to `result`. The
        api judge posts through it too, so both follow the same retry and secret rules."""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = client.post(
                    self.url, json=payload, headers=headers, params=self.query_params or None
                )
            except httpx.TimeoutException:
                reason = f"timed out after {self.timeout_s:g} s"
            except httpx.RequestError as exc:
                reason = f"connection error ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                        _check_answer(data, self.endpoint)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        reason = f"malformed answer ({exc})"
                    else:
                        usage = data.get("usage")
                        usage = usage if isinstance(usage, dict) else {}
                        result.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                        result.completion_tokens += int(usage.get("completion_tokens") or 0)
                        return data
                elif status == 429 or status == 408 or status >= 500:
                    reason = f"HTTP {status}"
                    if status == 429:
                        retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    raise ApiCallFailed(self._client_error(response))
            if attempt == self.max_retries:
                raise ApiCallFailed(
                    f"{self.url} failed after {attempt + 1} attempt(s); last error: {reason}"
                )
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.retry_after_max_s))
            log.warning(
                "%s: %s; retry %d/%d in %.2f s",
                self.url,
                self.redact(reason),
                attempt + 1,
                self.max_retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter, so clients that failed together spread out."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _client_error(self, response: httpx.Response) -> str:
        body = " ".join(response.text.split())[:300]
        hint = ""
        if response.status_code in (401, 403):
            source = (
                f"the Prefect Secret block {self.api_key_secret!r}"
                if self.api_key_secret
                else f"${self.api_key_env}"
            )
            hint = f" Check the API key in {source}."
        elif response.status_code == 404:
            hint = (
                f" Check base_url (it includes the version, e.g. .../v1), the model name "
                f"{self.model!r} and the endpoint {self.endpoint!r}."
            )
        return self.redact(f"HTTP {response.status_code} from {self.url}: {body}.{hint}")

    def headers(self) -> dict[str, str]:
        key = self._api_key()
        if not key:
            return {}
        value = f"Bearer {key}" if self.auth_header.lower() == "authorization" else key
        return {self.auth_header: value}

    def _api_key(self) -> str | None:
        with self._key_lock:
            if not self._key_loaded:
                self._key = self._load_key()
                self._key_loaded = True
            return self._key

    def _load_key(self) -> str | None:
        if self.api_key_secret:
            from prefect.blocks.system import Secret

            try:
                return str(Secret.load(self.api_key_secret).get())
            except (ValueError, RuntimeError, OSError) as exc:
                raise ValueError(
                    f"Cannot load the Prefect Secret block {self.api_key_secret!r} "
                    f"(api_key_secret): {exc}"
                ) from None
        key = os.environ.get(self.api_key_env)
        if not key:
            log.info(
                "No API key in $%s: sending requests without one (fine for local servers)",
                self.api_key_env,
            )
        return key or None

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _check_answer(data: Any, endpoint: str) -> None:
    """Raise when a 200 answer lacks what the endpoint promises (treated as retryable)."""
    choices = data["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError("no choices")
    for choice in choices:
        if not isinstance(choice, dict):
            raise TypeError("a choice is not an object")
        if endpoint == "chat":
            message = choice["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        elif not isinstance(choice.get("text", ""), str):
            raise TypeError("text is not a string")


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
