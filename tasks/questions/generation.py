"""What a question writer produces, and the protocol every writer follows.

A writer turns passages into questions; its `fingerprint()` names everything that changes its
output, so the question cache can key on (chunk id, fingerprint) and never pay for LLM work
twice. The writers are `tasks.questions.local` and `tasks.questions.api`, built by
`tasks.questions.writers.make_generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tasks.progress import Progress


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
