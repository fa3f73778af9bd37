"""task_runner="dask": generation and embedding on a real local Dask cluster of two worker
processes give exactly what the default in-process runner gives.

Both runs use the same generation batches (two chunks each, so the two workers take one batch
each), and the bundled Gemma samples with a seed per passage, so the questions must be equal
text for text, not merely similar. Each run gets its own workspace: a shared question cache
would hand the second run the first run's questions.
"""

from __future__ import annotations

import numpy as np
import pytest

from flows.params import PublishParams, QuestionParams
from flows.publish import publish
from flows.questions import questions
from tasks.store import chroma
from tasks.workspace import Workspace, load_rows, save_rows
from tests.conftest import nist_rows, save_with_prompts

RUNNERS = {
    "threads": {},
    "dask": {"task_runner": "dask", "dask_workers": 2},
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return nist_rows(range(7, 8), "nist")[:4]


@pytest.fixture
def workspaces(tmp_path, rows) -> dict[str, Workspace]:
    made = {}
    for runner in RUNNERS:
        ws = Workspace.at(tmp_path / runner)
        save_rows(ws.chunks_dir, rows)
        made[runner] = ws
    return made


def ask(ws: Workspace, runner: str):
    result = questions(
        QuestionParams(
            workspace=str(ws.root),
            generator={"backend": "local", "max_new_tokens": 16, "threads": 1},
            questions_per_chunk=1,
            generation_batch=2,
            **RUNNERS[runner],
        )
    )
    return result, load_rows(ws.questions_dir)


def test_dask_runner_generates_the_same_questions_as_the_default_runner(
    prefect_api, workspaces, rows
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    here, here_rows = ask(workspaces["threads"], "threads")
    there, there_rows = ask(workspaces["dask"], "dask")

    def generated(saved):
        return [(q["chunk_id"], q["question"], q["split"], q["kept"]) for q in saved]

    assert [q["chunk_id"] for q in here_rows] == [r["id"] for r in rows]
    assert generated(there_rows) == generated(here_rows)
    assert there.llm_calls == here.llm_calls == len(rows) and there.failed == 0
    assert there.prompt_tokens == here.prompt_tokens
    assert there.completion_tokens == here.completion_tokens
    # The dask run's batches went through Prefect tasks (one per batch); the default run's did not.
    with get_client(sync_client=True) as client:
        batches = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-questions"))
        )
    assert len(batches) == 2 and all(run.state.is_completed() for run in batches)
    first, second = sorted(batches, key=lambda run: run.start_time)
    assert second.start_time < first.end_time, "one worker per batch: the two ran side by side"
    # Each batch went to the cache as it came back: a re-run asks the cluster for nothing.
    again, _ = ask(workspaces["dask"], "dask")
    assert again.cached == len(rows) and again.llm_calls == 0


def test_dask_runner_publishes_the_same_embeddings_as_the_default_runner(
    prefect_api, workspaces, minilm, rows
):
    published = {}
    for runner, ws in workspaces.items():
        prompts = {"query": "query: ", "document": "passage: "}
        save_with_prompts(minilm, ws.model_dir("m"), prompts)
        result = publish(PublishParams(workspace=str(ws.root), dim=256, **RUNNERS[runner]))
        assert result.embedded == len(rows) and result.count == len(rows)
        got = chroma.resolve_alias(chroma.connect(ws.chroma_dir), "docs").get(
            include=["embeddings"]
        )
        order = np.argsort(got["ids"])
        published[runner] = (
            [got["ids"][i] for i in order],
            np.asarray(got["embeddings"])[order],
        )

    ids, vectors = published["dask"]
    assert ids == published["threads"][0] == sorted(r["id"] for r in rows)
    assert vectors.shape == (len(rows), 256)
    assert np.allclose(vectors, published["threads"][1], atol=1e-5)
