"""Question generators behind one small protocol.

A generator turns passages into questions. It is chosen by name with settings
(`make_generator("local", n=2)`), and its `fingerprint()` names everything that changes its
output, so the question cache can key on (chunk id, fingerprint) and never pay for LLM work twice.
Backends are imported lazily: asking for `api` does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tasks.progress import Progress


@dataclass
class Generation:
    """What one passage produced."""

    #: one question per item, lightly stripped (no numbering); deeper cleaning is questions.py's
    questions: list[str]
    #: set when the passage failed after retries; `questions` is then empty
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class QuestionGenerator(Protocol):
    name: str

    def fingerprint(self) -> str:
        """A stable hash of everything that changes the output (never a secret)."""
        ...

    def generate(
        self, passages: Sequence[str], progress: Progress | None = None
    ) -> list[Generation]:
        """One `Generation` per passage, in order; a failed passage never raises."""
        ...


def _registry() -> dict[str, Callable[[], type]]:
    def local() -> type:
        from tasks.generators.local import LocalGenerator

        return LocalGenerator

    def api() -> type:
        from tasks.generators.api import ApiGenerator

        return ApiGenerator

    return {"local": local, "api": api}


#: the names `make_generator` knows
GENERATORS = tuple(_registry())


def make_generator(name: str, **settings: Any) -> QuestionGenerator:
    """Build the generator called `name` with `settings`; unknown names or settings are a
    `ValueError` that lists what is known."""
    registry = _registry()
    if name not in registry:
        raise ValueError(
            f"Unknown question generator {name!r}; known generators: {', '.join(registry)}"
        )
    cls = registry[name]()
    check_settings(cls, settings, f"the {name!r} generator")
    return cls(**settings)


def check_settings(cls: type, settings: dict[str, Any], what: str) -> None:
    """Raise a `ValueError` naming the settings the dataclass `cls` does not take, and the ones
    it does; shared by generators and judges, which both take settings from flow parameters."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(settings) - known)
    if unknown:
        hint = (
            " (an API key never goes in settings, which end up in flow-run parameters: put it in "
            "the environment variable named by api_key_env, or in a Prefect Secret block named "
            "by api_key_secret)"
            if "api_key" in unknown
            else ""
        )
        raise ValueError(
            f"Unknown setting(s) for {what}: {', '.join(unknown)}; "
            f"known settings: {', '.join(sorted(known))}{hint}"
        )


__all__ = [
    "GENERATORS",
    "Generation",
    "Progress",
    "QuestionGenerator",
    "check_settings",
    "make_generator",
]
