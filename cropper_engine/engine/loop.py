"""The in-context cropping loop: decode -> embed -> retrieve -> propose -> score -> refine -> select.

One `Cropper` owns the models (embedder, optional VLM, scorer) and an example index. It crops
a batch of requests at a time: every image is embedded and retrieved once, however many
ratios it is cropped to; every round asks the VLM for all jobs of the batch in one call and
scores all their candidates in one fused pass. Model output never crashes the loop: an
answer that cannot be used is retried once, then the job falls back to the non-VLM proposer.
Without a VLM, the faces to keep whole are detected in a worker thread while the batch is
embedded, retrieved and analysed, and joined before the candidates are constrained.

`Cropper` keeps the batch (`crop_batch`: decode, embed, retrieve, then the pipelines), the
scoring and the choice of the result; its other jobs are mixins beside it: the VLM rounds
(vlm_rounds.py), the no-VLM path (no_vlm.py, with default_pipeline.py's ranking), the shown
examples (examples.py) and the hard constraints (constrain.py). A job and a batch's state are
job.py's. Every name this module had is still importable from it.
"""

from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from cropper_engine.config import Config
from cropper_engine.engine.constrain import ConstrainMixin
from cropper_engine.engine.examples import ExamplesMixin, ImageCache, _uuid  # noqa: F401  (_uuid re-exported)
from cropper_engine.engine.geometry import mask_bbox
from cropper_engine.engine.job import (  # noqa: F401  (PIPELINE_FALLBACK re-exported)
    PIPELINE_FALLBACK,
    PIPELINE_NO_VLM,
    PIPELINE_VLM,
    BatchContext,
    Job,
    SaliencyMaps,
    _row_timings,
)
from cropper_engine.engine.no_vlm import NoVlmMixin, at_full_size, faces_only  # noqa: F401  (at_full_size re-exported)
from cropper_engine.engine.prompt import PromptTemplates, load_templates
from cropper_engine.engine.vlm_rounds import VlmRoundsMixin
from cropper_engine.errors import CropperError
from cropper_engine.imageio import LoadedImage, load_mask, open_image
from cropper_engine.types import Candidate, CropRequest, CropResult, Ratio, Task

# The longest side a reduced decode must hold for the no-VLM default (`Cropper.draft_side`): the
# face detector's copy (engine/subject DETECT_SIDE); the analysis (160), the classical descriptor
# (128) and saliency (160) read less. tests/test_default_pipeline.py checks it against them.
DRAFT_SIDE = 512


@functools.lru_cache(maxsize=65536)
def _real(path: str) -> str:
    return os.path.realpath(path)


class Cropper(VlmRoundsMixin, NoVlmMixin, ExamplesMixin, ConstrainMixin):
    """The engine. Build with `Cropper.from_config(cfg)` (resolves models) or pass parts."""

    def __init__(self, cfg: Config, *, embedder: Any, scorer: Any, index: Any | None = None,
                 vlm: Any | None = None, templates: PromptTemplates | None = None,
                 reasons: dict[str, str] | None = None, default_model: Any = None) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self.scorer = scorer
        self.index = index
        self.vlm = vlm
        self.templates = templates or load_templates(cfg.vlm.template or None)
        self.reasons = reasons or {}
        self.default_model = default_model  # the no-VLM ranker (`cropper-engine fit`); None: the shipped one
        self.example_images = ImageCache(max_side=getattr(vlm, "image_edge", None) or 1024)
        # subject boxes of examples of an index built without them (index/subjects.py), by example id
        self._auto_subjects: OrderedDict[str, Any] = OrderedDict()
        self.vlm_stage_times: dict[str, float] = {}  # vision / prefill / decode, for benchmarks
        self.record_prompts = False  # keep every prompt's text and raw answers (crop --save-prompts)
        self._pool: tuple[int, Any] | None = None  # (pid, thread pool) for face detection beside the rest
        self.zero_shot = vlm is not None and (index is None or not index.has_images())
        if self.zero_shot:
            self.reasons.setdefault("zero_shot", "no example index with images: the VLM runs zero-shot (S=0)")

    @classmethod
    def from_config(cls, cfg: Config, **parts: Any) -> Cropper:
        from cropper_engine.engine.build import build_parts

        built = build_parts(cfg, **parts)
        return cls(cfg, **built)

    @property
    def pipeline(self) -> str:
        return PIPELINE_VLM if self.vlm is not None else PIPELINE_NO_VLM

    def describe(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "vlm": getattr(self.vlm, "id", None),
            "embedder": getattr(self.embedder, "id", None),
            "index": self.index.describe() if self.index is not None else None,
            "scorer": self.scorer.describe(),
            "reasons": dict(self.reasons),
        }

    def close(self) -> None:
        close = getattr(self.vlm, "close", None)
        if close:
            close()

    # ----------------------------------------------------------------------------------
    def crop(self, request: CropRequest) -> list[CropResult]:
        out = self.crop_batch([request])[0]
        if isinstance(out, CropperError):
            raise out
        return out

    def crop_batch(self, requests: Sequence[CropRequest],
                   exclude_ids: Sequence[set[str] | None] | None = None) -> list[list[CropResult] | CropperError]:
        """Crop each request; a request that fails (unreadable image, bad mask) gets its error
        in its slot and the others go on."""
        timings: dict[str, float] = {}
        results: list[list[CropResult] | CropperError] = [[] for _ in requests]

        def tick(stage: str, t0: float) -> float:
            t1 = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + (t1 - t0)
            return t1

        t = time.perf_counter()
        jobs: list[Job] = []
        images: list[LoadedImage | None] = []
        own: dict[int, dict[str, float]] = {i: {} for i in range(len(requests))}  # per request, timed alone
        pending: dict[int, Any] = {}
        for i, req in enumerate(requests):
            t_own = time.perf_counter()
            try:
                img = open_image(req.image, self.cfg.max_pixels, draft_side=self.draft_side(req.subject))
                mask = subject = sub = None
                keep = req.keep_faces if req.keep_faces is not None else self._keep_faces_default(req)
                if req.subject is not None or keep:
                    from cropper_engine.engine.subject import resolve_subject

                    if req.subject is None and self.vlm is None:
                        # only the faces to keep whole: detected in a thread while this thread embeds,
                        # retrieves and analyses the image (MediaPipe releases the GIL); joined before
                        # the candidates are constrained (`_settle_faces`)
                        pending[i] = self._thread_pool().submit(faces_only, img, keep)
                    else:
                        sub = resolve_subject(req.subject, img, keep)
                if req.task is Task.SUBJECT:  # the subject's mask, else the user's
                    mask = sub.mask if sub is not None and req.subject is not None else \
                        load_mask(req.mask, img.size, self.cfg.max_pixels)
                if mask is not None:
                    subject = mask_bbox(mask)
                images.append(img)
                ratios: list[Ratio | None] = list(req.ratios) if req.task is Task.RATIO else [None]
                for r in ratios:
                    job = Job(i, img, req.task, r, mask, subject)
                    if sub is not None:
                        from cropper_engine.engine.subject import attach_subject

                        attach_subject(job, sub)
                    jobs.append(job)
            except CropperError as exc:
                results[i] = exc
                images.append(None)
            own[i]["decode"] = time.perf_counter() - t_own
        t = tick("decode", t)
        live = [i for i, im in enumerate(images) if im is not None]
        if not jobs:
            return results

        # embed and retrieve once per image, whatever the number of ratios
        neighbours: dict[int, list[Any]] = {}
        if self.index is not None and len(self.index) > 0:
            vecs = self.embedder.embed([images[i].working for i in live])  # type: ignore[union-attr]
            t = tick("embed", t)
            k = max(self.cfg.retrieval.examples, 1) if not self.zero_shot else 0
            k_fetch = max(k, 30)
            excl = exclude_ids or [None] * len(requests)
            for row, i in enumerate(live):
                ids = excl[i] or set()
                if requests[i].id:
                    ids = set(ids) | {requests[i].id}
                neighbours[i] = self.index.query(vecs[row:row + 1], k_fetch,
                                                 exclude=self._not_itself(requests[i].image, ids))[0]
            t = tick("retrieve", t)

        sal_cache = SaliencyMaps(images, own)
        if self.vlm is not None:  # the VLM's scoring reads every map; the no-VLM default only its fallbacks
            for i in live:
                sal_cache[i]
            t = tick("saliency", t)

        for job in jobs:
            self._attach_neighbours(job, neighbours.get(job.req, []))
        t = tick("retrieve", t)

        batch = BatchContext(requests, images, live, neighbours, exclude_ids, sal_cache, own, pending)
        try:
            if self.vlm is None:
                t = self._default_crop(jobs, PIPELINE_NO_VLM, batch, tick, t)
            else:
                t = self._run_vlm(jobs, batch, timings, t)
        finally:
            for fut in pending.values():  # an error above: do not leave detections running
                fut.cancel()
        for i, exc in batch.failed.items():
            results[i] = exc

        per_req = {i: sum(1 for j in jobs if j.req == i) for i in live}
        for job in jobs:
            res = self._select(job)
            res.timings = _row_timings(job, timings, own, jobs, per_req)
            results[job.req].append(res)  # type: ignore[union-attr]
        return results

    def draft_side(self, subject: Any = None) -> int | None:
        """How large a decode of an image the engine needs (for a request with this `--subject`
        spec, None without), for `open_image`'s
        draft_side: the no-VLM default with its fitted model reads only downscaled copies (the
        analysis 160 px, the descriptor 128, saliency 160, the face detector 512), so a large JPEG
        is decoded at 1/2..1/8 scale holding DRAFT_SIDE and at full size only where a crop is cut
        (`LoadedImage.image`). None (a full decode) where something reads the full image: a VLM,
        CLIP scoring of crops, a subject spec (resolved on the full image), no fitted model."""
        if self.vlm is not None or getattr(self.scorer, "embedder", None) is not None or subject is not None:
            return None
        from cropper_engine.models.default_model import default_model

        if self.default_model is None and default_model() is None:
            return None
        return DRAFT_SIDE

    def _not_itself(self, image: Any, ids: set[str]) -> Any:
        """What retrieval leaves out for a query: examples of the given ids and, for an image
        file, any example of that same file (an index built by another reader has other ids)."""
        if not isinstance(image, (str, os.PathLike)):
            return ids or None
        own = _real(str(image))
        index = self.index

        def excluded(row: int) -> bool:
            ex = index.example(row)  # type: ignore[union-attr]
            return ex.id in ids or _real(ex.image_path) == own

        return excluded

    def _keep_faces_default(self, req: CropRequest) -> bool | None:
        """Whether a request that does not say keeps detected faces whole: `loop.keep_faces`;
        auto = yes wherever a face detector is installed (the crops people complain about most
        are those that cut heads off). None leaves it to the subject (on for auto and face)."""
        mode = self.cfg.loop.keep_faces
        if mode == "off":
            return False if req.subject is None else None
        if mode == "on":
            return True
        from cropper_engine.engine.subject import face_detector  # built once per process

        return True if face_detector() is not None else None

    def _score(self, jobs: Sequence[Job], saliency: Sequence[np.ndarray], only_round: int | None = None) -> None:
        """Score the (unscored) candidates of all jobs in one fused batch."""
        todo = [[c for c in j.candidates if (only_round is None or c.round == only_round)] for j in jobs]
        out = self.scorer.score([j.image.image for j in jobs], [[c.box for c in cs] for cs in todo], saliency,
                                [j.task for j in jobs])
        for cs, total, comps in zip(todo, out.total, out.components, strict=True):
            for k, c in enumerate(cs):
                c.score = float(total[k])
                c.scores = {name: float(v[k]) for name, v in comps.items()}

    def _select(self, job: Job) -> CropResult:
        w, h = job.size
        mode = getattr(self.cfg.loop, f"select_{job.task.value}")
        pool = job.candidates
        if job.pipeline == PIPELINE_VLM and mode == "final" and pool:
            last = max(c.round for c in pool)
            pool = [c for c in pool if c.round == last]
        if not pool:  # nothing at all: the whole image (or the largest box of the ratio)
            from cropper_engine.engine.geometry import largest_centered

            box = largest_centered(w, h, job.ratio.value if job.ratio else None)
            box = self._constrain(job, box) or box
            best = Candidate(box, 0.0, {}, 0, "default")
            job.notes.append("no candidate: returned the largest centred crop")
        else:
            best = max(pool, key=lambda c: c.score)
        extra: dict[str, Any] = {"selected": {"round": best.round, "source": best.source, "mode": mode}}
        if job.pipeline != PIPELINE_NO_VLM:
            extra["tokens"] = dict(job.tokens)
            extra["tokens_by_round"] = list(job.round_tokens)
            # per round: the usable boxes the VLM gave and how many of them differ (IoU < loop.nms_iou)
            extra["distinct_by_round"] = [job.distinct[r] for r in sorted(job.distinct)]
        if job.subject is not None:
            extra["subject_box"] = job.subject.as_int()
        if job.subject_info is not None:  # --subject / keep_faces: the source, faces, focal points
            from cropper_engine.engine.subject import result_extra

            extra.update(result_extra(job, best.box))
        return CropResult(job.image.path, w, h, best.box.rounded(), best.score, job.task, job.ratio,
                          job.pipeline, list(job.candidates), {}, list(dict.fromkeys(job.notes)), extra,
                          loaded=job.image, prompts=job.prompts)
