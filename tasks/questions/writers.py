"""Question writers behind one small protocol.

A writer turns passages into questions. It is built from its typed settings
(`tasks.questions.settings`) and the stage's questions-per-chunk and seed, and its
`fingerprint()` names everything that changes its output, so the question cache can key on
(chunk id, fingerprint) and never pay for LLM work twice. Backends are imported lazily: asking
for `api` does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import TypeAdapter

from tasks.progress import Progress
from tasks.questions.settings import GENERATORS, GeneratorSettings


@dataclass
class Generation:
    """What one passage produced."""

    #: one question per item, lightly stripped (no numbering); deeper cleaning is curation's
    questions: list[str]
    #: set when the passage failed after retries; `questions` is then empty
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class QuestionGenerator(Protocol):
    @property
    def name(self) -> str: ...

    def fingerprint(self) -> str:
        """A stable hash of everything that changes the output (never a secret)."""
        ...

    def generate(
        self, passages: Sequence[str], progress: Progress | None = None
    ) -> list[Generation]:
        """One `Generation` per passage, in order; a failed passage never raises."""
        ...


def generator_settings(settings: GeneratorSettings | Mapping[str, Any] | str) -> GeneratorSettings:
    """Typed settings from a model, a dict with `backend`, or a bare backend name."""
    if isinstance(settings, str):
        if settings not in GENERATORS:
            raise ValueError(
                f"Unknown question generator {settings!r}; known generators: "
                f"{', '.join(GENERATORS)}"
            )
        settings = {"backend": settings}
    return TypeAdapter(GeneratorSettings).validate_python(settings)


def make_generator(
    settings: GeneratorSettings | Mapping[str, Any] | str, **fields: Any
) -> QuestionGenerator:
    """The writer `settings` describe, with `fields` set on it (n, seed, show_progress, or any
    setting): `make_generator("local", n=2)`, `make_generator(params.generator, n=2, seed=7)`.
    Unknown backends or settings are a `ValueError` that lists what is known."""
    chosen = generator_settings(settings)
    values = chosen.model_dump(exclude_unset=True) | fields
    if chosen.backend == "local":
        from tasks.questions.local import LocalGenerator

        return LocalGenerator(**values)
    from tasks.questions.api import ApiGenerator

    return ApiGenerator(**values)
