"""The whole path: ingest → questions → finetune → evaluate → gate → publish.

Each stage is its own flow (runnable alone from the shell or the dashboard) and runs here as a
subflow, so the dashboard shows one run per stage with its own artifacts. The pipeline only
chooses defaults (from a profile), passes paths between stages and applies the gate.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, State
from pydantic import BaseModel, Field

from flows.artifacts import markdown, markdown_table
from flows.evaluate import EvaluateParams, evaluate
from flows.finetune import FinetuneParams, finetune
from flows.incremental import StageRunner, sources_key
from flows.ingest import IngestParams, ingest
from flows.profiles import ProfileName, profile_defaults
from flows.publish import PublishParams, publish
from flows.questions import QuestionParams, questions
from flows.runners import RunnerParams
from flows.search import StoreParams


class PipelineParams(StoreParams, RunnerParams):
    """What a user sets for a whole run; blank fields take the profile's default."""

    profile: ProfileName = Field(
        "demo", description="demo: offline, bundled models, minutes on CPU. production: bge-base."
    )
    sources: list[str] = Field(
        default_factory=lambda: ["data/sources"],
        description="Folders or files to ingest (PDF, Markdown, text, JSONL/CSV records).",
    )
    base_model: str | None = Field(
        None, description="Embedding model to tune (name, hub id, path)."
    )
    max_tokens: int = Field(256, description="Target chunk length in the model's tokens.")
    overlap: int = Field(32, description="Tokens shared by neighbouring chunks.")
    generator: str | None = Field(None, description="Question generator: local or api.")
    generator_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Generator settings, e.g. base_url and model for api. Never put keys here.",
    )
    questions_per_chunk: int | None = Field(None, description="Questions asked per chunk.")
    max_chunks: int | None = Field(None, description="Generate for at most this many chunks.")
    questions_only: bool = Field(
        True,
        description="Keep only generated lines ending in '?'; off for statement or keyword "
        "queries.",
    )
    recipe: str | None = Field(None, description="Training recipe, e.g. matryoshka-mnrl.")
    epochs: int | None = Field(None, description="Training epochs.")
    batch_size: int | None = Field(None, description="Training batch size.")
    learning_rate: float | None = Field(None, description="Training learning rate.")
    max_steps: int | None = Field(None, description="Stop training after this many steps.")
    max_seq_length: int | None = Field(None, description="Truncate training inputs (speed).")
    seed: int = Field(42, description="Seed for sampling, splitting and training.")
    tolerance: float = Field(
        0.01, description="Publish the smallest dim within this share of the best NDCG@10."
    )
    margin: float | None = Field(
        None,
        description="Required NDCG@10 gain to publish; blank: the 95% interval must clear zero.",
    )
    rerank: int = Field(
        0,
        ge=0,
        le=100,
        description="Also report the tuned model with its top N re-ranked by the LLM judge "
        "(about a second per held-out question on CPU); 0: off.",
    )
    publish_if_gated: bool = Field(
        False, description="Publish the tuned model even when the gate says it is not better."
    )
    alias: str = Field("docs", description="Stable Chroma name that readers query.")

    def resolved(self) -> PipelineParams:
        """These parameters with blanks filled from the profile."""
        filled = {
            key: value
            for key, value in profile_defaults(self.profile).items()
            if getattr(self, key) is None
        }
        return self.model_copy(update=filled)

    def ingest_params(self) -> IngestParams:
        return IngestParams(
            workspace=self.workspace,
            sources=self.sources,
            model=self.base_model,
            max_tokens=self.max_tokens,
            overlap=self.overlap,
        )

    def question_params(self) -> QuestionParams:
        return QuestionParams(
            **self.runner_settings(),
            workspace=self.workspace,
            generator=self.generator,
            generator_settings=self.generator_settings,
            questions_per_chunk=self.questions_per_chunk,
            max_chunks=self.max_chunks,
            questions_only=self.questions_only,
            round_trip_model=self.base_model,
            seed=self.seed,
        )

    def finetune_params(self) -> FinetuneParams:
        return FinetuneParams(
            workspace=self.workspace,
            base_model=self.base_model,
            recipe=self.recipe,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            max_seq_length=self.max_seq_length,
            seed=self.seed,
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
    chunked = stages.run(
        "ingest",
        ingest,
        p.ingest_params(),
    )
    asked = stages.run(
        "questions",
        questions,
        p.question_params(),
    )
    tuned = stages.run(
        "finetune",
        finetune,
        p.finetune_params(),
    )
    judged = stages.run(
        "evaluate",
        evaluate,
        EvaluateParams(
            workspace=p.workspace,
            base_model=p.base_model,
            tuned_model=tuned.model_path,
            tolerance=p.tolerance,
            margin=p.margin,
            rerank=p.rerank,
        ),
    )
    published = None
    if judged.publish or p.publish_if_gated:
        headline = judged.metrics.get("tuned", {}).get(judged.dim, {})
        published = stages.run(
            "publish",
            publish,
            PublishParams(
                **p.store_settings(),
                **p.runner_settings(),
                model=tuned.model_path,
                dim=judged.dim,
                alias=p.alias,
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
