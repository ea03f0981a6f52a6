"""Box geometry: aspect-ratio fitting, IoU matrices, duplicate suppression.

All boxes are in pixels of an image of size (width, height).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cropper_engine.types import (  # noqa: F401  (the whole-pixel ratio rules live beside Box)
    RATIO_TOLERANCE,
    Box,
    ratio_error,
    ratio_note,
    whole_pixel_box,
    whole_pixel_size,
)


def largest_centered(width: float, height: float, ratio: float | None = None) -> Box:
    """The largest box of aspect `ratio` (W/H) centred in the image; the full image if None."""
    if ratio is None:
        return Box.full(width, height)
    if width / height > ratio:
        w, h = height * ratio, float(height)
    else:
        w, h = float(width), width / ratio
    x1, y1 = (width - w) / 2, (height - h) / 2
    return Box(x1, y1, x1 + w, y1 + h)


def box_with_ratio(cx: float, cy: float, area: float, ratio: float) -> Box:
    """A box of aspect `ratio` and `area`, centred at (cx, cy) (not clamped)."""
    w = math.sqrt(area * ratio)
    h = w / ratio
    return Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def shift_inside(box: Box, width: float, height: float) -> Box:
    """Translate a box (no resize) so it lies inside the image where it fits."""
    dx = 0.0
    if box.x1 < 0:
        dx = -box.x1
    elif box.x2 > width:
        dx = width - box.x2
    dy = 0.0
    if box.y1 < 0:
        dy = -box.y1
    elif box.y2 > height:
        dy = height - box.y2
    return Box(box.x1 + dx, box.y1 + dy, box.x2 + dx, box.y2 + dy)


def fit_ratio(box: Box, ratio: float, width: float, height: float) -> Box:
    """The box of exact aspect `ratio` nearest `box`: same centre and area where possible,
    shrunk to fit the image and shifted inside it."""
    cx, cy = box.center
    area = max(box.area, 1.0)
    out = box_with_ratio(cx, cy, area, ratio)
    # shrink (keeping the ratio) until it fits the image
    s = min(1.0, width / out.width, height / out.height)
    if s < 1.0:
        out = box_with_ratio(cx, cy, out.area * s * s, ratio)
    out = shift_inside(out, width, height)
    # guard against float drift past the border
    return Box(max(out.x1, 0.0), max(out.y1, 0.0), min(out.x2, float(width)), min(out.y2, float(height)))


def fit_ratio_array(boxes: np.ndarray, ratio: float, width: float, height: float) -> np.ndarray:
    """`fit_ratio` of many boxes [N, 4] (corners ordered) at once: the same arithmetic in the same
    order, so each row equals the scalar result bit for bit (tests/test_constrain_many.py)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    area = np.maximum(np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1), 1.0)

    def with_ratio(a: np.ndarray) -> tuple[np.ndarray, ...]:  # box_with_ratio
        w = np.sqrt(a * ratio)
        h = w / ratio
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    ox1, oy1, ox2, oy2 = with_ratio(area)
    ow, oh = ox2 - ox1, oy2 - oy1
    s = np.minimum(np.minimum(1.0, width / ow), height / oh)
    shrink = s < 1.0
    if shrink.any():
        sx1, sy1, sx2, sy2 = with_ratio(np.maximum(0.0, ow) * np.maximum(0.0, oh) * s * s)
        ox1, oy1 = np.where(shrink, sx1, ox1), np.where(shrink, sy1, oy1)
        ox2, oy2 = np.where(shrink, sx2, ox2), np.where(shrink, sy2, oy2)
    dx = np.where(ox1 < 0, -ox1, np.where(ox2 > width, width - ox2, 0.0))  # shift_inside
    dy = np.where(oy1 < 0, -oy1, np.where(oy2 > height, height - oy2, 0.0))
    ox1, ox2, oy1, oy2 = ox1 + dx, ox2 + dx, oy1 + dy, oy2 + dy
    return np.stack([np.maximum(ox1, 0.0), np.maximum(oy1, 0.0),
                     np.minimum(ox2, float(width)), np.minimum(oy2, float(height))], axis=1)


def expand_to_contain(box: Box, inner: Box, width: float, height: float, ratio: float | None = None) -> Box:
    """Grow `box` as little as needed to contain `inner`, keeping `ratio` when given.

    With a ratio, the result is the union of both grown to the ratio, shrunk to fit the image
    and slid so it still holds `inner`; when `inner` cannot fit at that ratio at all, it is
    the largest box of the ratio centred on `inner` as far as the image allows.
    """
    union = Box(min(box.x1, inner.x1), min(box.y1, inner.y1), max(box.x2, inner.x2), max(box.y2, inner.y2))
    if ratio is None:
        return union.clamp(width, height)
    min_w = max(inner.width, inner.height * ratio)
    max_w = min(float(width), height * ratio)
    want_w = max(union.width, union.height * ratio)
    w = max_w if min_w > max_w else min(max(want_w, min_w), max_w)
    h = w / ratio
    cx, cy = union.center if min_w <= max_w else inner.center

    def place(c: float, size: float, lo: float, hi: float, limit: float) -> float:
        start = c - size / 2
        if size >= hi - lo:  # it can hold the inner span: keep the span inside
            start = min(max(start, hi - size), lo)
        return min(max(start, 0.0), limit - size)

    x1 = place(cx, w, inner.x1, inner.x2, float(width))
    y1 = place(cy, h, inner.y1, inner.y2, float(height))
    return Box(x1, y1, min(x1 + w, float(width)), min(y1 + h, float(height)))


def expand_to_contain_array(boxes: np.ndarray, inner: Box, width: float, height: float,
                            ratio: float | None = None) -> np.ndarray:
    """`expand_to_contain` of many boxes [N, 4] (corners ordered) around one `inner` box: the same
    arithmetic in the same order, each row equal to the scalar result bit for bit."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ux1, uy1 = np.minimum(b[:, 0], inner.x1), np.minimum(b[:, 1], inner.y1)
    ux2, uy2 = np.maximum(b[:, 2], inner.x2), np.maximum(b[:, 3], inner.y2)
    if ratio is None:  # Box.clamp of the union
        return np.stack([np.minimum(np.maximum(ux1, 0.0), width), np.minimum(np.maximum(uy1, 0.0), height),
                         np.minimum(np.maximum(ux2, 0.0), width), np.minimum(np.maximum(uy2, 0.0), height)], 1)
    min_w = max(inner.width, inner.height * ratio)
    max_w = min(float(width), height * ratio)
    want_w = np.maximum(ux2 - ux1, (uy2 - uy1) * ratio)
    w = np.full(len(b), max_w) if min_w > max_w else np.minimum(np.maximum(want_w, min_w), max_w)
    h = w / ratio
    if min_w <= max_w:
        cx, cy = (ux1 + ux2) / 2, (uy1 + uy2) / 2
    else:
        cx, cy = np.full(len(b), (inner.x1 + inner.x2) / 2), np.full(len(b), (inner.y1 + inner.y2) / 2)

    def place(c: np.ndarray, size: np.ndarray, lo: float, hi: float, limit: float) -> np.ndarray:
        start = c - size / 2
        start = np.where(size >= hi - lo, np.minimum(np.maximum(start, hi - size), lo), start)
        return np.minimum(np.maximum(start, 0.0), limit - size)

    x1 = place(cx, w, inner.x1, inner.x2, float(width))
    y1 = place(cy, h, inner.y1, inner.y2, float(height))
    return np.stack([x1, y1, np.minimum(x1 + w, float(width)), np.minimum(y1 + h, float(height))], 1)


def boxes_array(boxes: Sequence[Box]) -> np.ndarray:
    return np.array([b.as_list() for b in boxes], dtype=np.float64).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every row of a [N,4] and b [M,4] (xyxy) -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: Sequence[Box], scores: Sequence[float], iou_threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first."""
    if not boxes:
        return []
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    ious = iou_matrix(boxes_array(boxes), boxes_array(boxes))
    keep: list[int] = []
    for i in order:
        if all(ious[i, j] < iou_threshold for j in keep):
            keep.append(i)
    return keep


def dedupe(boxes: Sequence[Box], iou_threshold: float = 0.9) -> list[int]:
    """Indices of boxes kept in their given order, dropping near-duplicates of earlier ones."""
    keep: list[int] = []
    if not boxes:
        return keep
    ious = iou_matrix(boxes_array(boxes), boxes_array(boxes))
    for i in range(len(boxes)):
        if all(ious[i, j] < iou_threshold for j in keep):
            keep.append(i)
    return keep


def mask_bbox(mask: np.ndarray) -> Box:
    """The tight box (pixels, half-open) around the true pixels of an H x W mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask")
    return Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def mask_center(mask: np.ndarray) -> tuple[float, float]:
    """The centroid (x, y) in pixels of the true pixels of a mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask")
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
