"""The base of every settings model: a misspelt setting is an error, never silently dropped.

Pydantic ignores unknown fields by default, so `--set epochz=5` (or the same typo in
prefect.yaml, the dashboard's JSON or a backend's settings) would run with the default and say
nothing. Every settings model forbids extra fields, and the message names the model, the unknown
key and the closest valid one. Flow parameters (`flows.params`) and the typed settings of every
generator and judge backend build on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Discriminator, TypeAdapter, model_validator


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = sorted(cls.model_fields)
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(unknown_settings_message(cls.__name__, unknown, known))
        return data


def unknown_settings_message(owner: str, unknown: list[Any], known: list[str]) -> str:
    """`unknown setting 'epochz' for FinetuneParams (did you mean 'epochs'?); valid: ...`"""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown setting{plural} {', '.join(parts)} for {owner}; valid: {', '.join(known)}"


def backend_tag(default: str) -> Discriminator:
    """The discriminator of a backend union: the `backend` field, `default` when it is left out
    (so `{"model": "m"}` means the default backend with that model)."""

    def tag(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("backend", default))
        return str(getattr(value, "backend", default))

    return Discriminator(tag)


def chosen_backend(union: Any, settings: Any, known: Sequence[str], what: str) -> Any:
    """The typed settings of a backend `union`, from a model, a dict (with or without
    `backend`) or a bare backend name; an unknown name is a `ValueError` listing `known`."""
    if isinstance(settings, str):
        if settings not in known:
            raise ValueError(f"unknown {what} {settings!r}; known {what}s: {', '.join(known)}")
        settings = {"backend": settings}
    return TypeAdapter(union).validate_python(settings)
