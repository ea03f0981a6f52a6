"""The in-context cropping loop: decode -> embed -> retrieve -> propose -> score -> refine -> select.

One `Cropper` owns the models (embedder, optional VLM, scorer) and an example index. It crops
a batch of requests at a time: every image is embedded and retrieved once, however many
ratios it is cropped to; every round asks the VLM for all jobs of the batch in one call and
scores all their candidates in one fused pass. Model output never crashes the loop: an
answer that cannot be used is retried once, then the job falls back to the non-VLM proposer.
Without a VLM, the faces to keep whole are detected in a worker thread while the batch is
embedded, retrieved and analysed, and joined before the candidates are constrained.
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
from cropper_engine.engine.geometry import (
    dedupe,
    mask_bbox,
)
from cropper_engine.engine.job import (
    PIPELINE_FALLBACK,
    PIPELINE_NO_VLM,
    PIPELINE_VLM,
    BatchContext,
    Job,
    SaliencyMaps,
    _row_timings,
)
from cropper_engine.engine.no_vlm import NoVlmMixin, at_full_size, faces_only  # noqa: F401  (at_full_size re-exported)
from cropper_engine.engine.parse import parse_boxes
from cropper_engine.engine.prompt import (
    PromptSpec,
    PromptTemplates,
    build_messages,
    load_templates,
    render_text,
)
from cropper_engine.errors import CropperError
from cropper_engine.imageio import LoadedImage, load_mask, open_image
from cropper_engine.models.base import GenerationParams
from cropper_engine.types import Box, Candidate, CropRequest, CropResult, Ratio, Task

# The longest side a reduced decode must hold for the no-VLM default (`Cropper.draft_side`): the
# face detector's copy (engine/subject DETECT_SIDE); the analysis (160), the classical descriptor
# (128) and saliency (160) read less. tests/test_default_pipeline.py checks it against them.
DRAFT_SIDE = 512


@functools.lru_cache(maxsize=65536)
def _real(path: str) -> str:
    return os.path.realpath(path)


class Cropper(NoVlmMixin, ExamplesMixin, ConstrainMixin):
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

    # ----------------------------------------------------------------------------------
    def _run_vlm(self, jobs: list[Job], batch: BatchContext, timings: dict[str, float], t: float) -> float:
        from cropper_engine.engine.budget import fit_to_context
        from cropper_engine.engine.grammar import BoxGrammar

        sal = batch.saliency
        cfg = self.cfg.vlm
        n_boxes = 1 if cfg.parallel else cfg.candidates
        grammar = BoxGrammar(boxes=n_boxes)
        params = GenerationParams(
            n=cfg.candidates if cfg.parallel else 1,
            max_new_tokens=cfg.max_new_tokens * n_boxes if cfg.max_new_tokens else self.answer_limit(grammar),
            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
            grammar=grammar if cfg.constrained else None,
        )

        def tick(stage: str, t0: float) -> float:
            t1 = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + (t1 - t0)
            return t1

        for job in jobs:
            w, h = job.size
            job.spec = PromptSpec(job.task, job.image.image, w, h, job.examples, n_boxes, job.ratio,
                                  job.subject if job.task is Task.SUBJECT else None,
                                  query_uuid="q-" + job.image.uid, query_name=str(job.image.path))
            # fewer examples if S would not fit the context
            job.spec, note = fit_to_context(job.spec, self.templates, self.vlm, cfg.candidates, cfg.rounds,
                                            params.max_new_tokens, self._scorer_words(job))
            if note:
                job.notes.append(note)
            if not job.spec.examples:
                why = "S=0" if self.cfg.retrieval.examples == 0 else (
                    "no example index" if self.zero_shot else "no example could be shown")
                job.notes.append(f"zero-shot: the VLM was shown no examples ({why})")
            if self.record_prompts:
                job.prompts = []
        t = tick("prompt", t)

        # round 0 with one retry, then the classical fallback for jobs still without boxes
        pending = list(jobs)
        for attempt in range(1 + max(self.cfg.loop.retries, 0)):
            if not pending:
                break
            convs = [build_messages(j.spec, self.templates) for j in pending]  # type: ignore[arg-type]
            t = tick("prompt", t)
            gens = self._generate(convs, params, attempt, pending, 0)
            t = tick("generate", t)
            self._record(pending, convs, gens, 0, attempt)
            still = []
            for job, gen in zip(pending, gens, strict=True):
                added = self._add_vlm_boxes(job, gen, 0, n_boxes)
                if not added:
                    job.notes.append(f"round 0 attempt {attempt + 1}: no usable box")
                    still.append(job)
            pending = still
        vlm_jobs = [j for j in jobs if j not in pending]
        if vlm_jobs:
            self._score(vlm_jobs, [sal[j.req] for j in vlm_jobs], only_round=0)
            t = tick("score", t)
        if pending:  # the VLM's answers were unusable twice: the no-VLM default crops these
            t = self._default_crop(pending, PIPELINE_FALLBACK, batch, tick, t)

        active = [j for j in jobs if j.pipeline == PIPELINE_VLM]
        for r in range(1, cfg.rounds + 1):
            if not active:
                break
            convs = []
            for job in active:
                prev = sorted(job.round_candidates(r - 1), key=lambda c: -c.score)[: cfg.candidates]
                refine = [(c.box, c.score, c.vlm_score) for c in prev]  # each box as scored, its score
                convs.append(build_messages(job.spec, self.templates, refine,  # type: ignore[arg-type]
                                            self._scorer_words(job)))
            t = tick("prompt", t)
            gens = self._generate(convs, params, r + 10, active, r)
            t = tick("generate", t)
            self._record(active, convs, gens, r, 0)
            for job, gen in zip(active, gens, strict=True):
                if not self._add_vlm_boxes(job, gen, r, n_boxes):
                    job.notes.append(f"round {r}: no usable box; kept round {r - 1}")
                    for c in job.round_candidates(r - 1):  # carry the previous round forward
                        job.candidates.append(Candidate(c.box, c.score, dict(c.scores), r, "carried",
                                                        c.vlm_score))
            self._score(active, [sal[j.req] for j in active], only_round=r)
            t = tick("score", t)
        return t

    def _scorer_words(self, job: Job) -> str:
        """What the refinement prompt says its scores measure (the scorer's terms for the task)."""
        fn = getattr(self.scorer, "prompt_words", None)
        return fn(job.task) if fn is not None else "the scorer"

    def _generate(self, convs: list[Any], params: GenerationParams, salt: int, jobs: list[Job],
                  round_idx: int) -> list[Any]:
        from cropper_engine.models.base import Generation

        p = GenerationParams(**{**params.__dict__, "seed": (params.seed or 0) + salt})
        inner = getattr(self.vlm, "stage_times", None)
        before = dict(inner) if inner is not None else {}
        try:
            gens = self.vlm.generate(convs, p)  # type: ignore[union-attr]
        except Exception as exc:
            for job in jobs:
                job.notes.append(f"VLM error: {type(exc).__name__}: {exc}")
            return [Generation([]) for _ in convs]
        if inner is not None:  # the backend's own split of the generate time
            for k, v in inner.items():
                self.vlm_stage_times[k] = self.vlm_stage_times.get(k, 0.0) + v - before.get(k, 0.0)
        for job, g in zip(jobs, gens, strict=True):
            job.tokens["prompt"] += g.prompt_tokens
            job.tokens["generated"] += g.generated_tokens
            job.tokens["cached"] += g.cached_tokens or 0
            job.round_tokens.append({"round": round_idx, "prompt": g.prompt_tokens, "generated": g.generated_tokens,
                                     "cached": g.cached_tokens or 0, "shared": g.shared_tokens or 0})
        return gens

    def _record(self, jobs: list[Job], convs: list[Any], gens: list[Any], r: int, attempt: int) -> None:
        """Keep each job's prompt text (images named where they stand) and raw answers."""
        if not self.record_prompts:
            return
        for job, conv, gen in zip(jobs, convs, gens, strict=True):
            if job.prompts is not None:
                cut = list(getattr(gen, "truncated", None) or [])
                job.prompts.append({"round": r, "attempt": attempt + 1, "prompt": render_text(conv),
                                    "answers": list(gen.texts), "cut": cut + [False] * (len(gen.texts) - len(cut))})

    def answer_limit(self, grammar: Any) -> int:
        """max_new_tokens from the model: the longest answer of `grammar` in its tokens + the end
        token (the backend's tokenizer), else its length in characters + 1 (no token is shorter)."""
        fn = getattr(self.vlm, "answer_token_limit", None)
        return int(fn(grammar)) if fn is not None else len(grammar.longest()) + 1

    def _add_vlm_boxes(self, job: Job, gen: Any, r: int, n_boxes: int) -> int:
        w, h = job.size
        boxes: list[Candidate] = []
        job.notes.extend(getattr(gen, "notes", None) or [])  # what the backend changed (a sampling fallback)
        cut = list(getattr(gen, "truncated", None) or []) + [False] * len(gen.texts)
        if any(cut[:len(gen.texts)]):  # never parsed: a box cut short reads as other numbers
            job.notes.append(f"round {r}: {sum(cut[:len(gen.texts)])} of {len(gen.texts)} answers "
                             "cut at the token limit, not used")
        for text, was_cut in zip(gen.texts, cut, strict=False):
            if was_cut:
                continue
            parsed = parse_boxes(text, n_boxes)
            for pb in parsed.boxes:
                box = self._constrain(job, Box.from_norm(pb.as_tuple(), w, h))
                if box is not None:
                    boxes.append(Candidate(box, round=r, source="vlm", vlm_score=pb.s))
            if parsed.repairs and parsed.repairs != [f"0 of {n_boxes} boxes"]:
                job.notes.append(f"round {r} parse: {'; '.join(parsed.repairs)}")
        keep = dedupe([c.box for c in boxes], self.cfg.loop.nms_iou)
        job.candidates.extend(boxes[i] for i in keep)
        job.distinct[r] = {"round": r, "boxes": len(boxes), "distinct": len(keep)}
        return len(keep)

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
