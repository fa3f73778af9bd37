"""Typed settings of each judge backend, and the union the learn stage holds.

The learn stage's `judge` field is `JudgeSettings`, discriminated by `backend`, so the dashboard's
form, the command line's help and `prefect.yaml` show the chosen judge's fields and check them
before any run starts. The judges (`tasks.learn.judges`) extend these models with behaviour.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Tag

from tasks.llm.http import ApiConnection
from tasks.llm.likelihood import MAX_PASSAGE_TOKENS
from tasks.settings import Settings, backend_tag


class LocalJudgeSettings(Settings):
    """The bundled Gemma 3 270M's query likelihood, offline."""

    model_config = ConfigDict(title="local: the bundled Gemma 3 270M")

    backend: Literal["local"] = "local"
    cache_size: int = Field(
        0,
        ge=0,
        description="Passages whose states are kept between queries (pays only where the same "
        "chunks recur soon); 0: judge many queries in shared batches instead.",
    )
    max_passage_tokens: int | None = Field(
        MAX_PASSAGE_TOKENS,
        ge=1,
        description="Tokens of each passage the judge reads; blank: the first 1,000 characters.",
    )


class ApiJudgeSettings(ApiConnection):
    """A model behind an OpenAI-compatible API."""

    model_config = ConfigDict(title="api: an OpenAI-compatible API")

    backend: Literal["api"] = "api"
    mode: Literal["logprobs", "chat"] = Field(
        "logprobs",
        description="logprobs: the query's likelihood from the prompt's log-probabilities "
        "(/completions with echo); chat: a graded label, for servers without them.",
    )
    max_passage_chars: int = Field(1500, ge=1, description="Characters of each passage sent.")


class CrossEncoderJudgeSettings(Settings):
    """A sentence-transformers CrossEncoder reading (query, passage)."""

    model_config = ConfigDict(title="cross-encoder: a sentence-transformers CrossEncoder")

    backend: Literal["cross-encoder"] = "cross-encoder"
    model: str = Field(
        "cross-encoder/ms-marco-MiniLM-L6-v2", description="Hub id or folder of the CrossEncoder."
    )
    batch_size: int = Field(32, ge=1, description="Pairs per forward pass.")


JudgeSettings = Annotated[
    Annotated[LocalJudgeSettings, Tag("local")]
    | Annotated[ApiJudgeSettings, Tag("api")]
    | Annotated[CrossEncoderJudgeSettings, Tag("cross-encoder")],
    backend_tag("local"),
]

#: How the judge's labels become training rows: (query, top chunk); plus the judge's lowest
#: candidate as a hard negative; the judge's scores over all candidates (distillation); or the
#: teacher's margins of a positive over the other candidates (MarginMSE).
LabelForm = Literal["positives", "negatives", "distill", "margin"]
LABEL_FORMS: tuple[str, ...] = ("positives", "negatives", "distill", "margin")

#: The recipe each label form trains under.
FORM_RECIPES = {
    "positives": "matryoshka-mnrl",
    "negatives": "matryoshka-mnrl",
    "distill": "matryoshka-distill",
    "margin": "matryoshka-margin-mse",
}

#: The backends the learn stage can name.
JUDGES = ("local", "api", "cross-encoder")
