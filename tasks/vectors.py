"""Unit vectors and cosine rankings, one way each.

Every model here encodes to unit vectors, so cosine similarity is a dot product; a vector cut
to a smaller Matryoshka dimension is re-normalised before it is compared or stored.
"""

from __future__ import annotations

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1; an all-zero row stays zero (the same floor as
    `torch.nn.functional.normalize`, which sentence-transformers' cosine uses)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's `k` highest scores, best first; equal scores keep the
    smaller index first."""
    return np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
