"""The no-VLM default: dense candidates ranked by a model fitted on FCDB, then blended.

For one image and one request (a ratio, or free-form / subject):
1. candidates in unit coordinates (engine/proposers.py `default_candidates`): every box of the
   ratio at 9 scales and up to 9 x 9 positions (~400), or a 5^4 grid of side margins for
   free-form (~600), plus the retrieved neighbours' median crop and their own crops;
2. the task's hard constraints (exact ratio, subject inside) applied by the caller;
3. features (engine/features.py `crop_features`: geometry, four weight-free maps, agreement
   with the neighbours' crops) and the fitted trees (models/default_model.py) rank them;
4. the chosen crop is the mean of all candidates' boxes weighted by exp(model output / T), the
   temperature T picked by cross-validation (it beats the single best box by ~0.007 IoU on the
   ratio task), constrained again.

The neighbours the model looks at come from the classical descriptor's table (the model was
fitted on exactly such neighbours, found leave-one-out); `model_neighbours` fetches them.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from cropper_engine.engine.analysis import ImageAnalysis
from cropper_engine.engine.features import NEIGHBOURS_K, NeighbourCrops, crop_features
from cropper_engine.engine.proposers import default_candidates

KEEP_CANDIDATES = 24  # candidates kept in a result (best first), besides the chosen blend
CLIP_SHORTLIST = 10  # with CLIP weights: the model's best this many are re-ranked with CLIP


@dataclass
class ModelNeighbours:
    crops: NeighbourCrops
    from_index: bool  # found in the engine's own (classical) index, not the built-in table


@dataclass
class Ranked:
    """Candidates of one request, best first."""

    boxes_unit: np.ndarray  # [N, 4]
    sources: list[str]
    raw: np.ndarray  # model outputs [N]
    blend_unit: np.ndarray  # [4] the boxes' mean weighted by exp(raw / blend_temperature)

    @property
    def score(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.raw, -50, 50)))


def neighbour_crops(index: Any, hits: list[Any], k: int = NEIGHBOURS_K) -> NeighbourCrops:
    """The first crop of each hit (FCDB has one a image), in unit coordinates."""
    boxes, sims = [], []
    for hit in hits[:k]:
        ex = index.example(hit.row)
        if not ex.crops:
            continue
        boxes.append(ex.best_crop().to_unit(ex.width, ex.height))
        sims.append(max(float(hit.similarity), 0.0))
    if not boxes:
        return NeighbourCrops.empty()
    return NeighbourCrops(np.asarray(boxes, dtype=np.float64), np.asarray(sims, dtype=np.float64))


def model_neighbours(table: Any, vector: np.ndarray, exclude: Collection[str] | None,
                     k: int = NEIGHBOURS_K) -> NeighbourCrops:
    """Neighbours' crops from the built-in table for one classical descriptor."""
    if table is None or len(table) == 0:
        return NeighbourCrops.empty()
    hits = table.query(np.asarray(vector, dtype=np.float32)[None], k, exclude=set(exclude) if exclude else None)[0]
    return neighbour_crops(table, hits, k)


def candidates(analysis: ImageAnalysis, ratio: float | None, nb: NeighbourCrops,
               extra_unit: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    boxes, sources = default_candidates(analysis.aspect, ratio, nb.boxes_unit)
    if extra_unit is not None and len(extra_unit):
        from cropper_engine.engine.features import fit_ratio_unit

        e = np.clip(np.asarray(extra_unit, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
        if ratio:
            e = fit_ratio_unit(e, ratio, analysis.aspect)
        boxes = np.concatenate([boxes, e])
        sources = [*sources, *(["transfer"] * len(e))]
    return boxes, sources


def rank(model: Any, analysis: ImageAnalysis, boxes_unit: np.ndarray, sources: list[str],
         ratio: float | None, nb: NeighbourCrops) -> Ranked:
    """Score candidate boxes (already constrained) with the task's model; best first. A box that
    comes more than once (constraints often turn many candidates into the same crop around a
    face) is scored once: its features and score are a function of the box alone."""
    uniq, inverse = np.unique(boxes_unit, axis=0, return_inverse=True)
    if len(uniq) < len(boxes_unit):
        raw = model_raw(model, crop_features(analysis, uniq, ratio, nb, model.features))[inverse.reshape(-1)]
    else:
        raw = model_raw(model, crop_features(analysis, boxes_unit, ratio, nb, model.features))
    order = np.argsort(-raw, kind="stable")
    return Ranked(boxes_unit[order], [sources[i] for i in order], raw[order],
                  blend(boxes_unit, raw, model.blend_temperature))


_POOL: tuple[int, Any] | None = None  # (pid, a worker thread for the second half of the rows)
PARALLEL_ROWS = 256  # from this many candidates on, the trees score two halves at once


def model_raw(model: Any, x: np.ndarray) -> np.ndarray:
    """The model's outputs for feature rows x. From PARALLEL_ROWS rows on (where a second core is),
    the second half is scored in a worker thread while this one scores the first (numpy releases
    the GIL in the tree walk); each row's output depends on that row alone, so the result is the
    same bit for bit."""
    global _POOL
    n = len(x)
    if n < PARALLEL_ROWS or (os.cpu_count() or 1) < 2:
        return model.raw(x)
    if _POOL is None or _POOL[0] != os.getpid():  # a fork has no worker thread: start one
        from concurrent.futures import ThreadPoolExecutor

        _POOL = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="cropper-trees"))
    half = n // 2
    second = _POOL[1].submit(model.raw, x[half:])
    return np.concatenate([model.raw(x[:half]), second.result()])


def blend(boxes_unit: np.ndarray, raw: np.ndarray, temperature: float) -> np.ndarray:
    """The boxes' mean weighted by exp(raw / temperature): the best boxes dominate, near-ties share."""
    w = np.exp((raw - raw.max()) / max(temperature, 1e-6))
    return (boxes_unit * w[:, None]).sum(axis=0) / w.sum()


def retrieve_for_model(index: Any, embedder: Any, hits: dict[int, list[Any]], requests: Any, images: Any,
                       live: list[int], exclude_ids: Any, table: Any = None) -> dict[int, ModelNeighbours]:
    """The neighbours the model looks at, per request: those the engine retrieved when its index
    speaks the classical descriptor (as the model was fitted), else the built-in table's for the
    image's classical descriptor (CLIP weights or another index in use); `table`: a fitted model's
    own table instead of the built-in one. Excluded ids as ever."""
    from cropper_engine.index.builtin import load_table
    from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder

    out: dict[int, ModelNeighbours] = {}
    own = index is not None and len(index) > 0 and getattr(index, "embedder_id", None) == CLASSICAL_ID
    if own:
        return {i: ModelNeighbours(neighbour_crops(index, hits.get(i, [])), True) for i in live}
    table = table if table is not None else load_table(CLASSICAL_ID)
    emb = embedder if getattr(embedder, "id", None) == CLASSICAL_ID else ClassicalEmbedder()
    excl = exclude_ids or [None] * len(requests)
    for i in live:
        ids = set(excl[i] or set()) | ({requests[i].id} if requests[i].id else set())
        vec = emb.embed([images[i].working])[0]  # downscaled to 128 px: a reduced decode does
        out[i] = ModelNeighbours(model_neighbours(table, vec, ids), False)
    return out


def snap_to_pixels(box: Any, ratio: float | None, width: int, height: int) -> Any:
    """The box on whole pixels: rounding it later changes nothing, and with a ratio its integer
    size is the one nearest that ratio (1:1 stays square): `geometry.whole_pixel_box`."""
    from cropper_engine.engine.geometry import whole_pixel_box

    return whole_pixel_box(box, ratio, width, height)


def keep_ranked(ranked: Ranked, n: int) -> list[int]:
    """Indices (best first) of the candidates a result keeps: the best `n`, plus the best one of
    every source not among them (so a report shows where candidates came from)."""
    keep = list(range(min(n, len(ranked.raw))))
    seen = {ranked.sources[k] for k in keep}
    for k in range(len(keep), len(ranked.raw)):
        if ranked.sources[k] not in seen:
            seen.add(ranked.sources[k])
            keep.append(k)
    return keep


def rerank_with_clip(scorer: Any, jobs: list[Any], saliency: list[np.ndarray]) -> None:
    """With CLIP weights (FusedScorer with an embedder): the model's shortlist is re-scored as the
    weighted mean of the model's score (weight `scoring.classical_weight`: the fitted model takes
    the classical scorer's place; area is one of its features), CLIP similarity (`clip_weight`)
    and aesthetics (`aesthetic_weight`); the chosen crop becomes the best re-scored box. CLIP can
    reorder the model's best `CLIP_SHORTLIST` boxes but never promote a box the model ranks low."""
    from cropper_engine.types import Candidate

    todo = []
    for job in jobs:
        short = [c for c in job.candidates if not c.source.startswith("default-blend")][:CLIP_SHORTLIST]
        todo.append(short)
    if not any(todo):
        return
    out = scorer.score([j.image.image for j in jobs], [[c.box for c in cs] for cs in todo], saliency)
    w = scorer.weights
    weights = {"model": w.get("classical", 0.0), "clip": w.get("clip", 0.0), "aesthetic": w.get("aesthetic", 0.0)}
    wsum = sum(weights.values()) or 1.0
    for job, short, comps in zip(jobs, todo, out.components, strict=True):
        if not short:
            continue
        for k, c in enumerate(short):
            for name in ("clip", "aesthetic"):
                if name in comps:
                    c.scores[name] = float(comps[name][k])
            c.score = sum(weights[n] * c.scores.get(n, 0.0) for n in weights) / wsum
        ids = {id(c) for c in short}
        for c in job.candidates:  # the rest (and the model-only blend) as if CLIP gave them nothing
            if id(c) not in ids:
                c.score = weights["model"] * c.scores.get("model", 0.0) / wsum
        best = max(short, key=lambda c: c.score)
        job.candidates = [c for c in job.candidates if not c.source.startswith("default-blend")]
        job.candidates.insert(0, Candidate(best.box, best.score, dict(best.scores), 0, "default-clip"))


__all__ = [
    "KEEP_CANDIDATES",
    "ModelNeighbours",
    "Ranked",
    "blend",
    "candidates",
    "keep_ranked",
    "model_neighbours",
    "model_raw",
    "neighbour_crops",
    "rank",
    "rerank_with_clip",
    "retrieve_for_model",
    "snap_to_pixels",
]
