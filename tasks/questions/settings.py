"""Typed settings of each question writer backend, and the union a stage holds.

A stage's `generator` field is `GeneratorSettings`: a union of these models discriminated by
`backend`, so the dashboard's form, the command line's help and `prefect.yaml` show every field
of the chosen backend, and a typo or a bad value fails before any run starts. The writers
themselves (`tasks.questions.local`, `tasks.questions.api`) extend these models with behaviour;
this module imports neither torch nor the model, so reading settings stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, Tag, field_validator

from tasks.llm.http import ApiConnection
from tasks.questions.prompts import (
    DEFAULT_CHAT_SYSTEM,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_FEW_SHOT,
    DEFAULT_FEW_SHOT_TEMPLATE,
    FewShot,
    as_few_shot,
    check_template,
    few_shot_prompt,
)
from tasks.settings import Settings, backend_tag

DType = Literal["auto", "float32", "bfloat16", "int8"]


def _examples_shown(default: int) -> Any:
    return Field(default, ge=1, description="Few-shot examples shown per passage.")


def _passage_chars(default: int) -> Any:
    return Field(
        default, ge=1, description="Passages (and examples) are cut to this many characters."
    )


class _Prompted(Settings):
    """What both writers show the model: few-shot examples and real queries' style."""

    few_shot: list[FewShot] = Field(
        default_factory=lambda: list(DEFAULT_FEW_SHOT),
        description='(passage, question) examples, as pairs or {"passage", "question"} '
        "objects; a seeded sample of few_shot_k is shown per passage.",
    )
    example_queries: list[str] = Field(
        default_factory=list,
        description="Real user queries whose style the questions should follow (Promptagator); "
        "keep them out of any evaluation set.",
    )
    template: str = Field(
        DEFAULT_FEW_SHOT_TEMPLATE,
        description="The few-shot document for a base model, with {examples} and {passage}.",
    )
    few_shot_k: int = _examples_shown(2)
    max_passage_chars: int = _passage_chars(1200)

    def few_shot_document(self, passage: str, seed: int) -> str:
        """The few-shot document a base model continues with a question about `passage`."""
        return few_shot_prompt(
            passage,
            pool=self.few_shot,
            k=self.few_shot_k,
            seed=seed,
            template=self.template,
            example_queries=self.example_queries,
            max_chars=self.max_passage_chars,
        )

    def shown_questions(self) -> list[str]:
        """Every question a prompt may show, which the model must not hand back as its own."""
        return [q for _, q in self.few_shot] + list(self.example_queries)

    @field_validator("few_shot", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> list[FewShot]:
        return as_few_shot(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value, ["examples", "passage"], "template")


class LocalGeneratorSettings(_Prompted):
    """The bundled Gemma 3 270M base model, offline."""

    model_config = ConfigDict(title="local: the bundled Gemma 3 270M")

    backend: Literal["local"] = "local"
    # Decoding reads the weights once per step whatever the batch, and rows leave it as their
    # question ends: with 3 questions per chunk, 48 (16 chunks, one generation batch) wrote the
    # demo's chunks 1.35x as fast as 15 in bfloat16 on an AMX Xeon and 1.19x in float32 under
    # the AVX2 cap (BENCHMARKS.md).
    batch_size: int = Field(48, ge=1, description="Sequences per forward pass (left-padded).")
    max_new_tokens: int = Field(40, ge=1, description="New tokens per question.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling's share of the mass.")
    dtype: DType = Field(
        "auto",
        description="auto: bfloat16 where the CPU computes it natively, else float32; int8: "
        "float32 with int8 linear layers.",
    )
    threads: int | None = Field(
        None, ge=1, description="Torch threads while generating; blank: one per idle core."
    )
    cache_dir: str | None = Field(
        None, description="Where the dequantised weights live; blank: $RAGTUNE_CACHE or ~/.cache."
    )


class ApiGeneratorSettings(_Prompted, ApiConnection):
    """An LLM behind an OpenAI-compatible API (OpenAI, Azure, Ollama, vLLM, llama.cpp).

    `chat` suits instruction models; `completions` sends the few-shot document, for base models.
    """

    model_config = ConfigDict(title="api: an OpenAI-compatible API")

    backend: Literal["api"] = "api"
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat for instruction models, completions for base models."
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    max_tokens: int | None = Field(
        None, ge=1, description="Completion tokens per call; blank: 48 per question asked for."
    )
    send_seed: bool = Field(
        True,
        description="Send a per-passage seed (from the stage's seed) where the server takes one.",
    )
    chat_system: str = Field(DEFAULT_CHAT_SYSTEM, description="The chat's system message.")
    chat_template: str = Field(
        DEFAULT_CHAT_TEMPLATE,
        description="The chat's user message, with {passage} (and optionally {n}, {style}).",
    )
    few_shot_k: int = _examples_shown(3)
    max_passage_chars: int = _passage_chars(1500)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str) -> str:
        return check_template(value, ["passage"], "chat_template")


GeneratorSettings = Annotated[
    Annotated[LocalGeneratorSettings, Tag("local")] | Annotated[ApiGeneratorSettings, Tag("api")],
    backend_tag("local"),
]

#: The backends a stage can name, in the order the command line offers them.
GENERATORS = ("local", "api")
