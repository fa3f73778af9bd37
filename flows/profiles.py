"""Named sets of defaults: `demo` runs offline on 2 CPU cores in minutes, `production` is the
recipe of seed 003 (bge-base-en-v1.5, an LLM behind an OpenAI-compatible API, 5 epochs)."""

from __future__ import annotations

from typing import Any

from tasks.models import BGE_BASE, MINILM

#: Per profile: the base model, then a value for fields of each stage's section.
PROFILES: dict[str, dict[str, Any]] = {
    "demo": {
        "base_model": MINILM,
        "questions": {"generator": {"backend": "local"}, "questions_per_chunk": 3},
        # The label stage's candidates all come from one small corpus, so each chunk recurs in
        # many questions' lists: kept passage states make a recurring chunk cost only the
        # question's tokens.
        "learn": {"judge": {"backend": "local", "cache_size": 256}},
        # Minutes on 2 cores: 5 candidates and the own chunk halve the judge's work.
        "label": {"top_k": 5},
        "finetune": {
            "recipe": "matryoshka-mnrl",
            "epochs": 3,
            "batch_size": 32,
            "learning_rate": 5e-5,
            # Short sequences are most of the CPU speed-up (docs/library-notes.md); chunks stay
            # 256 tokens.
            "max_seq_length": 128,
        },
    },
    "production": {
        "base_model": BGE_BASE,
        "questions": {"generator": {"backend": "api"}, "questions_per_chunk": 2},
        "finetune": {
            "recipe": "matryoshka-mnrl",
            "epochs": 5,
            "batch_size": 20,
            "learning_rate": 5e-5,
        },
    },
}


def profile_defaults(name: str) -> dict[str, Any]:
    """The defaults of a profile, with a clear error for an unknown name."""
    try:
        return dict(PROFILES[name])
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
