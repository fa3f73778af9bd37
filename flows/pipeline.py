"""The whole path: ingest → questions → (learn) → finetune → evaluate → gate → publish.

Each stage is its own flow (runnable alone from the shell or the dashboard) and runs here as a
subflow, so the dashboard shows one run per stage with its own artifacts. The pipeline only
chooses defaults (from a profile), passes paths between stages and applies the gate. The learn
stage runs when there are logged queries to learn from (`querylog/` or `learn.queries_file`).
"""

from __future__ import annotations

from typing import Any, Self

from prefect import flow
from prefect.states import Completed, State
from pydantic import BaseModel, Field

from flows.artifacts import markdown
from flows.evaluate import EvaluateParams, EvaluateSettings, evaluate
from flows.finetune import FinetuneParams, FinetuneSettings, finetune
from flows.incremental import StageRunner, sources_key
from flows.ingest import IngestParams, IngestSettings, ingest
from flows.learn import LearnParams, LearnSettings, learn, log_files
from flows.params import Params
from flows.profiles import ProfileName, profile_defaults
from flows.publish import PublishParams, PublishSettings, publish
from flows.questions import QuestionParams, QuestionSettings, questions
from flows.runners import RunnerParams
from flows.search import StoreParams
from tasks.retrieval.report import markdown_table
from tasks.workspace import Workspace, fingerprint_files


class RunParams(StoreParams, RunnerParams):
    """What the pipeline and the nightly refresh share: where things are, what to read, the base
    model and the seed once, then one section per stage they run. A field left unset in a
    section takes the profile's value, then the section's own default."""

    profile: ProfileName = Field(
        "demo", description="demo: offline, bundled models, minutes on CPU. production: bge-base."
    )
    sources: list[str] = Field(
        default_factory=lambda: ["data/sources"],
        description="Folders or files to ingest (PDF, Markdown, text, JSONL/CSV records).",
    )
    base_model: str | None = Field(
        None,
        description="Embedding model that chunks are measured with, that filters questions and "
        "is tuned (name, hub id, path); blank: the profile's.",
    )
    seed: int = Field(42, description="Seed for sampling, splitting and training.")
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Chunking")
    questions: QuestionSettings = Field(
        default_factory=QuestionSettings, description="Question generation and filtering"
    )

    def resolved(self) -> Self:
        """These parameters with blanks filled from the profile: `base_model` when None, and in
        each section every field the user did not set or left blank (the dashboard's form
        sends every field, so a blank field is one left to the profile)."""
        defaults = profile_defaults(self.profile)
        update: dict[str, Any] = {}
        if self.base_model is None:
            update["base_model"] = defaults.get("base_model")
        for name in type(self).model_fields:
            section = getattr(self, name)
            if isinstance(section, Params) and name in defaults:
                fill = {
                    key: value
                    for key, value in defaults[name].items()
                    if key not in section.model_fields_set or getattr(section, key) is None
                }
                update[name] = section.model_copy(update=fill)
        return self.model_copy(update=update)

    def ingest_params(self) -> IngestParams:
        return IngestParams(
            workspace=self.workspace,
            sources=self.sources,
            model=self.base_model,
            **self.ingest.model_dump(),
        )

    def question_params(self) -> QuestionParams:
        return QuestionParams(
            **self.runner_settings(),
            workspace=self.workspace,
            round_trip_model=self.base_model,
            seed=self.seed,
            **self.questions.model_dump(),
        )

    def publish_params(self, publish: PublishSettings, **chosen: Any) -> PublishParams:
        """Publishing as `publish` says, with what earlier stages chose (model, dim, metrics)."""
        return PublishParams(
            **self.store_settings(),
            **self.runner_settings(),
            **publish.model_dump(),
            **chosen,
        )


def _publish_section() -> Any:
    return Field(default_factory=PublishSettings, description="Publishing to Chroma")


class RefreshParams(RunParams):
    """The nightly refresh: new or changed documents, questions for new chunks, re-publish."""

    publish: PublishSettings = _publish_section()


class PipelineParams(RunParams):
    """What a user sets for a whole run: every stage's section, and what to do at the gate."""

    learn: LearnSettings = Field(
        default_factory=LearnSettings,
        description="Learning from logged queries (runs when the query log has any)",
    )
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="Fine-tuning")
    evaluate: EvaluateSettings = Field(
        default_factory=EvaluateSettings, description="Evaluation and the gate"
    )
    publish: PublishSettings = _publish_section()
    publish_if_gated: bool = Field(
        False, description="Publish the tuned model even when the gate says it is not better."
    )

    def learn_params(self) -> LearnParams:
        return LearnParams(
            workspace=self.workspace,
            base_model=self.base_model,
            seed=self.seed,
            **self.learn.model_dump(),
        )

    def finetune_params(self) -> FinetuneParams:
        return FinetuneParams(
            workspace=self.workspace,
            base_model=self.base_model,
            seed=self.seed,
            **self.finetune.model_dump(),
        )

    def evaluate_params(self, tuned_model: str) -> EvaluateParams:
        return EvaluateParams(
            workspace=self.workspace,
            base_model=self.base_model,
            tuned_model=tuned_model,
            **self.evaluate.model_dump(),
        )


class PipelineResult(BaseModel):
    workspace: str
    chunks: int
    questions_kept: int
    model_path: str
    report_dir: str
    published: bool
    gate_reason: str
    dim: int
    alias: str | None = None
    collection: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    reused: list[str] = Field(default_factory=list, description="Stages skipped as unchanged.")


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams | None = None) -> State:
    """Tune a retriever on a folder of documents and publish it to Chroma if it is better."""
    p = (params or PipelineParams()).resolved()
    stages = StageRunner(p.workspace, first_key=sources_key(p.sources))
    chunked = stages.run("ingest", ingest, p.ingest_params())
    asked = stages.run("questions", questions, p.question_params())
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
    return (
        f"# ragtune pipeline\n\n{verdict}\n\n"
        f"- chunks: {result.chunks}\n- questions kept: {result.questions_kept}\n"
        f"- model: `{result.model_path}`\n- report: `{result.report_dir}`\n\n"
        f"## Wall time per stage\n\n{markdown_table(rows)}"
    )
