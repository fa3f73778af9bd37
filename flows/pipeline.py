"""The whole path: ingest → questions → label → (learn) → finetune → evaluate → gate → publish.

Each stage is its own flow (runnable alone from the shell or the dashboard) and runs here as a
subflow, so the dashboard shows one run per stage with its own artifacts. The pipeline only
chooses defaults (from a profile), passes paths between stages and applies the gate. The label
stage (the judge over the synthetic questions) runs unless `label.enabled` is off; the learn
stage runs when there are logged queries to learn from (`querylog/` or `learn.queries_file`).
With no log the model trains on the judged questions; with one, on both.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Completed, State
from pydantic import BaseModel, Field

from flows.artifacts import markdown
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.incremental import StageRunner, sources_key
from flows.ingest import IngestResult, ingest
from flows.label import label
from flows.learn import learn, log_files
from flows.params import PipelineParams, RunParams
from flows.publish import publish
from flows.questions import QuestionsResult, questions
from tasks.retrieval.report import markdown_table
from tasks.workspace import Workspace, fingerprint_files


class PipelineResult(BaseModel):
    workspace: str
    chunks: int
    questions_kept: int
    questions_grounded: int | None = Field(
        None, description="Kept questions the judge found grounded (None: not labelled)."
    )
    model_path: str
    report_dir: str
    published: bool
    gate_reason: str
    dim: int
    alias: str | None = None
    collection: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    reused: list[str] = Field(default_factory=list, description="Stages skipped as unchanged.")


def ingest_and_ask(p: RunParams) -> tuple[StageRunner, IngestResult, QuestionsResult]:
    """The stages every run starts with, the pipeline and the nightly refresh alike: ingest the
    sources, then ask about their chunks; unchanged stages are reused (`StageRunner`)."""
    stages = StageRunner(p.workspace, first_key=sources_key(p.sources))
    chunked = stages.run("ingest", ingest, p.ingest_params())
    asked = stages.run("questions", questions, p.question_params())
    return stages, chunked, asked


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams | None = None) -> State:
    """Tune a retriever on a folder of documents and publish it to Chroma if it is better."""
    p = (params or PipelineParams()).resolved()
    stages, chunked, asked = ingest_and_ask(p)
    labelled = stages.run("label", label, p.label_params()) if p.label.enabled else None
    log = log_files(Workspace.at(p.workspace), p.learn.queries_file)
    if log:
        stages.run("learn", learn, p.learn_params(), reads=fingerprint_files(log))
    tuned = stages.run("finetune", finetune, p.finetune_params())
    judged = stages.run("evaluate", evaluate, p.evaluate_params(tuned.model_path))
    published = None
    if judged.publish or p.publish_if_gated:
        headline = judged.metrics.get("tuned", {}).get(judged.dim, {})
        published = stages.run(
            "publish",
            publish,
            p.publish_params(
                p.publish,
                model=tuned.model_path,
                dim=judged.dim,
                metrics={k: float(v) for k, v in headline.items()},
            ),
        )
    result = PipelineResult(
        workspace=p.workspace,
        chunks=chunked.chunks,
        questions_kept=asked.kept,
        questions_grounded=labelled.grounded if labelled else None,
        model_path=tuned.model_path,
        report_dir=judged.report_dir,
        published=published is not None,
        gate_reason=judged.reason,
        dim=judged.dim,
        alias=published.alias if published else None,
        collection=published.collection if published else None,
        seconds=stages.seconds,
        reused=stages.reused,
    )
    markdown(
        "pipeline-summary",
        _summary(result),
        description="What the pipeline did, stage by stage, and the gate decision.",
    )
    if result.published:
        return Completed(message=f"Published {result.collection} as {result.alias!r}.", data=result)
    return Completed(message=f"Gated, not published: {result.gate_reason}", data=result)


def _summary(result: PipelineResult) -> str:
    verdict = (
        f"Published `{result.collection}` under alias `{result.alias}` (dim {result.dim})."
        if result.published
        else f"**Not published.** {result.gate_reason}"
    )
    rows = [{"stage": stage, "seconds": secs} for stage, secs in result.seconds.items()]
    grounded = (
        f"- grounded (the judge ranks their own chunk high enough): {result.questions_grounded}\n"
        if result.questions_grounded is not None
        else ""
    )
    return (
        f"# ragtune pipeline\n\n{verdict}\n\n"
        f"- chunks: {result.chunks}\n- questions kept: {result.questions_kept}\n{grounded}"
        f"- model: `{result.model_path}`\n- report: `{result.report_dir}`\n\n"
        f"## Wall time per stage\n\n{markdown_table(rows)}"
    )
