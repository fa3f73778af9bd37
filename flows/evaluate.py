"""Evaluate flow: base vs tuned retrieval at every Matryoshka dimension, and the publish gate.

A blocked publish is a normal, successful result (`publish=False` with the reason): the pipeline
decides what to do with it. Broken metrics (NaN, empty) are an error.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows.artifacts import markdown, progress_artifact, table
from flows.params import EvaluateParams
from tasks.llm.likelihood import local_judge_name
from tasks.models import load_model
from tasks.retrieval.beir import load_beir
from tasks.retrieval.evaluation import (
    MetricsError,
    ModelEval,
    evaluate_model,
    gate,
    intervals_by_dim,
    matryoshka_eval_dims,
    regressions,
)
from tasks.retrieval.report import (
    card_section,
    dim_rows,
    report_markdown,
    update_model_card,
    write_report,
)
from tasks.retrieval.rerank import rerank_evaluation
from tasks.training.data import held_out_queries
from tasks.workspace import Workspace, load_rows


class EvaluateResult(BaseModel):
    report_dir: str
    publish: bool
    dim: int
    reason: str
    metrics: dict[str, dict[int, dict[str, float]]]
    rerank_gain: tuple[float, float, float] | None = Field(
        None, description="NDCG@10 gain of re-ranking over the tuned model, with its interval."
    )


def generated_eval_set(
    ws: Workspace,
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """Corpus = every chunk; queries = kept held-out questions; relevant = each one's chunk."""
    corpus = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
    queries, relevant = held_out_queries(load_rows(ws.questions_dir), corpus)
    if not queries:
        raise MetricsError(
            f"No kept test-split questions in {ws.questions_dir}: nothing to evaluate on. "
            "Generate more questions or lower the test share."
        )
    return corpus, queries, relevant


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_one(
    model_ref: str,
    name: str,
    corpus: dict[str, str],
    queries: dict[str, str],
    relevant: dict[str, set[str]],
    dims: list[int] | None = None,
    keep_hits: bool = False,
) -> ModelEval:
    """Evaluate one model at `dims` (those that fit its width), or at its own Matryoshka dims."""
    model = load_model(model_ref)
    width = model.get_embedding_dimension()
    usable = [dim for dim in dims if dim <= width] if dims else matryoshka_eval_dims(width)
    progress = progress_artifact(f"evaluate-{name}", f"Encoding queries and corpus with {name}")
    return evaluate_model(
        model,
        corpus,
        queries,
        relevant,
        usable,
        name=name,
        model_ref=model_ref,
        progress=progress,
        keep_hits=keep_hits,
    )


@task(name="rerank-evaluation", cache_policy=NO_CACHE)
def rerank_one(
    evaluation: ModelEval,
    dim: int,
    corpus: dict[str, str],
    queries: dict[str, str],
    relevant: dict[str, set[str]],
    top: int,
) -> ModelEval:
    """The evaluated model's rankings at `dim`, their top `top` re-ranked by the LLM judge."""
    progress = progress_artifact(
        "evaluate-rerank", f"Re-ranking {evaluation.name}'s top {top} with the LLM judge"
    )
    return rerank_evaluation(evaluation, dim, corpus, queries, relevant, top=top, progress=progress)


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams = EvaluateParams()) -> EvaluateResult:  # noqa: B008
    ws = Workspace.at(params.workspace)
    tuned_ref = params.tuned_model or str(ws.newest_model())
    if params.beir_folder:
        corpus, queries, relevant = load_beir(Path(params.beir_folder), params.beir_split)
        source = f"BEIR {Path(params.beir_folder).name} ({params.beir_split})"
    else:
        corpus, queries, relevant = generated_eval_set(ws)
        source = "held-out generated questions"
    print(f"Evaluating on {source}: {len(queries)} queries, {len(corpus)} documents.")

    tuned = evaluate_one(tuned_ref, "tuned", corpus, queries, relevant, keep_hits=params.rerank > 0)
    base = evaluate_one(params.base_model, "base", corpus, queries, relevant, tuned.dims)
    others = [
        evaluate_one(ref, f"other-{i}", corpus, queries, relevant, tuned.dims)
        for i, ref in enumerate(params.other_models, start=1)
    ]

    decision = gate(base, tuned, tolerance=params.tolerance, margin=params.margin)
    intervals = intervals_by_dim(base, tuned)
    worse = regressions(base, tuned, queries, decision.dim)
    print(decision.reason)
    notes, rerank_gain = [], None
    if params.rerank:
        others.append(rerank_one(tuned, decision.dim, corpus, queries, relevant, top=params.rerank))
        rerank_gain = intervals_by_dim(tuned, others[-1])[decision.dim]
        notes.append(rerank_note(rerank_gain, params.rerank, decision.dim, tuned.n_queries))
        print(notes[-1])

    logged = judged_log_set(ws)
    if logged is not None:
        chunks, log_queries, log_relevant, labels = logged
        pair = [
            evaluate_one(ref, name, chunks, log_queries, log_relevant, tuned.dims)
            for ref, name in ((params.base_model, "base"), (tuned_ref, "tuned"))
        ]
        gains = intervals_by_dim(*pair)
        notes.append(judged_log_note(gains[decision.dim], decision.dim, len(log_queries), labels))
        print(notes[-1])
        table(
            "evaluation-logged-queries",
            dim_rows(pair, gains),
            description="Held-out logged queries, relevant chunk by the judge (not by people)",
        )

    run = params.run_name or datetime.now(UTC).strftime("eval-%Y%m%d-%H%M%S")
    evals = [base, tuned, *others]
    title = f"Retrieval on {source}"
    paths = write_report(ws.report_dir(run), evals, decision, intervals, worse, title, notes)

    rows = dim_rows(evals, intervals)
    table("evaluation-metrics", rows, description=f"NDCG@10 and MRR@10 per dimension ({run})")
    markdown(
        "evaluation-report",
        report_markdown(evals, decision, intervals, worse, title, notes=notes),
        description=f"Gate decision and report ({run}); files in {paths['report'].parent}",
    )

    tuned_dir = Path(tuned_ref)
    if tuned_dir.is_dir():
        update_model_card(
            tuned_dir,
            card_section(evals[:2], decision, intervals, source),
            {
                "run": run,
                "report_dir": str(paths["report"].parent),
                "source": source,
                "base_model": params.base_model,
                "publish": decision.publish,
                "dim": decision.dim,
                "reason": decision.reason,
                "gain": decision.gain,
                "interval": [decision.low, decision.high],
                "metrics": {str(d): tuned.metrics[d] for d in tuned.dims},
                "base_metrics": {str(d): base.metrics[d] for d in base.dims},
            },
        )

    return EvaluateResult(
        report_dir=str(paths["report"].parent),
        publish=decision.publish,
        dim=decision.dim,
        reason=decision.reason,
        metrics={e.name: e.metrics for e in evals},
        rerank_gain=rerank_gain,
    )


def judged_log_set(
    ws: Workspace,
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]], str] | None:
    """(chunks, held-out logged queries, the chunk the judge chose for each, who labelled
    them) from what `learn` wrote, or None where it wrote nothing to measure on. A query whose
    chosen chunk is gone (re-chunked since) is left out: the judge never saw the new chunks."""
    path = ws.learned_dir / "held_out.json"
    if not path.exists() or not ws.chunks_dir.exists():
        return None
    held = json.loads(path.read_text())
    chunks = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
    relevant = {qid: set(ids) for qid, ids in held["relevant"].items() if set(ids) <= chunks.keys()}
    if not relevant:
        return None
    queries = {qid: held["queries"][qid] for qid in relevant}
    return chunks, queries, relevant, held["labels"]


def judged_log_note(gain: tuple[float, float, float], dim: int, n_queries: int, labels: str) -> str:
    """One sentence for the report: base against tuned on the queries users really asked."""
    return (
        f"**Held-out logged queries** (relevant chunk chosen by the {labels}, not by people): "
        f"NDCG@10 of tuned over base at dim {dim} {gain_text(gain, n_queries)}, queries never "
        "trained on."
    )


def rerank_note(gain: tuple[float, float, float], top: int, dim: int, n_queries: int) -> str:
    """One sentence for the report: what the judge adds on top of the tuned model."""
    return (
        f"**Re-ranking.** The LLM judge re-ranking the tuned model's top {top} at dim {dim} "
        f"changes NDCG@10 by {gain_text(gain, n_queries)} (judge {local_judge_name()}); turn "
        f"it on at query time with `ragtune search --rerank {top}`."
    )


def gain_text(gain: tuple[float, float, float], n_queries: int) -> str:
    mean, low, high = gain
    return (
        f"{mean:+.4f} (95% paired bootstrap interval [{low:+.4f}, {high:+.4f}] over "
        f"{n_queries} queries)"
    )
