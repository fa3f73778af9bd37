"""The one OpenAI-compatible HTTP client: OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp.

The api question writer and the api judge both post through `ApiClient`, so both follow the
same rules. Failures: rate limits (429, honouring Retry-After), server errors (5xx, 408),
timeouts, connection errors and malformed answers are retried with capped exponential backoff
and jitter; other client errors (401, 404, 400...) are not, since repeating them cannot help.
A call that still fails raises `ApiCallFailed`, whose message the caller records.

The API key comes from an environment variable or a Prefect Secret block. It is sent in a header
and nowhere else: not in logs, errors, `repr`, settings or a fingerprint.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from tasks.settings import Settings

log = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


class ApiCallFailed(RuntimeError):
    """A call that failed for good (after retries, or at once for errors retrying cannot fix)."""


class ApiConnection(Settings):
    """Where an OpenAI-compatible API is and how to call it: shared by the api writer and judge."""

    base_url: str = Field(
        "",
        description="The API root including its version, e.g. https://api.openai.com/v1 or "
        "http://127.0.0.1:11434/v1 (Ollama); blank: $OPENAI_BASE_URL, else OpenAI.",
    )
    model: str = Field("gpt-4o-mini", description="The served model's name.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never logged)."
    )
    api_key_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the key, read instead."
    )
    auth_header: str = Field(
        "Authorization",
        description='Header carrying the key: "Authorization" sends "Bearer KEY"; Azure also '
        'takes "api-key".',
    )
    query_params: dict[str, str] = Field(
        default_factory=dict,
        description='Extra query parameters, e.g. {"api-version": "2024-10-21"} for Azure.',
    )
    concurrency: int = Field(4, ge=1, description="Calls in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one call may take.")
    max_retries: int = Field(4, ge=0, description="Retries of a call that failed transiently.")
    backoff_s: float = Field(1.0, ge=0, description="First retry's delay; doubles per retry.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest delay between retries.")
    retry_after_max_s: float = Field(
        120.0,
        ge=0,
        description="Longest Retry-After honoured, so a misbehaving server cannot park a run.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key is not a setting: settings end up in flow-run parameters. Put the key "
                "in the environment variable named by api_key_env, or in a Prefect Secret block "
                "named by api_key_secret"
            )
        return data

    def resolved_base_url(self) -> str:
        url = self.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        return url


class ApiClient:
    """Calls to one API root with one key: headers, retries, usage totals, redaction."""

    def __init__(self, connection: ApiConnection) -> None:
        self.connection = connection
        self.base_url = connection.resolved_base_url()
        self._key: str | None = None
        self._key_loaded = False
        self._key_lock = threading.Lock()

    def url(self, endpoint: Endpoint) -> str:
        return self.base_url + _PATHS[endpoint]

    @contextmanager
    def session(self) -> Iterator[httpx.Client]:
        """An HTTP client with room for `concurrency` connections."""
        c = self.connection
        limits = httpx.Limits(max_connections=c.concurrency)
        with httpx.Client(timeout=c.timeout_s, limits=limits) as client:
            yield client

    def post(
        self,
        client: httpx.Client,
        endpoint: Endpoint,
        payload: dict[str, Any],
        usage: Any | None = None,
    ) -> dict[str, Any]:
        """One call with retries; adds its token usage to `usage` (anything with
        `prompt_tokens` and `completion_tokens`) when given."""
        c, url, headers = self.connection, self.url(endpoint), self.headers()
        for attempt in range(c.max_retries + 1):
            retry_after: float | None = None
            try:
                response = client.post(
                    url, json=payload, headers=headers, params=c.query_params or None
                )
            except httpx.TimeoutException:
                reason = f"timed out after {c.timeout_s:g} s"
            except httpx.RequestError as exc:
                reason = f"connection error ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                        _check_answer(data, endpoint)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:
                        reason = f"malformed answer ({exc})"
                    else:
                        if usage is not None:
                            _add_usage(usage, data.get("usage"))
                        return data
                elif status == 429 or status == 408 or status >= 500:
                    reason = f"HTTP {status}"
                    if status == 429:
                        retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    raise ApiCallFailed(self._client_error(response, endpoint))
            if attempt == c.max_retries:
                raise ApiCallFailed(
                    f"{url} failed after {attempt + 1} attempt(s); last error: {reason}"
                )
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, min(retry_after, c.retry_after_max_s))
            log.warning(
                "%s: %s; retry %d/%d in %.2f s",
                url,
                self.redact(reason),
                attempt + 1,
                c.max_retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter, so clients that failed together spread out."""
        ceiling = min(self.connection.backoff_max_s, self.connection.backoff_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _client_error(self, response: httpx.Response, endpoint: Endpoint) -> str:
        c = self.connection
        body = " ".join(response.text.split())[:300]
        hint = ""
        if response.status_code in (401, 403):
            source = (
                f"the Prefect Secret block {c.api_key_secret!r}"
                if c.api_key_secret
                else f"${c.api_key_env}"
            )
            hint = f" Check the API key in {source}."
        elif response.status_code == 404:
            hint = (
                f" Check base_url (it includes the version, e.g. .../v1), the model name "
                f"{c.model!r} and the endpoint {endpoint!r}."
            )
        return self.redact(f"HTTP {response.status_code} from {self.url(endpoint)}: {body}.{hint}")

    def headers(self) -> dict[str, str]:
        key = self._api_key()
        if not key:
            return {}
        header = self.connection.auth_header
        return {header: f"Bearer {key}" if header.lower() == "authorization" else key}

    def _api_key(self) -> str | None:
        with self._key_lock:
            if not self._key_loaded:
                self._key = self._load_key()
                self._key_loaded = True
            return self._key

    def _load_key(self) -> str | None:
        c = self.connection
        if c.api_key_secret:
            from prefect.blocks.system import Secret

            try:
                return str(Secret.load(c.api_key_secret).get())
            except (ValueError, RuntimeError, OSError) as exc:
                raise ValueError(
                    f"Cannot load the Prefect Secret block {c.api_key_secret!r} "
                    f"(api_key_secret): {exc}"
                ) from None
        key = os.environ.get(c.api_key_env)
        if not key:
            log.info(
                "No API key in $%s: sending requests without one (fine for local servers)",
                c.api_key_env,
            )
        return key or None

    def redact(self, text: str) -> str:
        """`text` with this client's key, once loaded, replaced by ***."""
        return redact(text, [self._key] if self._key else [])


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every non-empty secret in `secrets` replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _add_usage(usage: Any, reported: Any) -> None:
    reported = reported if isinstance(reported, dict) else {}
    usage.prompt_tokens += int(reported.get("prompt_tokens") or 0)
    usage.completion_tokens += int(reported.get("completion_tokens") or 0)


def _check_answer(data: Any, endpoint: Endpoint) -> None:
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
