"""Every flow's parameters, in one light module.

Each flow takes a pydantic model, so the dashboard renders a form, `prefect.yaml` is checked
against it and the command line makes its options from the same fields and descriptions. The
models live here rather than beside their flows because reading them must not import Prefect,
torch or Chroma: `ragtune --help` builds every command's options from them in well under a
second.

Fields that several stages share are declared once, in the small models below that each
stage's parameters combine: the workspace, the Chroma store, the task runner, the seed and the
model being tuned (`base_model`, in every stage). A misspelt setting is an error that names the
closest valid one (`tasks.settings.Settings`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, model_validator

from flows.profiles import profile_defaults
from tasks.learn.settings import JUDGES, JudgeSettings, LabelForm, LocalJudgeSettings
from tasks.models import MINILM
from tasks.questions.settings import GENERATORS, GeneratorSettings, LocalGeneratorSettings
from tasks.settings import Settings
from tasks.training.recipes import DEFAULT_RECIPE, RECIPES

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from prefect_dask import DaskTaskRunner

ProfileName = Literal["demo", "production"]
TaskRunnerName = Literal["threads", "dask"]


class Params(Settings):
    """The base of every flow's parameters and of every section of the pipeline's."""


# --- fields shared by several stages, each declared once ------------------------------------


class WorkspaceParams(Params):
    workspace: str = Field("workspace", description="Folder where every stage reads and writes.")


class SeedParams(Params):
    seed: int = Field(42, description="Seed for sampling, splitting and training.")


class BaseModelParams(Params):
    base_model: str = Field(
        MINILM,
        description="The embedding model being tuned: it measures chunks, filters questions, "
        "finds the judge's candidates and is the model to beat (bundled name, hub id, folder).",
    )


class StoreParams(WorkspaceParams):
    """Where the Chroma store is: a folder in the workspace, or a `chroma run` server.

    Every flow that reads or writes the store takes these fields, so one setting points the
    whole pipeline, publishing and search at the same place.
    """

    chroma_path: str | None = Field(
        None, description="Embedded Chroma folder; blank: the workspace's chroma/."
    )
    chroma_host: str | None = Field(
        None, description="Chroma server host (`chroma run`); blank: the embedded store."
    )
    chroma_port: int = Field(8000, description="Chroma server port.")
    chroma_token_env: str | None = Field(
        None, description="Environment variable holding the Chroma server's auth token."
    )

    def store_settings(self) -> dict[str, Any]:
        """Just these fields, to hand on to another flow's parameters."""
        return self.model_dump(include=set(StoreParams.model_fields))

    def open_store(self) -> ClientAPI:
        """A server client when a host is set, else the embedded folder."""
        from tasks.store import chroma

        return chroma.open_store(
            self.workspace,
            self.chroma_path,
            self.chroma_host,
            self.chroma_port,
            self.chroma_token_env,
        )


class RunnerParams(WorkspaceParams):
    """Where a stage's heavy steps run: in the flow's own process, or on a Dask cluster
    (`flows.runners`)."""

    task_runner: TaskRunnerName = Field(
        "threads",
        description="threads: generate and embed in the flow's own process. dask: one Prefect "
        "task per batch on a Dask cluster (prefect-dask).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of a running Dask cluster, e.g. tcp://dask-scheduler:8786 "
        "(Kubernetes, dask-gateway); blank: a temporary local cluster.",
    )
    dask_workers: int = Field(
        2, ge=1, description="Worker processes of the temporary local cluster."
    )

    def runner_settings(self) -> dict[str, Any]:
        """Just the runner fields, to hand on to another flow's parameters."""
        return self.model_dump(include=RUNNER_FIELDS)

    def dask_runner(self) -> DaskTaskRunner | None:
        """The Dask task runner these parameters ask for, or None to work in-process."""
        if self.task_runner != "dask":
            return None
        from flows.runners import dask_runner

        return dask_runner(self.dask_address, self.dask_workers)


#: The fields that say where work runs, not what it produces.
RUNNER_FIELDS = set(RunnerParams.model_fields) - {"workspace"}


# --- ingest ----------------------------------------------------------------------------------


class IngestSettings(Params):
    """How documents become chunks: the ingest section of the pipeline's parameters."""

    max_tokens: int = Field(
        256, description="Chunk length in the model's tokens; capped at what the model embeds."
    )
    overlap: int = Field(32, description="Tokens repeated between neighbouring chunks.")
    records_id_field: str = Field("_id", description="Record files: the field with the id.")
    records_text_field: str = Field("text", description="Record files: the field with the text.")
    records_title_field: str | None = Field(
        "title", description="Record files: the field with a title (blank: none)."
    )


def _sources() -> Any:
    return Field(
        default_factory=lambda: ["data/sources"],
        description="Folders or files to ingest (PDF, Markdown, text, JSONL/CSV records).",
    )


class IngestParams(IngestSettings, BaseModelParams, WorkspaceParams):
    sources: list[str] = _sources()


# --- questions -------------------------------------------------------------------------------


class QuestionSettings(Params):
    """How questions are asked, filtered and split: the questions section of the pipeline's
    parameters."""

    generator: GeneratorSettings | None = Field(
        None,
        description=f"The question writer and its settings, chosen by backend "
        f"({', '.join(GENERATORS)}); blank: the profile's. API keys belong in the environment, "
        "never here.",
    )
    questions_per_chunk: int | None = Field(
        None, ge=1, description="Questions asked per chunk; blank: the profile's."
    )
    max_chunks: int | None = Field(
        None, ge=1, description="Ask about at most this many chunks (a seeded sample); blank: all."
    )
    round_trip_top_k: int = Field(
        10, ge=1, description="Keep a question only if the base model ranks its chunk this high."
    )
    questions_only: bool = Field(
        True,
        description="Keep only generated lines that end with '?'. Turn off when your users "
        "search with statements or keywords (claims, titles) and the generator's few-shot "
        "examples show that style.",
    )
    test_size: float = Field(0.2, ge=0, lt=1, description="Share of questions held out for test.")
    split_by: Literal["chunk", "document"] = Field(
        "chunk", description="Keep each chunk (or each whole document) on one side of the split."
    )
    generation_batch: int = Field(
        16,
        ge=1,
        description="Chunks per generation batch: the question cache is written batch by batch, "
        "and with task_runner=dask each batch is one task on a worker.",
    )


class QuestionParams(QuestionSettings, BaseModelParams, SeedParams, RunnerParams):
    # Run alone, the stage has no profile: its own defaults.
    generator: GeneratorSettings = Field(
        default_factory=LocalGeneratorSettings,
        description=f"The question writer and its settings, chosen by backend "
        f"({', '.join(GENERATORS)}). API keys belong in the environment, never here.",
    )
    questions_per_chunk: int = Field(2, ge=1, description="Questions asked per chunk.")


# --- label -----------------------------------------------------------------------------------


class LabelSettings(Params):
    """How the judge labels the synthetic questions: the label section of the pipeline. The
    pipeline's judge is the learn section's, so both stages share one judgement cache."""

    enabled: bool = Field(
        True,
        description="Judge the synthetic questions: keep only grounded ones, in training and "
        "in the held-out set. Off: every question the filters kept counts.",
    )
    top_k: int = Field(
        10, ge=1, le=100, description="Base candidates judged per question, besides its chunk."
    )
    ground_top_r: int = Field(
        1,
        ge=1,
        description="A question is grounded, and kept, when the judge ranks the chunk it was "
        "written from this high among its candidates.",
    )
    # Pairs by default: on SciFact's human claims neither the judge's scores nor its margins
    # trained a better retriever than zero-shot (BENCHMARKS.md, cold start), and their rows
    # cost six times a pair's compute.
    train_form: Literal["distill", "margin", "pairs"] = Field(
        "pairs",
        description="What grounded training questions teach: pairs, (question, own chunk) for "
        "the finetune recipe; distill, the teacher's scores over their candidates; margin, its "
        "margins of the own chunk over the others (MarginMSE, GPL).",
    )


class LabelParams(LabelSettings, BaseModelParams, SeedParams, RunnerParams):
    judge: JudgeSettings = Field(
        default_factory=LocalJudgeSettings,
        description=f"Who labels the questions, chosen by backend ({', '.join(JUDGES)}).",
    )


# --- learn -----------------------------------------------------------------------------------


class LearnSettings(Params):
    """How logged queries become training data: the learn section of the pipeline."""

    judge: JudgeSettings = Field(
        default_factory=LocalJudgeSettings,
        description=f"Who labels the queries, chosen by backend ({', '.join(JUDGES)}), with its "
        "settings.",
    )
    queries_file: str | None = Field(
        None,
        description="A log you already have, read besides the workspace's: one query per line "
        "(.txt), JSONL or CSV with the query in `queries_field`.",
    )
    queries_field: str = Field("query", description="The query's field in a JSONL or CSV log.")
    # 20, not 10: on SciFact the nudge and the distilled model both gained more from twice the
    # candidates (+4.98 against +3.38 NDCG@10 together), for twice the judge's time.
    top_k: int = Field(20, ge=2, le=100, description="Candidates the judge scores per query.")
    # distill: the only form measured to help on held-out human claims (BENCHMARKS.md).
    label_form: LabelForm = Field(
        "distill",
        description="distill: the judge's scores over all candidates (recipe "
        "matryoshka-distill); margin: the teacher's margins (matryoshka-margin-mse); "
        "positives: (query, judge's top chunk); negatives: plus a hard negative.",
    )
    held_out_share: float = Field(
        0.2, ge=0, lt=1, description="Share of the log (by query, seeded) never trained on."
    )


class LearnParams(LearnSettings, BaseModelParams, SeedParams, WorkspaceParams):
    pass


# --- finetune --------------------------------------------------------------------------------


class FinetuneSettings(Params):
    """How the model is trained: the finetune section of the pipeline's parameters."""

    recipe: str | None = Field(
        None, description=f"Training recipe: {', '.join(RECIPES)}; blank: the profile's."
    )
    train_file: str | None = Field(
        None,
        description="Your own pairs/triplets (CSV, JSONL or a saved dataset folder with "
        "anchor/positive[/negative] or query/passage columns), trained with the workspace's "
        "questions and judged log where it has them.",
    )
    epochs: int | None = Field(None, description="Epochs; blank: the recipe's.")
    batch_size: int | None = Field(None, description="Batch size; blank: the recipe's.")
    learning_rate: float | None = Field(None, description="Learning rate; blank: the recipe's.")
    max_steps: int | None = Field(
        None, description="Stop after this many steps (wins over epochs)."
    )
    max_seq_length: int | None = Field(
        None, description="Truncate training inputs to this many tokens (~128 is faster on CPU)."
    )
    hard_negatives: bool | None = Field(
        None,
        description="Mine hard negatives from the workspace's chunks; blank: only when the "
        "recipe needs them.",
    )
    output_name: str | None = Field(
        None, description="Folder name under models/; blank: derived from model, recipe, data."
    )
    log_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the rows `learn` made from logged queries, where there are "
        "any: the factor on their loss (0: leave them out).",
    )
    synthetic_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the synthetic questions: the factor on their loss (0: train on "
        "the log and your own pairs alone).",
    )


class FinetuneParams(FinetuneSettings, BaseModelParams, SeedParams, WorkspaceParams):
    # Run alone, the stage has no profile: its own default recipe.
    recipe: str = Field(DEFAULT_RECIPE, description=f"Training recipe: {', '.join(RECIPES)}.")


# --- evaluate --------------------------------------------------------------------------------


class EvaluateSettings(Params):
    """How the tuned model is judged: the evaluate section of the pipeline's parameters."""

    other_models: list[str] = Field(
        default_factory=list,
        description="More models to show in the report for comparison (not gated).",
    )
    beir_folder: str | None = Field(
        None,
        description="Evaluate on a labelled BEIR folder (corpus.jsonl, queries.jsonl, "
        "qrels/<split>.tsv) instead of the held-out generated questions.",
    )
    beir_split: str = Field("test", description="Which qrels/<split>.tsv of the BEIR folder.")
    tolerance: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Publish the smallest dimension whose NDCG@10 is within this relative "
        "distance of the best one.",
    )
    margin: float | None = Field(
        None,
        description="Required mean NDCG@10 gain; default: the 95% interval's lower end above 0.",
    )
    rerank: int = Field(
        0,
        ge=0,
        le=100,
        description="Also score the tuned model with its top N re-ranked by the bundled LLM "
        "judge at the chosen dimension (what `ragtune search --rerank N` gives; about a second "
        "per query on CPU); 0: off.",
    )
    run_name: str | None = Field(None, description="Report folder name; default: a timestamp.")


class EvaluateParams(EvaluateSettings, BaseModelParams, WorkspaceParams):
    tuned_model: str | None = Field(
        None,
        description="Folder of the tuned model; default: the newest model in the workspace.",
    )


# --- publish and search ----------------------------------------------------------------------


class PublishSettings(Params):
    """Where and how a model's chunks are published: the publish section of the pipeline's
    parameters."""

    alias: str = Field("docs", description="Stable name readers query; moved to the new version.")
    corpus: str = Field("docs", description="Corpus name, the first part of collection names.")
    keep_versions: int = Field(
        3, ge=2, description="Versions kept per alias (live and previous are always kept)."
    )
    lock_timeout_s: float = Field(
        3600,
        gt=0,
        description="Seconds to wait for another publisher of the same store before failing.",
    )
    nudge: bool = Field(
        False,
        description="Move the vectors of the chunks the judge chose for logged queries towards "
        "those queries (NUDGE, with the step `ragtune learn` chose), so queries like them find "
        "those chunks; needs `ragtune learn` first.",
    )
    nudge_step: float | None = Field(
        None, ge=0, description="With nudge: how far to move them; blank: the step learn chose."
    )


class PublishParams(PublishSettings, StoreParams, RunnerParams):
    model: str | None = Field(
        None,
        description="The model whose embeddings are published (folder, bundled name or hub "
        "id); blank: the newest model in the workspace's models/.",
    )
    dim: int | None = Field(
        None, ge=1, description="Embedding dimension (Matryoshka); blank: the model's full width."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Headline metrics to record on the collection."
    )


class AliasParams(StoreParams):
    alias: str = Field("docs", description="Stable name of the published collection.")


class LoggedSearchParams(AliasParams):
    """What searches the alias and may log its queries."""

    log_queries: bool | None = Field(
        None,
        description="Append the query and the chunk ids it returned to the workspace's "
        "querylog/ (what `ragtune learn` learns from; never sent to Prefect logs or "
        "artifacts); blank: on for the embedded store, off for a Chroma server.",
    )


class SearchParams(LoggedSearchParams):
    query: str = Field(..., description="What to search for, in plain words.")
    k: int = Field(5, ge=1, le=100, description="How many chunks to return.")
    rerank: int = Field(
        0,
        ge=0,
        le=100,
        description="Let the bundled LLM read this many top chunks and reorder them with the "
        "retriever (about 1 s per 10 chunks on 2 CPU cores); 0: off.",
    )


class SearchServiceParams(LoggedSearchParams):
    """`ragtune serve-search`: the HTTP search service (tasks.serving.service)."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0: every one).")
    port: int = Field(8765, ge=1, le=65535, description="Port to listen on.")
    token_env: str | None = Field(
        "RAGTUNE_SEARCH_TOKEN",
        description="Environment variable holding the bearer token every request must carry; "
        "unset or empty variable: no token.",
    )
    recheck_seconds: float = Field(
        1.0, ge=0, description="How often to re-read the alias, to follow a publish's swap."
    )
    max_batch: int = Field(
        32, ge=1, le=256, description="Most concurrent queries encoded together."
    )

    def token(self) -> str | None:
        return (os.environ.get(self.token_env) or None) if self.token_env else None


# --- the whole pipeline ----------------------------------------------------------------------


class RunParams(SeedParams, StoreParams, RunnerParams):
    """What the pipeline and the nightly refresh share: where things are, what to read, the base
    model and the seed once, then one section per stage they run. A field left unset in a
    section takes the profile's value, then the section's own default."""

    profile: ProfileName = Field(
        "demo", description="demo: offline, bundled models, minutes on CPU. production: bge-base."
    )
    sources: list[str] = _sources()
    base_model: str | None = Field(
        None,
        description="The embedding model being tuned: it measures chunks, filters questions, "
        "finds the judge's candidates and is the model to beat (bundled name, hub id, folder); "
        "blank: the profile's.",
    )
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Chunking")
    questions: QuestionSettings = Field(
        default_factory=QuestionSettings, description="Question generation and filtering"
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_backends(cls, data: Any) -> Any:
        """A generator given without a backend is the profile's backend with those settings:
        `--profile production --set questions.generator.model=m` means the api writer."""
        if not isinstance(data, dict):
            return data
        questions = data.get("questions")
        generator = questions.get("generator") if isinstance(questions, dict) else None
        if isinstance(generator, dict) and "backend" not in generator:
            backend = profile_defaults(data.get("profile", "demo"))["questions"]["generator"]
            data = {**data, "questions": {**questions, "generator": {**backend, **generator}}}
        return data

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
                given = section.model_dump(include=section.model_fields_set)
                update[name] = type(section).model_validate(given | fill)
        return self.model_copy(update=update)

    def _shared(self, *fields: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in fields}

    def ingest_params(self) -> IngestParams:
        return IngestParams(
            **self._shared("workspace", "sources", "base_model"), **self.ingest.model_dump()
        )

    def question_params(self) -> QuestionParams:
        return QuestionParams(
            **self.runner_settings(),
            **self._shared("workspace", "base_model", "seed"),
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

    label: LabelSettings = Field(
        default_factory=LabelSettings, description="The judge labels the synthetic questions"
    )
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

    def label_params(self) -> LabelParams:
        return LabelParams(
            **self.runner_settings(),
            **self._shared("workspace", "base_model", "seed"),
            **self.label.model_dump(),
            judge=self.learn.judge,
        )

    def learn_params(self) -> LearnParams:
        return LearnParams(
            **self._shared("workspace", "base_model", "seed"), **self.learn.model_dump()
        )

    def finetune_params(self) -> FinetuneParams:
        return FinetuneParams(
            **self._shared("workspace", "base_model", "seed"), **self.finetune.model_dump()
        )

    def evaluate_params(self, tuned_model: str) -> EvaluateParams:
        return EvaluateParams(
            **self._shared("workspace", "base_model"),
            tuned_model=tuned_model,
            **self.evaluate.model_dump(),
        )
