"""Run a cropping method over a dataset and compute the literature's metrics.

A method sees the image and, with `ratio_from_gt`, the aspect ratio of the ground truth;
nothing else of the annotation. Methods are found by name in `METHODS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.engine.geometry import largest_centered
from cropper_engine.errors import CropperError
from cropper_engine.models.base import Registry
from cropper_engine.types import Box, Ratio

METHODS = Registry("method")


@dataclass
class EvalItem:
    """What a method may see of one example: never its crops or scores."""

    id: str
    image_path: str
    width: int
    height: int
    ratio: Ratio | None
    candidates: list[Box] | None = None  # boxes to rank (GAICD), without their MOS
    mask_path: str | None = None


@dataclass
class Prediction:
    box: Box
    candidate_scores: list[float] | None = None  # one per EvalItem.candidates, higher is better
    pipeline: str = ""
    subject: str | None = None  # with --subject: the source used (face, person, saliency, ...)


class Method:
    """A cropping method for `evaluate`: predict a box per item, in batches."""

    name = "method"

    def predict(self, items: list[EvalItem]) -> list[Prediction]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _rank_by_iou(box: Box, candidates: list[Box] | None) -> list[float] | None:
    """A method without a scorer ranks candidates by closeness to its own crop."""
    if candidates is None:
        return None
    return [box.iou(c) for c in candidates]


class CropperMethod(Method):
    """The whole engine (`Cropper.from_config`): VLM loop or the no-VLM default."""

    name = "cropper"

    def __init__(self, cfg: Any) -> None:
        from cropper_engine.engine.loop import Cropper

        self.engine = Cropper.from_config(cfg)
        self.subject: Any = None  # a --subject spec for every image (replaces the dataset's masks)
        self.keep_faces: bool | None = None

    def predict(self, items: list[EvalItem]) -> list[Prediction | CropperError]:  # type: ignore[override]
        from cropper_engine.types import CropRequest, Task

        reqs = []
        for it in items:
            subj = self.subject
            task = Task.RATIO if it.ratio else Task.SUBJECT if it.mask_path or subj is not None else Task.FREE
            reqs.append(CropRequest(it.image_path, task, [it.ratio] if it.ratio else [],
                                    it.mask_path if subj is None else None, id=it.id, subject=subj,
                                    keep_faces=self.keep_faces))
        outs = self.engine.crop_batch(reqs, exclude_ids=[{it.id} for it in items])
        preds: list[Prediction | CropperError] = []
        for it, out in zip(items, outs, strict=True):
            if isinstance(out, CropperError):
                preds.append(out)
                continue
            res = out[0]
            cand_scores = None
            if it.candidates:
                sc = self.engine.scorer.score([res.loaded.image], [it.candidates])
                cand_scores = [float(v) for v in sc.total[0]]
            preds.append(Prediction(res.box, cand_scores, res.pipeline, res.extra.get("subject")))
        return preds

    def close(self) -> None:
        self.engine.close()


class CenterMethod(Method):
    """The largest centred crop of the requested ratio (the full image without one)."""

    name = "center"

    def predict(self, items: list[EvalItem]) -> list[Prediction]:
        out = []
        for it in items:
            box = largest_centered(it.width, it.height, it.ratio.value if it.ratio else None)
            out.append(Prediction(box, _rank_by_iou(box, it.candidates), "baseline"))
        return out


class FullMethod(Method):
    """The whole image, whatever the ratio."""

    name = "full"

    def predict(self, items: list[EvalItem]) -> list[Prediction]:
        return [Prediction(Box.full(it.width, it.height),
                           _rank_by_iou(Box.full(it.width, it.height), it.candidates), "baseline")
                for it in items]


METHODS.register("center", "largest centred crop (of the ground truth's ratio with --ratio-from-gt)")(
    CenterMethod)
METHODS.register("full", "the whole image")(FullMethod)
METHODS.register("cropper", "the whole engine: the VLM loop, or the no-VLM default without one")(
    CropperMethod)


@dataclass
class EvalReport:
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def ground_truth(example: Example) -> list[Box]:
    """The boxes a prediction is compared against: all crops of the top MOS when scored."""
    if not example.scores:
        return list(example.crops)
    top = max(example.scores)
    return [b for b, s in zip(example.crops, example.scores, strict=True) if s >= top]


def make_item(example: Example, ratio_from_gt: bool, with_candidates: bool) -> EvalItem:
    ratio = None
    if ratio_from_gt:
        gt = example.best_crop()
        ratio = Ratio(gt.width, gt.height)
    cands = list(example.crops) if with_candidates and example.scores else None
    return EvalItem(example.id, example.image_path, example.width, example.height, ratio, cands,
                    example.mask_path)


def evaluate(
    examples: Iterable[Example],
    method: Method,
    *,
    ratio_from_gt: bool = False,
    batch_size: int = 8,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> EvalReport:
    """Predict a crop per example and aggregate IoU / Disp (and ranking metrics when scored)."""
    from cropper_engine.data.metrics import MetricAccumulator, best_gt

    acc = MetricAccumulator()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    batch: list[Example] = []

    def flush() -> None:
        items = [make_item(e, ratio_from_gt, with_candidates=True) for e in batch]
        try:
            preds = method.predict(items)
        except CropperError:
            # a batch failed as a whole (e.g. one unreadable image): retry one by one
            preds = []
            for it in items:
                try:
                    preds.extend(method.predict([it]))
                except CropperError as exc1:
                    preds.append(None)  # type: ignore[arg-type]
                    msg = f"{it.id}: {exc1}"
                    errors.append(msg)
                    if on_error:
                        on_error(msg)
        for ex, it, pred in zip(batch, items, preds, strict=True):
            if isinstance(pred, CropperError):
                msg = f"{it.id}: {pred}"
                errors.append(msg)
                if on_error:
                    on_error(msg)
                continue
            if pred is None:
                continue
            gts = ground_truth(ex)
            acc.add(pred.box, gts, ex.width, ex.height)
            i, d = best_gt(pred.box, gts, ex.width, ex.height)
            row = {"id": ex.id, "box": pred.box.as_int(), "iou": round(i, 5), "disp": round(d, 5),
                   "ratio": str(it.ratio) if it.ratio else None, "pipeline": pred.pipeline}
            if pred.subject:
                row["subject"] = pred.subject
            if ex.scores and pred.candidate_scores is not None:
                acc.add_ranking(pred.candidate_scores, ex.scores)
            rows.append(row)
        if on_progress:
            on_progress(len(batch))
        batch.clear()

    for ex in examples:
        batch.append(ex)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    summary = acc.summary()
    summary["errors"] = len(errors)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["method"] = method.name
    summary["ratio_from_gt"] = ratio_from_gt
    pipelines: dict[str, int] = {}
    for r in rows:
        pipelines[r["pipeline"]] = pipelines.get(r["pipeline"], 0) + 1
    summary["pipelines"] = pipelines
    subjects: dict[str, int] = {}
    for r in rows:
        if r.get("subject"):
            subjects[r["subject"]] = subjects.get(r["subject"], 0) + 1
    if subjects:
        summary["subjects"] = subjects
    return EvalReport(summary, rows, errors)
