"""The `api` generator against a real HTTP server on 127.0.0.1 that speaks the OpenAI protocol.

The server misbehaves on cue: a passage containing a marker (e.g. "RATE") gets that marker's
scripted answers in order (the last one repeats), so each failure mode is tested on one passage
while the others show that the rest of the run is unaffected.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasks.questions.generation import Generation
from tasks.questions.writers import make_generator
from tests.conftest import JsonHandler, serving

KEY = "sk-ragtune-test-7f3a9c1e5b"
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "show_progress": False}


@dataclass
class Script:
    """What the server does, and what it saw."""

    plans: dict[str, list[Any]] = field(default_factory=dict)
    #: seconds every successful answer is held, so concurrent calls overlap
    hold_s: float = 0.0
    honour_n: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def action(self, text: str) -> tuple[str, Any]:
        for marker, plan in self.plans.items():
            if marker in text:
                with self.lock:
                    step = plan.pop(0) if len(plan) > 1 else plan[0]
                return marker, step
        return "", "ok"

    def calls(self, marker: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["marker"] == marker]


def make_handler(script: Script) -> type[JsonHandler]:
    class Handler(JsonHandler):
        def do_POST(self) -> None:
            body = self.json_body()
            marker, step = script.action(json.dumps(body))
            with script.lock:
                script.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "marker": marker,
                        "at": time.monotonic(),
                    }
                )
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                self.answer(body, step)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a slow answer, as it should
            finally:
                with script.lock:
                    script.in_flight -= 1

        def answer(self, body: dict[str, Any], step: Any) -> None:
            kind, _, arg = str(step).partition(":")
            if kind == "slow":
                script.closing.wait(float(arg))
                kind = "ok"
            if kind == "ok":
                script.closing.wait(script.hold_s)
                self.send(200, json.dumps(self.completion(body)))
            elif kind == "429":
                self.send(429, '{"error": "slow down"}', {"Retry-After": arg})
            elif kind == "malformed":
                self.send(200, '{"choices": [{"message": ')
            elif kind == "nochoices":
                self.send(200, '{"choices": []}')
            elif kind == "oddchoice":
                self.send(200, '{"choices": ["not an object"], "usage": "n/a"}')
            elif kind == "echo401":
                # some servers echo the credentials they rejected
                self.send(401, json.dumps({"error": f"bad key {self.headers['Authorization']}"}))
            elif kind == "empty":
                self.send(200, json.dumps(self.completion(body, content="")))
            else:
                self.send(int(kind), '{"error": "scripted failure"}')

        def completion(self, body: dict[str, Any], content: str | None = None) -> dict[str, Any]:
            usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
            if self.path.split("?")[0].endswith("/chat/completions"):
                text = (
                    "Here are the questions:\n1. What is the first point?\n"
                    '2) Why does it matter?\n- Q: "How is it measured?"\n'
                    '4. Who defined the "risk tier"'
                    if content is None
                    else content
                )
                return {
                    "choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": usage,
                }
            count = body.get("n", 1) if script.honour_n else 1
            choices = [{"index": k, "text": f" What is sample {k}?"} for k in range(count)]
            return {"choices": choices, "usage": usage}

    return Handler


@pytest.fixture
def server():
    script = Script()
    with serving(make_handler(script)) as url:
        yield url, script
        script.closing.set()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("RAGTUNE_TEST_KEY", KEY)
    return "RAGTUNE_TEST_KEY"


def passages(*markers: str) -> list[str]:
    return [f"Passage {m} about the topic number {i}." for i, m in enumerate(markers)]


def test_chat_questions_are_split_and_stripped_one_per_line(server, key):
    url, script = server
    gen = make_generator("api", base_url=url, model="m", n=4, api_key_env=key, **FAST)
    [result] = gen.generate(passages("plain"))
    assert result == Generation(
        questions=[
            "What is the first point?",
            "Why does it matter?",
            "How is it measured?",
            'Who defined the "risk tier"',
        ],
        prompt_tokens=100,
        completion_tokens=20,
    )
    [request] = script.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "m"
    assert "Passage plain about the topic" in request["body"]["messages"][-1]["content"]


def test_rate_limit_waits_for_retry_after_then_succeeds(server, key):
    url, script = server
    script.plans["RATE"] = ["429:1", "ok"]
    gen = make_generator("api", base_url=url, api_key_env=key, **FAST)
    start = time.monotonic()
    results = gen.generate(passages("RATE", "calm"))
    elapsed = time.monotonic() - start
    assert [r.error for r in results] == [None, None]
    assert results[0].questions
    first, second = script.calls("RATE")
    assert second["at"] - first["at"] >= 1.0
    assert elapsed >= 1.0


def test_an_excessive_retry_after_is_capped(server, key):
    """A server asking for an hour's pause must not park the run: retry_after_max_s caps it."""
    url, script = server
    script.plans["PARK"] = ["429:3600", "ok"]
    gen = make_generator("api", base_url=url, api_key_env=key, retry_after_max_s=0.2, **FAST)
    [result] = gen.generate(passages("PARK"))
    assert result.error is None
    first, second = script.calls("PARK")
    assert 0.2 <= second["at"] - first["at"] < 5


def test_server_error_then_success_is_retried(server, key):
    url, script = server
    script.plans["FLAKY"] = [500, 503, "ok"]
    [result] = make_generator("api", base_url=url, api_key_env=key, **FAST).generate(
        passages("FLAKY")
    )
    assert result.error is None and result.questions
    assert len(script.calls("FLAKY")) == 3


def test_slow_answer_beyond_timeout_counts_as_a_retry(server, key, caplog):
    url, script = server
    script.plans["SLOW"] = ["slow:3", "ok"]
    gen = make_generator("api", base_url=url, api_key_env=key, timeout_s=0.5, **FAST)
    start = time.monotonic()
    [result] = gen.generate(passages("SLOW"))
    assert time.monotonic() - start < 2.5, "the client must not wait for the slow answer"
    assert result.error is None and result.questions
    assert len(script.calls("SLOW")) == 2
    assert any("timed out after 0.5 s" in r.getMessage() for r in caplog.records)


def test_malformed_json_and_missing_choices_are_retried(server, key):
    url, script = server
    script.plans["BROKEN"] = ["malformed", "nochoices", "oddchoice", "ok"]
    [result] = make_generator("api", base_url=url, api_key_env=key, **FAST).generate(
        passages("BROKEN")
    )
    assert result.error is None and result.questions
    assert len(script.calls("BROKEN")) == 4


def test_permanent_failure_marks_only_that_passage_failed(server, key):
    url, script = server
    script.plans["DOWN"] = [500]
    gen = make_generator("api", base_url=url, api_key_env=key, max_retries=2, **FAST)
    results = gen.generate(passages("ok1", "DOWN", "ok2"))
    assert results[0].error is None and results[2].error is None
    assert results[0].questions and results[2].questions
    failed = results[1]
    assert failed.questions == []
    assert "failed after 3 attempt(s)" in failed.error and "HTTP 500" in failed.error
    assert len(script.calls("DOWN")) == 3


def test_client_errors_are_not_retried_and_never_reveal_the_key(server, key, caplog):
    url, script = server
    script.plans["DENY"] = ["echo401"]
    gen = make_generator("api", base_url=url, api_key_env=key, **FAST)
    [result] = gen.generate(passages("DENY"))
    assert len(script.calls("DENY")) == 1
    assert "HTTP 401" in result.error and "$RAGTUNE_TEST_KEY" in result.error
    assert KEY not in result.error


def test_key_goes_in_the_header_and_nowhere_else(server, key, caplog, monkeypatch):
    url, script = server
    script.plans["RATE"] = ["429:0", "ok"]
    script.plans["DOWN"] = [500]
    caplog.set_level(logging.DEBUG)
    gen = make_generator("api", base_url=url, api_key_env=key, max_retries=1, **FAST)
    results = gen.generate(passages("RATE", "DOWN", "fine"))
    assert {r["headers"]["Authorization"] for r in script.requests} == {f"Bearer {KEY}"}
    assert caplog.records, "retries should have been logged"
    assert not [r for r in caplog.records if KEY in r.getMessage()]
    assert KEY not in repr(gen) and KEY not in str(results)
    before = gen.fingerprint()
    monkeypatch.setenv(key, "sk-another-key")
    assert make_generator("api", base_url=url, api_key_env=key, **FAST).fingerprint() == before


def test_key_from_a_prefect_secret_block(server, prefect_api):
    from prefect.blocks.system import Secret

    url, script = server
    Secret(value=KEY).save("ragtune-test-llm-key", overwrite=True)
    gen = make_generator("api", base_url=url, api_key_secret="ragtune-test-llm-key", **FAST)
    [result] = gen.generate(passages("secret"))
    assert result.error is None
    assert script.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(gen)
    missing = make_generator("api", base_url=url, api_key_secret="no-such-block", **FAST)
    with pytest.raises(
        ValueError, match="Prefect Secret block 'no-such-block' \\(api_key_secret\\)"
    ):
        missing.generate(passages("x"))


def test_azure_style_key_header_and_query_parameters(server, key):
    url, script = server
    gen = make_generator(
        "api",
        base_url=url,
        api_key_env=key,
        auth_header="api-key",
        query_params={"api-version": "2024-10-21"},
        **FAST,
    )
    [result] = gen.generate(passages("azure"))
    assert result.error is None
    [request] = script.requests
    assert request["headers"]["api-key"] == KEY
    assert "Authorization" not in request["headers"]
    assert request["path"] == "/v1/chat/completions?api-version=2024-10-21"


def test_concurrency_is_bounded(server, key):
    url, script = server
    script.hold_s = 0.1
    progress: list[tuple[int, int]] = []
    gen = make_generator("api", base_url=url, api_key_env=key, concurrency=3, **FAST)
    results = gen.generate(
        passages(*[f"p{i}" for i in range(12)]), progress=lambda d, t: progress.append((d, t))
    )
    assert all(r.error is None for r in results)
    assert 2 <= script.max_in_flight <= 3
    assert progress[-1] == (12, 12) and len(progress) == 12


def test_usage_is_summed_over_retries_and_calls(server, key):
    url, script = server
    script.honour_n = False  # like servers that ignore `n`: one choice per call
    gen = make_generator("api", base_url=url, api_key_env=key, endpoint="completions", n=3, **FAST)
    results = gen.generate(passages("a", "b"))
    for result in results:
        assert result.questions == ["What is sample 0?"] * 3
        assert (result.prompt_tokens, result.completion_tokens) == (300, 60)
    assert len(script.requests) == 6


def test_completions_endpoint_sends_the_few_shot_prompt_for_base_models(server, key):
    url, script = server
    gen = make_generator("api", base_url=url, api_key_env=key, endpoint="completions", n=2, **FAST)
    [result] = gen.generate(passages("base"))
    assert result.questions == ["What is sample 0?", "What is sample 1?"]
    [request] = script.requests
    assert request["path"] == "/v1/completions"
    prompt = request["body"]["prompt"]
    assert prompt.count("Question:") == 4  # three examples, then the open one
    assert prompt.endswith("Passage: Passage base about the topic number 0.\nQuestion:")
    assert request["body"]["n"] == 2 and "\n" in request["body"]["stop"]


def test_a_copied_example_question_is_dropped_and_asked_again(server, key):
    url, script = server
    pool = [{"passage": "A passage about samples.", "question": "What is sample 0?"}]
    gen = make_generator(
        "api", base_url=url, api_key_env=key, endpoint="completions", n=2, few_shot=pool, **FAST
    )
    [result] = gen.generate(passages("echo"))
    assert result.questions == ["What is sample 1?"]
    assert [r["body"].get("n", 1) for r in script.requests] == [2, 1]
    assert (
        "Passage: A passage about samples.\nQuestion: What is sample 0?"
        in (script.requests[0]["body"]["prompt"])
    )


def test_real_user_queries_set_the_style_of_both_prompts(server, key):
    """Promptagator: the user's own queries are shown as the style to imitate."""
    url, script = server
    queries = ["reset vpn token", "who approves travel over 5k"]
    for endpoint in ("chat", "completions"):
        gen = make_generator(
            "api", base_url=url, api_key_env=key, endpoint=endpoint, example_queries=queries, **FAST
        )
        [result] = gen.generate(passages(endpoint))
        assert result.error is None
    chat, completions = (json.dumps(r["body"]) for r in script.requests)
    assert "Match the style of these real user questions" in chat
    assert "Questions people ask look like these" in completions
    assert all(q in chat and f"Question: {q}" in completions for q in queries)


def test_empty_chat_answer_points_to_the_completions_endpoint(server, key):
    url, script = server
    script.plans["BASE"] = ["empty"]
    [result] = make_generator("api", base_url=url, api_key_env=key, **FAST).generate(
        passages("BASE")
    )
    assert result.questions == [] and "endpoint='completions'" in result.error


def test_unreachable_server_fails_each_passage_without_raising(key):
    gen = make_generator(
        "api", base_url="http://127.0.0.1:9/v1", api_key_env=key, max_retries=1, **FAST
    )
    results = gen.generate(passages("x", "y"))
    assert all(r.questions == [] and "connection error" in r.error for r in results)


def test_fingerprint_follows_settings_that_change_the_output():
    base = make_generator("api", base_url="http://127.0.0.1:1/v1", model="m")
    same = make_generator("api", base_url="http://127.0.0.1:1/v1", model="m", concurrency=9)
    assert base.fingerprint() == same.fingerprint()
    for change in (
        {"model": "other"},
        {"n": 2},
        {"temperature": 0.2},
        {"chat_template": "Ask {n} about: {passage}"},
        {"endpoint": "completions"},
        {"example_queries": ["how do I reset my password"]},
    ):
        settings = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **change}
        assert make_generator("api", **settings).fingerprint() != base.fingerprint(), change


def test_bad_names_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"'gpt'.*known generators: local, api"):
        make_generator("gpt")
    with pytest.raises(ValueError, match=r"unknown setting 'modle' \(did you mean 'model'\?\)"):
        make_generator("api", modle="x")
    with pytest.raises(ValueError, match=r"api_key is not a setting.*named by api_key_env"):
        make_generator("api", api_key="sk-not-here")
    with pytest.raises(ValueError, match=r"chat_template must contain the placeholder"):
        make_generator("api", chat_template="no passage here")
    with pytest.raises(ValueError, match=r"few_shot\[1\] must be a \(passage, question\) pair"):
        make_generator("api", few_shot=[("P.", "Q?"), "just a string"])
    with pytest.raises(ValueError, match=r"endpoint\n  Input should be 'chat' or 'completions'"):
        make_generator("api", endpoint="embeddings")
