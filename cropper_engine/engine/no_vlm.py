"""The no-VLM path of `Cropper` (a mixin, engine/loop.py): the default without a VLM, and the
fallback for jobs whose VLM answers were unusable.

`_default_crop` ranks dense candidates with the fitted model (engine/default_pipeline.py) or,
where no model is shipped, runs the classical proposers and scorer; `_propose_classical` makes
one job's candidates. The faces to keep whole are detected in a worker thread (`_thread_pool`,
`faces_only` on the reduced decode, `at_full_size`) while the batch is embedded, retrieved and
analysed, and joined before the candidates are constrained (`_settle_faces`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from cropper_engine.engine.job import BatchContext, Job
from cropper_engine.engine.proposers import propose
from cropper_engine.errors import CropperError
from cropper_engine.imageio import LoadedImage
from cropper_engine.types import Box, Candidate


def faces_only(img: LoadedImage, keep: bool | None) -> Any:
    """The faces to keep whole in a decoded image (`resolve_subject` with no spec), found on its
    reduced decode where it has one (the detector reads a 512-px copy) and given back in the full
    image's pixels."""
    from cropper_engine.engine.subject import resolve_subject

    if not img.reduced:
        return resolve_subject(None, img, keep)
    return at_full_size(resolve_subject(None, img.working, keep), img)


def at_full_size(sub: Any, img: LoadedImage) -> Any:
    """A faces-only Subject found on `img.working`, its boxes (every Box of each face, the
    persons, the subject box) in the pixels of the full image, clipped to it."""
    import dataclasses

    fx, fy = img.scale
    w, h = img.size

    def up(b: Box) -> Box:
        return Box(b.x1 * fx, b.y1 * fy, b.x2 * fx, b.y2 * fy).clamp(w, h)

    sub.faces = [dataclasses.replace(f, **{fl.name: up(getattr(f, fl.name)) for fl in dataclasses.fields(f)
                                           if isinstance(getattr(f, fl.name), Box)}) for f in sub.faces]
    sub.persons = [up(b) for b in sub.persons]
    if sub.box is not None:
        sub.box = up(sub.box)
    if sub.mask is not None:  # pragma: no cover - a faces-only look-up has none
        raise ValueError("at_full_size: a subject mask cannot be scaled")
    return sub


class NoVlmMixin:
    """The no-VLM path of `Cropper`, which provides `cfg`, `index`, `embedder`, `scorer`,
    `default_model`, `_pool`, `_score` and `_constrain` / `_constrain_many` (ConstrainMixin)."""

    def _default_crop(self, jobs: list[Job], pipeline: str, batch: BatchContext, tick: Any, t: float) -> float:
        """The no-VLM pipeline for `jobs` (all of them without a VLM; those whose VLM answers were
        unusable with one): dense candidates ranked by the fitted model (engine/default_pipeline.py),
        or, where no model is shipped, the classical proposers and scorer."""
        from cropper_engine.models.default_model import default_model

        sal = batch.saliency
        for job in jobs:
            job.pipeline = pipeline
        model = self.default_model if self.default_model is not None else default_model()
        if model is None:
            self._settle_faces(jobs, batch)
            for job in jobs:
                t_own = time.perf_counter()
                self._propose_classical(job, sal[job.req])
                job.own_seconds["propose"] = job.own_seconds.get("propose", 0.0) + time.perf_counter() - t_own
            t = tick("propose", t)
            self._score(jobs, [sal[j.req] for j in jobs])
            return tick("score", t)
        from cropper_engine.engine.analysis import analyse
        from cropper_engine.engine.default_pipeline import rerank_with_clip, retrieve_for_model

        reqs = sorted({j.req for j in jobs})
        analyses = {}
        for i in reqs:
            t_own = time.perf_counter()
            img = batch.images[i]
            analyses[i] = analyse(img.working, img.size)  # type: ignore[union-attr]
            batch.own_seconds.setdefault(i, {})["analyse"] = time.perf_counter() - t_own
        t = tick("analyse", t)
        model_nb = retrieve_for_model(self.index, self.embedder, batch.neighbours, batch.requests, batch.images,
                                      reqs, batch.exclude_ids, table=getattr(model, "table", None))
        t = tick("retrieve", t)
        if batch.pending_faces:
            self._settle_faces(jobs, batch)
            t = tick("faces", t)
        for job in jobs:
            t_own = time.perf_counter()
            self._propose_classical(job, None, analyses[job.req], model, model_nb[job.req])
            job.own_seconds["propose"] = job.own_seconds.get("propose", 0.0) + time.perf_counter() - t_own
        t = tick("propose", t)
        if getattr(self.scorer, "embedder", None) is not None:  # CLIP weights: re-rank the shortlist
            rerank_with_clip(self.scorer, jobs, [sal[j.req] for j in jobs])
            t = tick("score", t)
        return t

    def _thread_pool(self) -> Any:
        """One worker thread for face detection beside the rest of a batch (a new one after a fork)."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="cropper-faces"))
        return self._pool[1]

    def _settle_faces(self, jobs: list[Job], batch: BatchContext) -> None:
        """Wait for the face detections started while decoding and give each job its faces; a
        request whose detection failed gets the error in its slot and loses its jobs."""
        from cropper_engine.engine.subject import attach_subject

        for i, fut in list(batch.pending_faces.items()):
            try:
                sub = fut.result()
            except CropperError as exc:
                batch.failed[i] = exc
                continue
            except Exception as exc:  # a detector fault is this request's error, not the batch's
                logging.getLogger(__name__).exception("face detection failed")
                batch.failed[i] = CropperError(f"face detection failed ({type(exc).__name__}: {exc}); "
                                               "crop this image with --no-keep-faces")
                continue
            finally:
                del batch.pending_faces[i]
            for job in jobs:
                if job.req == i:
                    attach_subject(job, sub)
        if batch.failed:
            jobs[:] = [j for j in jobs if j.req not in batch.failed]

    def _propose_classical(self, job: Job, saliency: np.ndarray | None, analysis: Any = None, model: Any = None,
                           model_nb: Any = None) -> None:
        """Candidates without a VLM. With the fitted default model (and the image's analysis):
        ranked dense candidates, the best few blended (engine/default_pipeline.py); else the
        classical proposers, scored afterwards by `_score`."""
        w, h = job.size
        ratio = job.ratio.value if job.ratio else None
        if analysis is None or model is None:
            for box, src in propose(w, h, ratio, saliency, job.neighbours_unit, job.neighbour_weights):
                box = self._constrain(job, box)
                if box is not None:
                    job.candidates.append(Candidate(box, round=0, source=src))
            return
        from cropper_engine.engine.default_pipeline import (
            KEEP_CANDIDATES,
            candidates,
            keep_ranked,
            rank,
            snap_to_pixels,
        )

        tm = model.for_task(ratio is not None)
        extra = None
        if model_nb is not None and not model_nb.from_index and job.neighbours_unit:
            extra = np.asarray(job.neighbours_unit[:10])  # another index's neighbours: their crops as candidates
        boxes_unit, sources = candidates(analysis, ratio, model_nb.crops, extra)
        if job.subject is not None or getattr(job, "faces", None):  # constrain first: rank what can be returned
            kept, kept_src = [], []
            for box, src in zip(self._constrain_many(job, boxes_unit), sources, strict=True):
                if box is not None:
                    kept.append(box.to_unit(w, h))
                    kept_src.append(src)
            if not kept:
                return
            boxes_unit, sources = np.asarray(kept, dtype=np.float64), kept_src
        ranked = rank(tm, analysis, boxes_unit, sources, ratio, model_nb.crops)
        scores = ranked.score
        blend = self._constrain(job, Box.from_unit(ranked.blend_unit, w, h))
        if blend is not None:  # first and as good as the best single box: `_select` picks it
            job.candidates.append(Candidate(snap_to_pixels(blend, ratio, w, h), float(scores[0]),
                                            {"model": float(scores[0])}, 0, "default-blend"))
        for k in keep_ranked(ranked, KEEP_CANDIDATES):  # the best few, and the best of each source
            box = self._constrain(job, Box.from_unit(ranked.boxes_unit[k], w, h))
            if box is not None:
                box = snap_to_pixels(box, ratio, w, h)
                job.candidates.append(Candidate(box, float(scores[k]), {"model": float(scores[k])}, 0,
                                                ranked.sources[k]))
