"""Learn: the queries users asked → the judge's labels → training rows for the next retrain.

Reads the workspace's query log (and a log the user brings), retrieves each new query's top K
chunks with the base model, has the judge score them (cached: a query is never judged twice
by the same judge), and writes training rows to `learned/train` and the held-out share of the
log, with the judge's labels, to `learned/held_out.json`. The finetune stage mixes the rows
with the synthetic questions; the evaluate stage reports base against tuned on the held-out
queries. Artifacts show counts and timings only: no query text reaches the dashboard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.artifacts import markdown, progress_artifact
from flows.params import LearnParams
from tasks.learn.judgements import Judgements
from tasks.learn.judges import make_judge
from tasks.learn.querylog import LOG_NAME, read_queries, unique_queries
from tasks.learn.rows import (
    JudgedQuery,
    Retrieval,
    choose_nudge_step,
    embed_for_retrieval,
    judge_queries,
    judged_eval_set,
    save_training_rows,
    training_rows,
)
from tasks.models import load_model
from tasks.retrieval.report import markdown_table
from tasks.workspace import Workspace, load_rows


class LearnResult(BaseModel):
    logged: int = Field(description="Distinct queries in the log(s).")
    new: int = Field(description="Queries the judge was asked about in this run.")
    judged: int = Field(description="Queries with judgements (cached or new).")
    failed: int = Field(description="Queries whose judging failed (retried next run).")
    held_out: int
    train_rows: int
    judge_s_per_query: float
    top1_changed: float = Field(description="Share of queries whose first result the judge moved.")
    nudge_step: float = Field(0.0, description="The step `publish --nudge` applies (0: none).")
    rows_path: str | None = None


def log_files(ws: Workspace, queries_file: str | None) -> list[Path]:
    """The logs there are to read: the workspace's own, where searches wrote one, and the
    user's `queries_file` (which must exist when it is named)."""
    own = ws.querylog_dir / LOG_NAME
    files = [own] if own.exists() and own.stat().st_size else []
    if queries_file:
        if not Path(queries_file).is_file():
            raise FileNotFoundError(f"queries_file {queries_file} does not exist")
        files.append(Path(queries_file))
    return files


def logged_queries(ws: Workspace, queries_file: str | None, field: str = "query") -> list[str]:
    """Every distinct query of the workspace's log and of `queries_file`, first seen first."""
    texts: list[str] = []
    for path in log_files(ws, queries_file):
        texts += read_queries(path, "query" if path.parent == ws.querylog_dir else field)
    return unique_queries(texts)


@flow(name="learn", log_prints=True)
def learn(params: LearnParams = LearnParams()) -> LearnResult:  # noqa: B008
    """Label the logged queries with the judge and write training rows from its labels."""
    ws = Workspace.at(params.workspace)
    queries = logged_queries(ws, params.queries_file, params.queries_field)
    if not queries:
        print(f"no logged queries in {ws.querylog_dir}: nothing to learn from yet")
        return LearnResult(
            logged=0, new=0, judged=0, failed=0, held_out=0, train_rows=0, judge_s_per_query=0.0
        )
    texts = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
    print(f"{len(queries)} distinct logged queries; retrieving the top {params.top_k} of each")
    retrieval = embed_for_retrieval(load_model(params.base_model), texts, queries)
    candidates = retrieval.top(params.top_k)
    judge = make_judge(params.judge)
    cache = Judgements(ws.judgement_cache)
    try:
        run = judge_queries(
            queries,
            candidates,
            texts,
            judge,
            cache,
            held_out_share=params.held_out_share,
            seed=params.seed,
            progress=progress_artifact("learn-progress", f"Judging logged queries ({judge.name})"),
        )
    finally:
        cache.close()
    trainable = [q for q in run.judged if not q.held_out]
    rows = training_rows(trainable, texts, params.label_form)
    rows_path = None
    ws.learned_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        rows_path = str(save_training_rows(ws.learned_dir / "train", rows, params.label_form))
    else:
        # Rows of an earlier log must not stand in for this one's.
        shutil.rmtree(ws.learned_dir / "train", ignore_errors=True)
    held_queries, held_relevant = judged_eval_set(run.judged)
    step = write_nudge(ws, retrieval, queries, trainable, params.seed)
    (ws.learned_dir / "held_out.json").write_text(
        json.dumps(
            {
                "labels": f"judge {judge.name} ({judge.fingerprint()})",
                "queries": held_queries,
                "relevant": {qid: sorted(ids) for qid, ids in held_relevant.items()},
            }
        )
    )
    result = LearnResult(
        logged=len(queries),
        new=run.new,
        judged=len(run.judged),
        failed=len(run.failed),
        held_out=len(held_queries),
        train_rows=len(rows),
        judge_s_per_query=round(run.seconds_per_new_query, 3),
        top1_changed=round(run.top_changed(), 3),
        nudge_step=step,
        rows_path=rows_path,
    )
    print(
        f"judged {run.new} new queries ({result.judge_s_per_query:.2f} s each), "
        f"{len(run.failed)} failed; {len(rows)} {params.label_form} rows, "
        f"{len(held_queries)} queries held out"
    )
    if run.failed:
        # A server's error can quote the request, and so the query: the reasons stay in the
        # workspace with the log.
        failures = ws.learned_dir / "failures.txt"
        failures.write_text("\n".join(run.failed) + "\n")
        print(f"judging failed for {len(run.failed)} queries (retried next run); see {failures}")
    markdown(
        "learn-summary",
        learn_report(result, judge.name, params.label_form),
        description="What the judge made of the query log (counts only, no query text)",
    )
    return result


def write_nudge(
    ws: Workspace, retrieval: Retrieval, queries: list[str], trainable: list[JudgedQuery], seed: int
) -> float:
    """Write `learned/nudge.json`: each trainable query with the chunk the judge chose, and
    the nudge step chosen on them (what `publish --nudge` applies); returns the step."""
    index = {query: i for i, query in enumerate(queries)}
    step, by_step = (0.0, {})
    if trainable:
        step, by_step = choose_nudge_step(
            retrieval.documents,
            retrieval.row,
            trainable,
            retrieval.queries[[index[q.query] for q in trainable]],
            seed=seed,
        )
    choices = [[q.query, q.judge_choice] for q in trainable]
    (ws.learned_dir / "nudge.json").write_text(
        json.dumps({"step": step, "mrr10_by_step": by_step, "choices": choices})
    )
    return step


def learn_report(result: LearnResult, judge: str, form: str) -> str:
    """Markdown of the run's counts and timings; never a query's text."""
    rows = [
        {"": "distinct queries logged", "value": result.logged},
        {"": "judged this run (new)", "value": result.new},
        {"": "judged in all (with the cache)", "value": result.judged},
        {"": "failed (judged again next run)", "value": result.failed},
        {"": "held out (never trained on)", "value": result.held_out},
        {"": f"training rows ({form})", "value": result.train_rows},
        {"": "judge seconds per new query", "value": result.judge_s_per_query},
        {"": "share where the judge changed the top 1", "value": result.top1_changed},
        {"": "nudge step for `publish --nudge`", "value": result.nudge_step},
    ]
    return f"# Learning from the query log (judge: {judge})\n\n{markdown_table(rows)}"
