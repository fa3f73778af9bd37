"""The questions flow, run by a real Prefect API over a real chunk set in a workspace."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from prefect import flow
from pydantic import ValidationError

from flows.params import QuestionParams
from flows.questions import QuestionsResult, ask, questions
from tasks.questions.generation import Generation
from tasks.workspace import load_rows, save_rows
from tests.conftest import JsonHandler, serving

SECRET = "sk-test-0123456789abcdef"

#: chunk id -> (document, passage, what a sloppy generator says about it)
CORPUS = {
    "photo": (
        "biology.pdf",
        "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant "
        "cells, chlorophyll absorbs sunlight, and the plant uses that energy to turn carbon "
        "dioxide and water into glucose, releasing oxygen as a by-product.",
        ["1. How do plants turn sunlight into glucose?", "2. Which pigment absorbs sunlight?"],
    ),
    "bees": (
        "biology.pdf",
        "Honeybees communicate the location of flowers with the waggle dance. The angle of the "
        "dance relative to vertical gives the direction of the food source relative to the sun, "
        "and the duration of the waggle run encodes the distance.",
        ["Q1: How do honeybees tell each other where flowers are?", "Q2: What is a waggle run?"],
    ),
    "volcano": (
        "earth.pdf",
        "A volcano erupts when magma from the Earth's mantle rises through cracks in the crust. "
        "Pressure from dissolved gases drives lava, ash and volcanic bombs out of the vent, and "
        "pyroclastic flows can race down the slopes at hundreds of kilometres per hour.",
        ["- What makes a volcano erupt?", "- How fast can pyroclastic flows travel?"],
    ),
    "lighthouse": (
        "earth.pdf",
        "A lighthouse marks dangerous coastlines for ships at night. Its Fresnel lens focuses the "
        "lamp into a beam visible for over twenty nautical miles, and each light has its own "
        "flash pattern so sailors can tell lighthouses apart.",
        ['"What does a Fresnel lens do in a lighthouse?"', "Lighthouses are tall."],
    ),
    "tcp": (
        "computing.pdf",
        "TCP congestion control keeps senders from overwhelming the network. Slow start doubles "
        "the congestion window every round trip until packet loss is detected, after which the "
        "sender halves its window and grows it linearly again.",
        ["How does TCP slow start grow the congestion window?", "What does TCP do after loss?"],
    ),
    "bitcoin": (
        "computing.pdf",
        "Bitcoin miners compete to find a nonce whose block hash falls below the network target. "
        "The winner appends the block to the blockchain and earns the block subsidy plus the "
        "transaction fees of the transactions it includes.",
        [
            "What do Bitcoin miners compete to find?",
            "Who appends the block to the blockchain and earns the block subsidy plus fees?",
            "How long should an espresso shot take to brew?",
        ],
    ),
    "coffee": (
        "food.pdf",
        "Espresso is brewed by forcing hot water at about nine bars of pressure through finely "
        "ground coffee. A good shot takes 25 to 30 seconds and is topped by crema, a foam of "
        "emulsified oils and carbon dioxide.",
        ["At what pressure is espresso brewed?", "What is the crema on an espresso?"],
    ),
    "revolution": (
        "history.pdf",
        "The French Revolution began in 1789 with the storming of the Bastille. It abolished the "
        "monarchy, proclaimed the First Republic in 1792 and ended with Napoleon Bonaparte's "
        "coup of 18 Brumaire in 1799.",
        [
            "When did the French Revolution begin?",
            "when did the French Revolution begin ?",
            "When did the French Revolution actually begin?",
            "How did the French Revolution end?",
        ],
    ),
}


@dataclass
class ScriptedGenerator:
    """A deterministic generator that answers from a script and counts the passages it gets.

    A passage containing `fail_once` fails the first time it is asked, with the API key in the
    error message, the way some HTTP errors echo a request URL.
    """

    script: dict[str, list[str]]
    fail_once: str | None = None
    calls: list[str] = field(default_factory=list)
    name: str = "scripted"

    def fingerprint(self) -> str:
        return "scripted-1"

    def generate(self, passages: Sequence[str], progress=None) -> list[Generation]:
        out = []
        for i, passage in enumerate(passages):
            first_time = passage not in self.calls
            self.calls.append(passage)
            if self.fail_once and self.fail_once in passage and first_time:
                out.append(Generation([], error=f"401 for https://llm.test/v1?key={SECRET}"))
            else:
                said = list(self.script[passage])
                out.append(Generation(said, prompt_tokens=10, completion_tokens=5 * len(said)))
            if progress:
                progress(i + 1, len(passages))
        return out


@pytest.fixture
def chunked(workspace):
    rows = [
        {
            "id": chunk_id,
            "doc_id": doc,
            "source": f"/docs/{doc}",
            "page_start": 1,
            "page_end": 1,
            "text": text,
            "n_tokens": len(text.split()),
        }
        for chunk_id, (doc, text, _) in CORPUS.items()
    ]
    save_rows(workspace.chunks_dir, rows)
    return workspace


def generator(fail_once: str | None = None) -> ScriptedGenerator:
    return ScriptedGenerator({text: said for _, text, said in CORPUS.values()}, fail_once)


def run(params: QuestionParams, gen: ScriptedGenerator) -> tuple[QuestionsResult, list[dict]]:
    """Run `ask` inside a real flow run, and return its result and its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    @flow(name="questions-under-test")
    def questions_with_generator() -> QuestionsResult:
        return ask(params, gen)

    state = questions_with_generator(return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return result, [{"key": a.key, "type": a.type, "data": a.data} for a in artifacts]


def test_questions_are_cleaned_filtered_split_saved_and_reported(prefect_api, chunked, monkeypatch):
    # A key the error below echoes: secret-looking environment variables are masked.
    monkeypatch.setenv("RAGTUNE_TEST_LLM_KEY", SECRET)
    gen = generator(fail_once="Bastille")
    params = QuestionParams(
        workspace=str(chunked.root),
        round_trip_top_k=1,
        test_size=0.25,
        seed=43,  # puts the bitcoin chunk, with its off-topic question, in train
    )
    result, artifacts = run(params, gen)

    assert result.llm_calls == len(CORPUS) and result.failed == 1
    assert result.generated == 15  # everything but the failed chunk's four
    assert result.rejected == {
        "not_a_question": 1,
        "copies_passage": 1,
        "round_trip": 1,
    }
    assert result.kept == result.train + result.test == 12
    assert result.prompt_tokens == 10 * 7
    assert result.completion_tokens == 5 * 15

    rows = load_rows(chunked.questions_dir)
    assert set(rows[0]) == {"question", "chunk_id", "generator", "split", "kept", "reject_reason"}
    assert len(rows) == result.generated
    by_text = {r["question"]: r for r in rows}
    assert by_text["How do plants turn sunlight into glucose?"]["kept"]  # "1. " stripped
    assert by_text["What does a Fresnel lens do in a lighthouse?"]["kept"]  # quotes stripped
    off_topic = by_text["How long should an espresso shot take to brew?"]
    assert (off_topic["kept"], off_topic["reject_reason"], off_topic["split"]) == (
        False,
        "round_trip",
        "",
    )
    sides: dict[str, set[str]] = {}
    for r in rows:
        if r["kept"]:
            sides.setdefault(r["chunk_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {s for ss in sides.values() for s in ss} == {"train", "test"}

    kinds = {a["key"]: a for a in artifacts}
    assert kinds["questions-generation"]["type"] == "progress"
    assert kinds["questions-generation"]["data"] == 100.0
    report = kinds["questions-summary"]["data"]
    assert "| round_trip | 1 |" in report and "| duplicate | 0 |" in report
    assert "## Samples" in report and "## Tokens spent by this run" in report
    assert "401 for https://llm.test/v1?key=***" in report
    assert all(SECRET not in str(a["data"]) for a in artifacts)


def test_held_out_questions_are_never_judged_by_the_base_model(prefect_api, chunked):
    """The round trip keeps training data clean; applied to the test split it would keep only
    questions the base model already answers, and the evaluation would flatter the base."""
    params = QuestionParams(
        workspace=str(chunked.root),
        round_trip_top_k=1,
        test_size=0.25,
        seed=42,  # puts the bitcoin chunk, with its off-topic question, in test
    )
    run(params, generator())
    rows = load_rows(chunked.questions_dir)
    off_topic = next(r for r in rows if r["question"].startswith("How long should an espresso"))
    assert (off_topic["split"], off_topic["kept"]) == ("test", True)
    assert all(r["split"] == "train" for r in rows if r["reject_reason"] == "round_trip")


def test_a_second_run_asks_only_about_chunks_that_failed_and_can_split_by_document(
    prefect_api, chunked
):
    gen = generator(fail_once="Bastille")
    first, _ = run(QuestionParams(workspace=str(chunked.root), round_trip_top_k=1), gen)
    assert first.failed == 1

    again = QuestionParams(
        workspace=str(chunked.root), round_trip_top_k=1, split_by="document", test_size=0.3
    )
    second, _ = run(again, gen)
    assert gen.calls[len(CORPUS) :] == [CORPUS["revolution"][1]]  # only the failed chunk
    assert (second.llm_calls, second.cached, second.failed) == (1, len(CORPUS) - 1, 0)
    assert second.rejected["duplicate"] == 1 and second.rejected["near_duplicate"] == 1

    third, _ = run(again, gen)
    assert third.llm_calls == 0 and len(gen.calls) == len(CORPUS) + 1
    rows = load_rows(chunked.questions_dir)
    doc_of = {chunk_id: doc for chunk_id, (doc, _, _) in CORPUS.items()}
    sides: dict[str, set[str]] = {}
    for r in rows:
        if r["kept"]:
            sides.setdefault(doc_of[r["chunk_id"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert third.test > 0 and third.train > 0


def test_max_chunks_asks_about_a_seeded_sample_only(prefect_api, chunked):
    gen = generator()
    params = QuestionParams(workspace=str(chunked.root), max_chunks=4, seed=7)
    result, _ = run(params, gen)
    assert result.chunks == 4 and len(gen.calls) == 4
    other = generator()
    run(QuestionParams(workspace=str(chunked.root), max_chunks=4, seed=7), other)
    assert other.calls == []  # same sample, all from the cache


def test_an_unknown_generator_or_setting_fails_before_the_run_starts():
    with pytest.raises(ValidationError, match=r"'nope'.*expected tags: 'local', 'api'"):
        QuestionParams(generator={"backend": "nope"})
    with pytest.raises(ValidationError, match=r"unknown setting 'modle' \(did you mean 'model'"):
        QuestionParams(generator={"backend": "api", "modle": "llama3.1"})
    with pytest.raises(ValidationError, match="api_key is not a setting"):
        QuestionParams(generator={"backend": "api", "api_key": SECRET})


@pytest.fixture
def chat_server():
    """A real OpenAI-compatible chat endpoint on 127.0.0.1 that answers from the script."""
    asked: list[str] = []

    class Handler(JsonHandler):
        def do_POST(self):
            body = self.json_body()
            prompt = " ".join(m["content"] for m in body["messages"])
            passage = next(text for _, text, _ in CORPUS.values() if text in prompt)
            asked.append(passage)
            said = next(said for _, text, said in CORPUS.values() if text == passage)
            answer = {
                "choices": [{"message": {"role": "assistant", "content": "\n".join(said)}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20},
            }
            self.send(200, json.dumps(answer))

    with serving(Handler) as url:
        yield url, asked


def test_the_flow_builds_its_generator_by_name_and_never_pays_twice(
    prefect_api, chunked, chat_server
):
    """End to end through `make_generator`: the api generator against a real local server."""
    base_url, asked = chat_server
    params = QuestionParams(
        workspace=str(chunked.root),
        generator={"backend": "api", "base_url": base_url, "model": "scripted"},
        questions_per_chunk=4,
        round_trip_top_k=1,
        seed=43,  # puts the bitcoin chunk, with its off-topic question, in train
    )
    first = questions(params)
    assert sorted(asked) == sorted(text for _, text, _ in CORPUS.values())
    assert (first.llm_calls, first.failed, first.prompt_tokens) == (8, 0, 800)
    assert first.generated == 19
    assert first.rejected == {
        "not_a_question": 1,
        "copies_passage": 1,
        "duplicate": 1,
        "near_duplicate": 1,
        "round_trip": 1,
    }
    assert first.kept == first.train + first.test == 14

    second = questions(params)
    assert len(asked) == len(CORPUS)
    assert (second.llm_calls, second.cached, second.kept) == (0, 8, 14)
    rows = load_rows(chunked.questions_dir)
    assert {r["generator"] for r in rows} == {"api"}
