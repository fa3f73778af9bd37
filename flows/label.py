"""Label: the judge reads every synthetic question against its candidates (the cold start).

For each question the questions stage kept, the base model retrieves its top K chunks, the
chunk it was written from joins them, and the judge scores them all (cached with the learn
stage's judgements: a re-run judges nothing new, an interrupted one resumes). A question whose
own chunk the judge does not rank in its top `ground_top_r` is rejected as `ungrounded`, with
its rank, in training and held-out splits alike. The grounded training questions train as
(question, own chunk) pairs, or, with `train_form` distill or margin, as rows in
`learned/synthetic` that teach the judge's ordering. With
`task_runner="dask"` the groups of questions are judged as Prefect tasks on Dask workers.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from flows.artifacts import markdown, progress_artifact
from flows.params import LabelParams
from flows.runners import fan_out, started_on_first_use
from tasks.learn.judgements import Judgements
from tasks.learn.judges import make_judge
from tasks.learn.rows import (
    RunGroups,
    embed_for_retrieval,
    judge_items,
    save_training_rows,
    training_rows,
)
from tasks.learn.synthetic import NOT_JUDGED, apply_grounding, grounded, label_questions, labelled
from tasks.models import load_model
from tasks.retrieval.report import markdown_table
from tasks.workspace import Workspace, load_rows, save_rows

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


class LabelResult(BaseModel):
    questions_path: str
    judged: int = Field(description="Questions with judgements (cached or new).")
    new: int = Field(description="Questions the judge was asked about in this run.")
    failed: int = Field(description="Questions whose judging failed (judged again next run).")
    grounded: int
    ungrounded: int
    held_out: int = Field(description="Grounded questions of the test split.")
    train_rows: int
    judge_s_per_question: float
    rows_path: str | None = None


@task(name="judge-questions", cache_policy=NO_CACHE, persist_result=False)
def judge_group(
    settings: dict[str, Any], fingerprint: str, items: list[tuple[str, list[str]]]
) -> tuple[list[list[float] | None], list[str]]:
    """One group of (question, passages), on whichever worker runs it. The worker builds the
    judge from its settings; its fingerprint must be the flow's, or the flow would cache these
    scores under another judge's name."""
    judge = make_judge(settings)
    if judge.fingerprint() != fingerprint:
        raise RuntimeError(
            f"the {judge.name!r} judge on this worker has fingerprint {judge.fingerprint()}, "
            f"the flow's has {fingerprint}: run the same ragtune version on workers and flow"
        )
    return judge_items(judge, items)


def on_runner(
    runner: Callable[[], DaskTaskRunner], settings: dict[str, Any], fingerprint: str
) -> RunGroups:
    """Judge groups as `judge_group` tasks on `runner()`, yielding each as it ends."""

    def run(groups: list[list[tuple[str, list[str]]]]) -> Iterator[Any]:
        print(f"sending {len(groups)} groups of questions to Dask")
        calls = [{"settings": settings, "fingerprint": fingerprint, "items": g} for g in groups]
        index = {future: i for i, future in enumerate(fan_out(runner(), judge_group, calls))}
        for future in as_completed(list(index)):
            yield index[future], future.result()

    return run


@flow(name="label", log_prints=True)
def label(params: LabelParams = LabelParams()) -> LabelResult:  # noqa: B008
    """Judge the workspace's synthetic questions, keep the grounded ones, write their rows."""
    ws = Workspace.at(params.workspace)
    questions = load_rows(ws.questions_dir)
    texts = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
    asked = labelled(questions)
    if not asked:
        raise ValueError(f"{ws.questions_dir} holds no kept questions to label")
    print(f"retrieving the top {params.top_k} chunks of {len(asked)} questions")
    retrieval = embed_for_retrieval(
        load_model(params.base_model), texts, [q["question"] for q in asked]
    )
    judge = make_judge(params.judge)
    cache = Judgements(ws.judgement_cache)
    runner = params.dask_runner()
    try:
        with contextlib.ExitStack() as stack:
            run = label_questions(
                asked,
                texts,
                retrieval,
                judge,
                cache,
                params.top_k,
                progress=progress_artifact("label-progress", f"Judging questions ({judge.name})"),
                run_groups=on_runner(
                    started_on_first_use(stack, runner),
                    params.judge.model_dump(),
                    judge.fingerprint(),
                )
                if runner
                else None,
            )
    finally:
        cache.close()
    counts = apply_grounding(questions, run.judged, params.ground_top_r)
    path = save_rows(ws.questions_dir, questions)
    trainable = [q for q in run.judged if not q.held_out and grounded(q, params.ground_top_r)]
    rows_path, rows = None, []
    shutil.rmtree(ws.judged_questions_dir, ignore_errors=True)
    if params.train_form != "pairs":
        rows = training_rows(trainable, texts, params.train_form)
        if rows:
            rows_path = str(save_training_rows(ws.judged_questions_dir, rows, params.train_form))
    held = sum(1 for q in questions if q.get("kept") and q.get("split") == "test")
    result = LabelResult(
        questions_path=str(path),
        judged=len(run.judged),
        new=run.new,
        failed=counts[NOT_JUDGED],
        grounded=counts["grounded"],
        ungrounded=counts["ungrounded"],
        held_out=held,
        train_rows=len(rows),
        judge_s_per_question=round(run.seconds_per_new_query, 3),
        rows_path=rows_path,
    )
    print(
        f"judged {run.new} new questions ({result.judge_s_per_question:.2f} s each); "
        f"{result.grounded} grounded, {result.ungrounded} not (own chunk below the judge's top "
        f"{params.ground_top_r}), {result.failed} failed; {len(rows)} {params.train_form} rows"
    )
    for reason in run.failed[:5]:
        print(f"judging failed: {reason}")
    markdown(
        "label-summary",
        label_report(result, judge.name, params),
        description="What the judge made of the synthetic questions",
    )
    return result


def label_report(result: LabelResult, judge: str, params: LabelParams) -> str:
    """Markdown of the counts and the judge's time per question."""
    rows = [
        {"": "questions judged (with the cache)", "value": result.judged},
        {"": "judged this run (new)", "value": result.new},
        {"": "failed (judged again next run)", "value": result.failed},
        {
            "": f"grounded (own chunk in the judge's top {params.ground_top_r})",
            "value": result.grounded,
        },
        {"": "ungrounded (rejected)", "value": result.ungrounded},
        {"": "held-out questions left (grounded)", "value": result.held_out},
        {"": f"training rows ({params.train_form})", "value": result.train_rows},
        {"": "judge seconds per new question", "value": result.judge_s_per_question},
    ]
    return (
        f"# Labelling the synthetic questions (judge: {judge})\n\n"
        f"Candidates: the base model's top {params.top_k} and the question's own chunk.\n\n"
        f"{markdown_table(rows)}"
    )
