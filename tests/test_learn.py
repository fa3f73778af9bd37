"""Learning from the queries users ask: the log searches write, the judge that labels it (the
real bundled Gemma, and an api judge against real local HTTP servers), the judgement cache, the
training rows it makes, and the held-out share that is never trained on."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from flows.learn import learn
from flows.params import LearnParams, PublishParams, SearchParams
from flows.publish import publish
from flows.search import search
from tasks.learn.judgements import Judgements
from tasks.learn.judges import ApiJudge, CrossEncoderJudge, LocalJudge, make_judge
from tasks.learn.querylog import LOG_NAME, is_held_out, read_queries, unique_queries
from tasks.learn.rows import JudgedQuery, choose_nudge_step, judge_queries, nudge, training_rows
from tasks.models import MINILM
from tasks.training.trainer import TrainSettings, train
from tasks.workspace import load_rows, rows_to_dataset
from tests.conftest import ANSWERED, PASSAGES, JsonHandler, serving

#: Questions about pages 5-7 of NIST AI 600-1, the chunks of `ready_workspace`.
NIST_QUESTIONS = [
    "What risks are unique to generative AI?",
    "How can confabulation affect users of generative AI?",
    "What does the profile say about dangerous or violent recommendations?",
    "Why is data privacy a risk for generative AI systems?",
    "How does generative AI affect information integrity?",
]


# --- the query log ----------------------------------------------------------------------------


def test_search_appends_to_the_log_and_keeps_the_query_out_of_prefect(prefect_api, ready_workspace):
    ws, _ = ready_workspace
    publish(PublishParams(workspace=str(ws.root)))
    secret = "zebra-quartz what does the profile say about confabulation"

    hits = search(SearchParams(workspace=str(ws.root), query=secret, k=3))

    logged = [json.loads(line) for line in (ws.querylog_dir / LOG_NAME).read_text().splitlines()]
    assert [entry["query"] for entry in logged] == [secret]
    assert [h["id"] for h in logged[0]["hits"]] == [hit["id"] for hit in hits]
    assert logged[0]["alias"] == "docs" and logged[0]["collection"].startswith("docs__m-")
    sent = prefect_texts()
    assert any(hits[0]["text"][:40] in m for m in sent), "the search's own lines are logged"
    assert not [m for m in sent if "zebra-quartz" in m]


def test_with_logging_off_a_search_writes_nothing(ready_workspace):
    ws, _ = ready_workspace
    publish.fn(PublishParams(workspace=str(ws.root)))

    search.fn(SearchParams(workspace=str(ws.root), query="risks", log_queries=False))

    assert not (ws.querylog_dir / LOG_NAME).exists()


def test_logs_users_bring_are_read_as_text_jsonl_or_csv_and_duplicates_count_once(tmp_path):
    (tmp_path / "q.txt").write_text("What is a risk?\n\n  what is a   RISK? \nWho audits it?\n")
    (tmp_path / "q.jsonl").write_text('{"text": "What is a risk?"}\n{"text": "How?"}\n')
    (tmp_path / "q.csv").write_text("id,question\n1,Why?\n2,What is a risk?\n")

    texts = read_queries(tmp_path / "q.txt")
    texts += read_queries(tmp_path / "q.jsonl", "text")
    texts += read_queries(tmp_path / "q.csv", "question")

    assert unique_queries(texts) == ["What is a risk?", "Who audits it?", "How?", "Why?"]
    with pytest.raises(ValueError, match="no column 'query'"):
        read_queries(tmp_path / "q.csv")
    with pytest.raises(ValueError, match="line 1: no field 'query'"):
        read_queries(tmp_path / "q.jsonl")


def test_the_held_out_share_is_seeded_by_query_and_near_its_size():
    queries = [f"question number {n}?" for n in range(2000)]

    held = [q for q in queries if is_held_out(q, 0.2)]

    assert 0.17 < len(held) / len(queries) < 0.23
    assert held == [q for q in reversed(queries) if is_held_out(q, 0.2)][::-1]
    assert is_held_out("  QUESTION number 7? ", 0.2) == is_held_out("question number 7?", 0.2)
    assert held != [q for q in queries if is_held_out(q, 0.2, seed=1)]


# --- judging, cached --------------------------------------------------------------------------


class Interrupted(RuntimeError):
    pass


class StopsAfter:
    """The real judge, cut off after `calls` queries: a run killed half way."""

    def __init__(self, judge: LocalJudge, calls: int) -> None:
        self.judge, self.calls, self.name = judge, calls, judge.name

    def fingerprint(self) -> str:
        return self.judge.fingerprint()

    def score(self, query: str, passages: list[str]) -> list[float]:
        if self.calls == 0:
            raise Interrupted("killed")
        self.calls -= 1
        return self.judge.score(query, passages)


def test_the_local_judge_batches_questions_and_claims_each_in_its_own_prompt():
    judge = LocalJudge(cache_size=0)
    items = [("What is the capital of Peru?", PASSAGES), ("Lima is Peru's capital.", PASSAGES)]

    together = judge.score_many(items)

    for (query, passages), scores in zip(items, together, strict=True):
        assert scores == pytest.approx(judge.score(query, passages), abs=0.05)
        assert int(np.argmax(scores)) == 1


def test_an_interrupted_judging_run_resumes_where_it_stopped(tmp_path):
    judge = LocalJudge()
    texts = {f"p{i}": passage for i, passage in enumerate(PASSAGES)}
    candidates = [[(cid, 0.5) for cid in texts]] * len(ANSWERED)
    queries = [question for question, _ in ANSWERED]
    cache = Judgements(tmp_path / "judgements.sqlite")

    with pytest.raises(Interrupted):
        judge_queries(queries, candidates, texts, StopsAfter(judge, 2), cache)
    assert len(cache) == 2 * len(texts), "the two finished queries were stored"
    resumed = judge_queries(queries, candidates, texts, judge, cache)

    assert resumed.new == 1 and resumed.pairs == len(texts)
    for judged, (_, answer) in zip(resumed.judged, ANSWERED, strict=True):
        assert int(np.argmax(judged.judge_scores)) == answer


def test_learn_judges_the_log_once_and_writes_rows_without_the_held_out_share(
    prefect_api, ready_workspace
):
    ws, rows = ready_workspace
    write_log(ws, [*NIST_QUESTIONS, NIST_QUESTIONS[0].upper()])
    params = LearnParams(workspace=str(ws.root), top_k=4, held_out_share=0.4)
    held = {q for q in NIST_QUESTIONS if is_held_out(q, 0.4)}
    assert 0 < len(held) < len(NIST_QUESTIONS), "the fixture needs both sides"

    first = learn(params)
    again = learn(params)

    assert first.logged == len(NIST_QUESTIONS) and first.new == len(NIST_QUESTIONS)
    assert len(Judgements(ws.judgement_cache)) == 4 * len(NIST_QUESTIONS)
    assert again.new == 0 and again.judged == len(NIST_QUESTIONS)
    trained = load_rows(ws.learned_dir / "train")
    assert {row["anchor"] for row in trained} == set(NIST_QUESTIONS) - held
    ids = {row["id"] for row in rows}
    evaluation = json.loads((ws.learned_dir / "held_out.json").read_text())
    assert set(evaluation["queries"].values()) == held
    assert all(set(chunks) <= ids for chunks in evaluation["relevant"].values())
    assert first.held_out == len(held) and first.train_rows == len(NIST_QUESTIONS) - len(held)
    assert not [text for text in prefect_texts() if any(q in text for q in NIST_QUESTIONS)]


def prefect_texts() -> list[str]:
    """Every log message and artifact the Prefect API holds, once sent."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        messages = [log.message for log in client.read_logs()]
        return messages + [str(a.data) for a in client.read_artifacts()]


def write_log(ws, queries: list[str]) -> None:
    ws.querylog_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"query": q}) for q in queries]
    (ws.querylog_dir / LOG_NAME).write_text("\n".join(lines) + "\n")


def test_a_nudged_publish_moves_the_judges_choices_towards_their_queries(
    prefect_api, ready_workspace, minilm
):
    from tasks.store import chroma

    ws, rows = ready_workspace
    write_log(ws, NIST_QUESTIONS)
    learned = learn(LearnParams(workspace=str(ws.root), top_k=4, held_out_share=0.0))
    choices = json.loads((ws.learned_dir / "nudge.json").read_text())["choices"]
    chosen = {cid for _, cid in choices}

    plain = publish(PublishParams(workspace=str(ws.root)))
    nudged = publish(PublishParams(workspace=str(ws.root), nudge=True, nudge_step=0.5))

    assert learned.train_rows == len(choices) == len(NIST_QUESTIONS)
    assert nudged.collection != plain.collection and nudged.embedded == len(rows)
    client = chroma.connect(ws.chroma_dir)

    def vectors(name: str) -> dict[str, np.ndarray]:
        got = client.get_collection(name).get(include=["embeddings"])
        return dict(zip(got["ids"], np.asarray(got["embeddings"]), strict=True))

    before, after = vectors(plain.collection), vectors(nudged.collection)
    for cid in set(before) - chosen:
        assert np.allclose(before[cid], after[cid], atol=1e-6), "unchosen chunks stay"
    asked = minilm.encode([f"query: {q}" for q, _ in choices], normalize_embeddings=True)
    for vector, (_, cid) in zip(asked, choices, strict=True):
        assert vector @ after[cid] > vector @ before[cid] + 0.05


def test_training_rows_refuse_the_held_out_share():
    held = JudgedQuery("q?", ["a", "b"], [0.5, 0.4], [-1.0, -2.0], held_out=True)

    with pytest.raises(ValueError, match="never for training"):
        training_rows([held], {"a": "A", "b": "B"})


#: Four candidates of one query: the retriever likes c0, the judge likes c2.
JUDGED = [
    JudgedQuery(
        question,
        [f"c{(n + i) % 6}" for i in range(4)],
        [0.62, 0.6, 0.55, 0.5],
        [-3.0, -2.8, -0.9, -3.5],
        held_out=False,
    )
    for n, (question, _) in enumerate(ANSWERED * 2)
]
TEXTS = {f"c{i}": PASSAGES[i % 3] + f" (copy {i})" for i in range(6)}


@pytest.mark.parametrize(
    ("form", "recipe", "columns"),
    [
        ("positives", "matryoshka-mnrl", ["anchor", "positive"]),
        ("negatives", "matryoshka-mnrl", ["anchor", "positive", "negative"]),
        (
            "distill",
            "matryoshka-distill",
            ["anchor", "positive", "negative", "negative_2", "negative_3", "label"],
        ),
    ],
)
def test_rows_of_every_label_form_train_and_save_a_model(form, recipe, columns, tmp_path):
    rows = training_rows(JUDGED, TEXTS, form)

    result = train(MINILM, rows_to_dataset(rows), tmp_path, TrainSettings(recipe, max_steps=2))

    assert list(rows[0]) == columns and len(rows) == len(JUDGED)
    assert rows[0]["positive"] == TEXTS[JUDGED[0].chunk_ids[2]], "the teacher's first choice"
    if form == "distill":
        assert rows[0]["label"] == sorted(rows[0]["label"], reverse=True)
    assert result.steps == 2 and (tmp_path / "modules.json").exists()
    assert json.loads((tmp_path / "ragtune.json").read_text())["recipe"] == recipe


def test_a_distillation_recipe_without_the_judges_scores_is_a_clear_error(tmp_path):
    rows = training_rows(JUDGED, TEXTS, "positives")

    with pytest.raises(ValueError, match="needs rows with a label column"):
        train(MINILM, rows_to_dataset(rows), tmp_path, TrainSettings("matryoshka-distill"))


def test_nudging_moves_only_the_chosen_documents_towards_their_queries(minilm):
    documents = minilm.encode(PASSAGES, normalize_embeddings=True)
    asked = ["Which city is Peru's capital?", "Where does Peru's government sit?"]
    queries = minilm.encode(asked, normalize_embeddings=True)

    moved = nudge(documents, queries, [1, 1], step=0.3)

    assert np.allclose(moved[[0, 2]], documents[[0, 2]]), "unchosen documents stay"
    assert np.allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)
    assert (queries @ moved[1] > queries @ documents[1] + 0.05).all()
    assert np.allclose(nudge(documents, queries, [1, 1], step=0.0), documents)
    with pytest.raises(ValueError, match="2 query vectors but 1 answers"):
        nudge(documents, queries, [1], step=0.1)


def test_the_nudge_step_is_chosen_on_a_held_aside_share_of_the_judged_log(minilm):
    # Users ask vaguely about capitals; the judge says they mean Lima, the retriever is unsure.
    openings = ("which", "what", "name the", "tell me the")
    asked = [f"{opening} capital city {n}" for opening in openings for n in range(8)]
    documents = minilm.encode(PASSAGES, normalize_embeddings=True)
    vectors = minilm.encode(asked, normalize_embeddings=True)
    judged = [JudgedQuery(q, ["p0", "p1", "p2"], [0.0] * 3, [-3, -1, -4], False) for q in asked]
    row = {"p0": 0, "p1": 1, "p2": 2}

    step, by_step = choose_nudge_step(documents, row, judged, vectors)

    assert step > 0 and by_step[step] > by_step[0.0], by_step
    assert choose_nudge_step(documents, row, judged[:1], vectors[:1]) == (0.0, {})


# --- the api judge, against real local servers ------------------------------------------------


@contextmanager
def answering(answer: Callable[[str, dict], tuple[int, dict]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 whose POSTs `answer(path, body)` returns
    (status, JSON) for; yields its /v1 root."""

    class Handler(JsonHandler):
        def do_POST(self) -> None:
            status, reply = answer(self.path, self.json_body())
            self.send(status, json.dumps(reply))

    with serving(Handler) as url:
        yield url


@pytest.fixture(scope="module")
def gemma_server() -> Iterator[str]:
    """A completions server that runs the bundled Gemma and echoes the prompt's token
    log-probabilities, the way OpenAI's legacy API and vLLM do with `echo` and `logprobs`."""
    import torch

    from tasks.llm.gemma import load_gemma

    model, tokenizer = load_gemma(dtype="float32")

    def complete(path: str, body: dict) -> tuple[int, dict]:
        prompt = body["prompt"]
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        following = int(logprobs[-1].argmax())
        echoed = [None] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
        logprobs_field = {
            "tokens": tokenizer.convert_ids_to_tokens([*ids, following]),
            "token_logprobs": [*echoed, float(logprobs[-1, following])],
            "text_offset": [start for start, _ in encoded["offset_mapping"]] + [len(prompt)],
        }
        text = prompt + tokenizer.decode([following])
        return 200, {"choices": [{"text": text, "logprobs": logprobs_field}]}

    with answering(complete) as url:
        yield url


def test_the_api_judge_reads_query_likelihood_from_echoed_logprobs(gemma_server):
    from tasks.llm.likelihood import local_judge

    api = ApiJudge(base_url=gemma_server, model="gemma3-270m", concurrency=2)
    local = local_judge(dtype="float32")

    for question, answer in ANSWERED:
        remote = api.score(question, PASSAGES)
        assert int(np.argmax(remote)) == answer
        assert remote == pytest.approx(local.score(question, PASSAGES), abs=0.05)


@pytest.fixture
def grading_server() -> Iterator[tuple[str, list[dict]]]:
    """A chat server that grades by a scripted rule and fails for good on the word FAIL."""
    seen: list[dict] = []

    def grade(path: str, body: dict) -> tuple[int, dict]:
        seen.append({"path": path, "body": body})
        message = body["messages"][0]["content"]
        if "FAIL" in message:
            return 503, {"error": "down"}
        grade = "3" if "Peru" in message.split("Passage:")[1] else "0"
        return 200, {"choices": [{"message": {"content": f"Grade: {grade}"}}]}

    with answering(grade) as url:
        yield url, seen


def test_the_api_judge_grades_by_chat_and_a_query_that_keeps_failing_is_recorded(
    grading_server, tmp_path
):
    url, seen = grading_server
    judge = make_judge(
        "api", base_url=url, model="grader", mode="chat", max_retries=1, backoff_s=0.01
    )
    texts = {f"p{i}": passage for i, passage in enumerate(PASSAGES)}
    cache = Judgements(tmp_path / "judgements.sqlite")
    queries = ["What is the capital of Peru?", "FAIL: what is the capital of Norway?"]

    run = judge_queries(queries, [[(cid, 0.5) for cid in texts]] * 2, texts, judge, cache)

    assert [q.query for q in run.judged] == queries[:1]
    assert run.judged[0].judge_scores == [0.0, 3.0, 0.0]
    assert len(run.failed) == 1 and "503" in run.failed[0]
    assert len(cache) == len(texts), "nothing stored for the failed query"
    assert all(r["path"] == "/v1/chat/completions" for r in seen)
    failing = [r for r in seen if "FAIL" in r["body"]["messages"][0]["content"]]
    assert len(failing) >= 2, "retried before giving up"


def test_judges_are_chosen_by_name_and_fingerprinted_by_what_changes_their_scores(tmp_path, minilm):
    from sentence_transformers import CrossEncoder

    from tasks.models import MINILM, resolve_model

    folder = tmp_path / "cross"
    CrossEncoder(resolve_model(MINILM), num_labels=1).save(str(folder))

    judge = make_judge("cross-encoder", model=str(folder))
    scores = judge.score("What is the capital of Peru?", PASSAGES)

    assert isinstance(judge, CrossEncoderJudge) and len(scores) == len(PASSAGES)
    assert scores == CrossEncoderJudge(model=str(folder)).score(
        "What is the capital of Peru?", PASSAGES
    )
    assert judge.fingerprint() != make_judge("cross-encoder", model="other").fingerprint()
    chat = ApiJudge(base_url="http://127.0.0.1:9/v1", mode="chat")
    assert chat.fingerprint() != ApiJudge(base_url="http://127.0.0.1:9/v1").fingerprint()
    with pytest.raises(ValueError, match="known judges: local, api, cross-encoder"):
        make_judge("oracle")
    with pytest.raises(ValueError, match=r"api_key is not a setting.*environment variable"):
        make_judge("api", api_key="sk-nope")


def test_the_nudge_stays_off_when_its_best_step_shows_no_gain_with_an_interval_above_zero(minilm):
    # The judge chooses what the retriever already ranks first: nudging can only tie.
    asked = [q for q, _ in ANSWERED] * 4 + [f"capital city of Peru {n}" for n in range(12)]
    documents = minilm.encode(PASSAGES, normalize_embeddings=True)
    vectors = minilm.encode(asked, normalize_embeddings=True)
    first = np.argmax(vectors @ documents.T, axis=1)
    judged = [
        JudgedQuery(
            q, ["p0", "p1", "p2"], [0.0] * 3, [0.0 if i == best else -5.0 for i in range(3)], False
        )
        for q, best in zip(asked, first, strict=True)
    ]

    step, by_step = choose_nudge_step(documents, {"p0": 0, "p1": 1, "p2": 2}, judged, vectors)

    assert by_step, "the check share was not empty"
    assert step == 0.0 and by_step[0.0] == max(by_step.values())
