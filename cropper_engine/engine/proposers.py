"""Candidate crops without a VLM: a layout grid, saliency boxes, and neighbours' crops.

Generating candidates is separate from scoring them (the scorers do that). Every proposer
returns boxes in pixels inside the image, of the exact ratio when one is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cropper_engine.engine.geometry import box_with_ratio, dedupe, fit_ratio, shift_inside
from cropper_engine.types import Box

FREE_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9)


@dataclass(frozen=True)
class ProposerConfig:
    scales: tuple[float, ...] = (1.0, 0.92, 0.84, 0.76, 0.68, 0.6, 0.5)
    positions: int = 5  # positions per axis over the free slack
    saliency_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    saliency_margins: tuple[float, ...] = (0.05, 0.15)
    dedupe_iou: float = 0.97


def grid_candidates(width: float, height: float, ratio: float | None,
                    cfg: ProposerConfig = ProposerConfig()) -> list[Box]:
    """Boxes of the ratio (or the image's own aspect and common ones) at several scales,
    slid over the image."""
    aspects = [ratio] if ratio else [width / height, *FREE_ASPECTS]
    out: list[Box] = []
    for a in aspects:
        # the largest box of aspect a inside the image
        if width / height > a:
            bw, bh = height * a, float(height)
        else:
            bw, bh = float(width), width / a
        for s in cfg.scales:
            w, h = bw * s, bh * s
            xs = np.linspace(0, width - w, cfg.positions) if width - w > 1 else [0.0]
            ys = np.linspace(0, height - h, cfg.positions) if height - h > 1 else [0.0]
            out.extend(Box(float(x), float(y), float(x) + w, float(y) + h) for x in xs for y in ys)
    return out


def saliency_candidates(saliency: np.ndarray, width: float, height: float, ratio: float | None,
                        cfg: ProposerConfig = ProposerConfig()) -> list[Box]:
    """Boxes around the salient region at a few thresholds and margins."""
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.size == 0 or sal.max() <= 0:
        return []
    sal = sal / sal.max()
    h, w = sal.shape
    out: list[Box] = []
    for t in cfg.saliency_thresholds:
        ys, xs = np.nonzero(sal >= t)
        if len(xs) == 0:
            continue
        core = Box(xs.min() / w * width, ys.min() / h * height,
                   (xs.max() + 1) / w * width, (ys.max() + 1) / h * height)
        for m in cfg.saliency_margins:
            mx, my = m * width, m * height
            b = Box(core.x1 - mx, core.y1 - my, core.x2 + mx, core.y2 + my).clamp(width, height)
            if ratio:
                b = fit_ratio(b, ratio, width, height)
            if b.is_valid():
                out.append(b)
    return out


def transfer_candidates(boxes_unit: Iterable[Sequence[float]], width: float, height: float,
                        ratio: float | None) -> list[Box]:
    """Neighbours' ground-truth crops, in unit coordinates, mapped onto this image."""
    out = []
    for u in boxes_unit:
        b = Box.from_unit(u, width, height).clamp(width, height)
        if not b.is_valid():
            continue
        if ratio:
            b = fit_ratio(b, ratio, width, height)
        out.append(b)
    return out


def mean_box(boxes_unit: Sequence[Sequence[float]], weights: Sequence[float] | None,
             width: float, height: float, ratio: float | None) -> Box | None:
    """The (weighted) mean of neighbours' crops: a strong single candidate."""
    if not len(boxes_unit):
        return None
    arr = np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4)
    w = np.ones(len(arr)) if weights is None else np.clip(np.asarray(weights, dtype=np.float64), 1e-6, None)
    m = (arr * w[:, None]).sum(0) / w.sum()
    b = Box.from_unit(m, width, height).clamp(width, height)
    if not b.is_valid():
        return None
    if ratio:
        cx, cy = b.center
        b = fit_ratio(box_with_ratio(cx, cy, b.area, ratio), ratio, width, height)
    return shift_inside(b, width, height)


def propose(width: float, height: float, ratio: float | None, saliency: np.ndarray | None,
            neighbour_boxes_unit: Sequence[Sequence[float]] = (),
            neighbour_weights: Sequence[float] | None = None,
            cfg: ProposerConfig = ProposerConfig()) -> list[tuple[Box, str]]:
    """All non-VLM candidates, tagged with their source, near-duplicates removed."""
    tagged: list[tuple[Box, str]] = []
    mb = mean_box(neighbour_boxes_unit, neighbour_weights, width, height, ratio)
    if mb is not None:
        tagged.append((mb, "neighbours-mean"))
    tagged += [(b, "neighbour") for b in transfer_candidates(neighbour_boxes_unit, width, height, ratio)]
    if saliency is not None:
        tagged += [(b, "saliency") for b in saliency_candidates(saliency, width, height, ratio, cfg)]
    tagged += [(b, "grid") for b in grid_candidates(width, height, ratio, cfg)]
    keep = dedupe([b for b, _ in tagged], cfg.dedupe_iou)
    return [tagged[i] for i in keep]


# --- the default pipeline's candidates (unit coordinates, scored by the fitted model) ---------

RATIO_SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
RATIO_STEP = 0.05  # position step along an axis with room to slide (unit of the image side)
RATIO_MAX_POSITIONS = 9
FREE_MARGINS = (0.0, 0.06, 0.13, 0.2, 0.3)  # each side's cut, unit of the image side
FREE_MIN_SIDE = 0.3


def _positions(slack: float) -> np.ndarray:
    if slack <= 1e-6:
        return np.zeros(1)
    n = min(RATIO_MAX_POSITIONS, 1 + int(np.ceil(slack / RATIO_STEP - 1e-9)))
    return np.linspace(0.0, slack, n)


def ratio_grid_unit(image_aspect: float, ratio: float, scales: Sequence[float] = RATIO_SCALES) -> np.ndarray:
    """Boxes of the exact ratio (W/H in pixels) at several scales of the largest one, slid over
    the image; unit coordinates [N, 4]."""
    r = ratio / image_aspect
    bw, bh = (1.0, 1.0 / r) if r > 1.0 else (r, 1.0)
    out = []
    for s in scales:
        w, h = bw * s, bh * s
        for x in _positions(1.0 - w):
            for y in _positions(1.0 - h):
                out.append((x, y, x + w, y + h))
    return np.asarray(out, dtype=np.float64)


def free_grid_unit(margins: Sequence[float] = FREE_MARGINS, min_side: float = FREE_MIN_SIDE) -> np.ndarray:
    """Boxes cut by a grid of margins on each side (free-form: any aspect); unit coordinates."""
    m = np.asarray(margins, dtype=np.float64)
    ll, rr, tt, bb = np.meshgrid(m, m, m, m, indexing="ij")
    b = np.stack([ll.ravel(), tt.ravel(), 1 - rr.ravel(), 1 - bb.ravel()], axis=1)
    keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
    return b[keep]


def default_candidates(image_aspect: float, ratio: float | None, neighbour_boxes_unit: np.ndarray,
                       n_transfer: int = 10) -> tuple[np.ndarray, list[str]]:
    """The default pipeline's candidates: a dense grid (of the ratio, or of margins) plus the
    neighbours' median crop and their own crops; unit coordinates [N, 4] and sources."""
    from cropper_engine.engine.features import fit_ratio_unit

    grid = ratio_grid_unit(image_aspect, ratio) if ratio else free_grid_unit()
    extra = []
    nb = np.asarray(neighbour_boxes_unit, dtype=np.float64).reshape(-1, 4)
    if len(nb):
        extra = [np.median(nb, axis=0)[None], nb[:n_transfer]]
    boxes = [grid]
    sources = ["grid"] * len(grid)
    if extra:
        e = np.clip(np.concatenate(extra), 0.0, 1.0)
        if ratio:
            e = fit_ratio_unit(e, ratio, image_aspect)
        boxes.append(e)
        sources += ["neighbours-median"] + ["neighbour"] * (len(e) - 1)
    return np.concatenate(boxes), sources
