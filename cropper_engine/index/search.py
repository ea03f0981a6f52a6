"""Vectors and the search graph: unit rows (checked, normalised) and the hnswlib graph over them."""

from __future__ import annotations

from typing import Any

import numpy as np

from cropper_engine.errors import InputError
from cropper_engine.index.format import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, RANDOM_SEED, SPACE


def _normalise_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms < 1e-12).any():
        raise InputError(f"{what} contain an all-zero vector, which has no direction")
    if np.abs(norms - 1.0).max(initial=0.0) > 1e-4:
        x = x / norms
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalise_queries(q: np.ndarray) -> np.ndarray:
    """Like `_normalise_rows`, with one reduction: queries are on the hot path."""
    norms = np.sqrt(np.einsum("ij,ij->i", q, q))
    if not (np.isfinite(norms).all() and norms.min() > 1e-12):
        raise InputError("query vectors must be finite and non-zero")
    if np.abs(norms - 1.0).max() > 1e-4:
        q = q / norms[:, None]
    return q


def build_graph(vectors: np.ndarray, *, M: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                num_threads: int = -1, random_seed: int = RANDOM_SEED, max_elements: int | None = None) -> Any:
    """An hnswlib graph ("ip" space) over unit rows, labelled with row ids 0..N-1."""
    import hnswlib

    n, dim = vectors.shape
    graph = hnswlib.Index(space=SPACE, dim=int(dim))
    graph.init_index(max_elements=max(max_elements or n, 1), M=M, ef_construction=ef_construction,
                     random_seed=random_seed)
    if n:
        graph.add_items(vectors, np.arange(n, dtype=np.int64), num_threads=num_threads)
    return graph
