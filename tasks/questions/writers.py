"""Build the question writer a stage's typed settings describe (`tasks.questions.settings`),
with the stage's questions-per-chunk and seed. Backends are imported lazily: asking for `api`
does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.questions.generation import QuestionGenerator
from tasks.questions.settings import GENERATORS, GeneratorSettings
from tasks.settings import chosen_backend


def make_generator(
    settings: GeneratorSettings | Mapping[str, Any] | str, **fields: Any
) -> QuestionGenerator:
    """The writer `settings` describe, with `fields` set on it (n, seed, show_progress, or any
    setting): `make_generator("local", n=2)`, `make_generator(params.generator, n=2, seed=7)`.
    Unknown backends or settings are a `ValueError` that lists what is known."""
    chosen = chosen_backend(GeneratorSettings, settings, GENERATORS, "generator")
    values = chosen.model_dump(exclude_unset=True) | fields
    if chosen.backend == "local":
        from tasks.questions.local import LocalGenerator

        return LocalGenerator(**values)
    from tasks.questions.api import ApiGenerator

    return ApiGenerator(**values)
