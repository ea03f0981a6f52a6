"""Vectors and search: unit rows (checked, normalised), the hnswlib graph over them, and the
search kernels (exact, and through the graph)."""

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


def search_exact(vectors: np.ndarray, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """The `fetch` rows of `vectors` [N, D] most similar to each query of `q` [Q, D] (unit rows),
    most similar first (ties: the lower row first): rows [Q, fetch] and similarities [Q, fetch]."""
    n = len(vectors)
    rows = np.empty((len(q), fetch), dtype=np.int64)
    sims = np.empty((len(q), fetch), dtype=np.float32)
    step = max(1, (1 << 26) // max(n, 1))  # keep each [step, N] block of similarities near 256 MB
    for start in range(0, len(q), step):
        block = q[start : start + step] @ np.asarray(vectors).T
        if fetch < n:
            top = np.argpartition(-block, fetch - 1, axis=1)[:, :fetch]
        else:
            top = np.broadcast_to(np.arange(n), block.shape)
        top_sims = np.take_along_axis(block, top, axis=1)
        for j in range(len(block)):
            order = np.lexsort((top[j], -top_sims[j]))
            rows[start + j] = top[j][order]
            sims[start + j] = top_sims[j][order]
    return rows, sims


def search_hnsw(graph: Any, q: np.ndarray, fetch: int, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As `search_exact`, through the hnswlib `graph` over `vectors` (approximate); exact where
    the graph finds fewer than `fetch` items."""
    try:
        labels, dists = graph.knn_query(q, k=fetch)
    except RuntimeError:  # the graph found fewer than `fetch` items: fall back to exact search
        return search_exact(vectors, q, fetch)
    return labels.astype(np.int64), (1.0 - dists).astype(np.float32)
