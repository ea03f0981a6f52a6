"""Which ground-truth crops of a retrieved example to show, per task (the paper's G).

- free-form: highest MOS first (unscored examples keep their crops' given order);
- subject-aware: G = -L2 distance between the query mask's centre and the example mask's
  centre, both in unit (0..1) image coordinates; ties (every crop of an example that has one
  mask) by MOS. An example may carry one subject box per crop in `extra["mask_boxes"]`
  (pixels, x1 y1 x2 y2, aligned with `crops`): `index build` writes them for examples whose
  dataset has no mask (the automatic subject inside each crop, index/subjects.py), so each crop
  has its own centre and the order follows the query's subject; otherwise (a mask file, or a
  box from the dataset) its `mask_box` applies to all its crops and MOS decides. Crops without
  any subject box come last.
  `mask_center_distance` gives the same distance per example, so retrieval can re-rank by it;
- aspect-ratio-aware: the crops whose aspect ratio is nearest the target, compared as
  |log(w/h) - log(target)| to a hundredth (the prompt writes ratios to 2 decimals), ties by MOS.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import InputError
from cropper_engine.types import Box, Ratio, Task

_TIE = 1e-9  # keys closer than this count as equal, so MOS decides


def _unit_center(box: Box, example: Example) -> tuple[float, float]:
    cx, cy = box.center
    return (cx / example.width, cy / example.height)


def crop_subject_boxes(example: Example) -> list[Box | None]:
    """The subject box of each crop (pixels): per-crop boxes from extra["mask_boxes"] (written
    by index build for examples without a mask: index/subjects.py), else `mask_box` (given by
    the dataset, or derived from its mask file at index build)."""
    per_crop = example.extra.get("mask_boxes") if example.extra else None
    if isinstance(per_crop, list) and len(per_crop) == len(example.crops):
        return [Box(*map(float, b)) if b is not None else None for b in per_crop]
    return [example.mask_box] * len(example.crops)


def _distance(center: tuple[float, float], other: tuple[float, float]) -> float:
    return math.hypot(center[0] - other[0], center[1] - other[1])


def mask_center(mask: Any) -> tuple[float, float]:
    """The centre of a boolean mask's bounding box, in unit coordinates (x / W, y / H)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise InputError("a subject mask must be a non-empty 2-D boolean array")
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    return ((xs[0] + xs[-1] + 1) / 2 / w, (ys[0] + ys[-1] + 1) / 2 / h)


def mask_center_distance(example: Example, mask_center_unit: tuple[float, float]) -> float | None:
    """L2 distance (unit coordinates) from the query mask's centre to the example's nearest
    subject centre; None when the example has no subject mask."""
    boxes = [b for b in {*crop_subject_boxes(example), example.mask_box} if b is not None]
    if not boxes:
        return None
    return min(_distance(mask_center_unit, _unit_center(b, example)) for b in boxes)


def _scores(example: Example) -> list[float | None]:
    if example.scores is not None and len(example.scores) == len(example.crops):
        return [float(s) for s in example.scores]
    return [None] * len(example.crops)


def select_crops(example: Example, task: Task | str, t: int, *, ratio: Ratio | None = None,
                 mask_center_unit: tuple[float, float] | None = None) -> list[tuple[Box, float | None]]:
    """Up to `t` (box, MOS or None) pairs of the example's ground-truth crops, best first."""
    scores = _scores(example)
    return [(example.crops[i], scores[i])
            for i in select_indices(example, task, t, ratio=ratio, mask_center_unit=mask_center_unit)]


def select_indices(example: Example, task: Task | str, t: int, *, ratio: Ratio | None = None,
                   mask_center_unit: tuple[float, float] | None = None) -> list[int]:
    """The indices (into `example.crops`) of `select_crops`' choice, best first."""
    task = Task.parse(task)
    if t < 1:
        raise InputError(f"the number of crops per example must be at least 1, got {t}")
    scores = _scores(example)
    # MOS descending; unscored crops keep their order (and come after scored ones)
    def mos_key(i: int) -> tuple[float, int]:
        s = scores[i]
        return (-s if s is not None else math.inf, i)

    order = list(range(len(example.crops)))
    if task is Task.FREE:
        order.sort(key=mos_key)
    elif task is Task.SUBJECT:
        if mask_center_unit is None:
            raise InputError("subject-aware crop selection needs the query mask's centre (mask_center_unit)")
        masks = crop_subject_boxes(example)

        def subject_key(i: int) -> tuple[float, float, int]:
            box = masks[i]
            d = _distance(mask_center_unit, _unit_center(box, example)) if box is not None else math.inf
            return (_quantise(d), *mos_key(i))

        order.sort(key=subject_key)
    elif task is Task.RATIO:
        if ratio is None:
            raise InputError("aspect-ratio-aware crop selection needs the target ratio, e.g. 4:3")
        target = math.log(Ratio.parse(ratio).value)

        def ratio_key(i: int) -> tuple[float, float, int]:
            box = example.crops[i]
            d = abs(math.log(box.aspect) - target) if box.is_valid() else math.inf
            # distances within a hundredth (the prompt writes ratios to 2 decimals) are a tie, which MOS breaks
            return (d if math.isinf(d) else round(d, 2), *mos_key(i))

        order.sort(key=ratio_key)
    return order[:t]


def _quantise(d: float) -> float:
    return d if math.isinf(d) else round(d / _TIE) * _TIE


__all__ = ["crop_subject_boxes", "mask_center", "mask_center_distance", "select_crops", "select_indices"]
