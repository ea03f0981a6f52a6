"""Cropping metrics, as the datasets' reference code computes them.

- IoU / Disp (FCDB, SACD): Disp = (|x1-x1'|/W + |x2-x2'|/W + |y1-y1'|/H + |y2-y2'|/H) / 4 with
  W, H the original image size; with several ground-truth boxes the one of highest IoU is used
  (and the Disp to that same box). Alpha-recall: share of images with IoU >= alpha (0.75).
- GAICD ranking: Acc_{K/N} = (1/K) * #{j <= K : MOS of the j-th crop ranked by predicted score
  >= the N-th highest MOS} (ties in MOS count as hits; ties in predicted score keep the
  candidates' given order). Acc5 / Acc10 are the means over K = 1..4. SRCC / PCC are Spearman /
  Pearson correlations between predicted scores and MOS over one image's candidates; a constant
  input (no ranking information) gives 0.0 instead of NaN.

All values are fractions in 0..1; a CLI may print them x100.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from cropper_engine.errors import InputError
from cropper_engine.types import Box

# IoU is a ratio of float areas: 0.75 may come out as 0.7499999999999999.
_EPS = 1e-9
KS = (1, 2, 3, 4)
NS = (5, 10)


def iou(pred: Box, gt: Box) -> float:
    """Intersection over union of two boxes (0.0 when the union is empty)."""
    return pred.iou(gt)


def disp(pred: Box, gt: Box, width: float, height: float) -> float:
    """Boundary displacement: the mean of the four edge offsets, each divided by W or H."""
    if not (width > 0 and height > 0):
        raise InputError(f"disp needs a positive image size, got {width}x{height}")
    return (abs(pred.x1 - gt.x1) / width + abs(pred.x2 - gt.x2) / width
            + abs(pred.y1 - gt.y1) / height + abs(pred.y2 - gt.y2) / height) / 4.0


def best_gt(pred: Box, gts: Box | Sequence[Box], width: float, height: float) -> tuple[float, float]:
    """(IoU, Disp) against the ground-truth box of highest IoU (the first one on ties)."""
    boxes = [gts] if isinstance(gts, Box) else list(gts)
    if not boxes:
        raise InputError("best_gt needs at least one ground-truth box")
    ious = [iou(pred, g) for g in boxes]
    i = int(np.argmax(ious))
    return ious[i], disp(pred, boxes[i], width, height)


def alpha_recall(ious: Iterable[float], alpha: float = 0.75) -> float:
    """Share of IoUs >= alpha (0.0 for no IoUs)."""
    vals = [float(v) for v in ious]
    if not vals:
        return 0.0
    return sum(v >= alpha - _EPS for v in vals) / len(vals)


def _pair(pred_scores: Sequence[float], mos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    m = np.asarray(mos, dtype=np.float64).reshape(-1)
    if p.shape != m.shape:
        raise InputError(f"{p.size} predicted scores for {m.size} MOS values; they must pair up")
    if p.size == 0:
        raise InputError("no candidates to rank")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise InputError("predicted scores and MOS must be finite numbers")
    return p, m


def acc_k_n(pred_scores: Sequence[float], mos: Sequence[float], k: int, n: int) -> float:
    """GAICD Acc_{K/N} for one image.

    Candidates are ranked by predicted score, highest first (a stable sort: equal scores keep
    their given order). A hit is a top-K crop whose MOS is >= the N-th highest MOS (so MOS ties
    at the threshold count). With fewer than N candidates the threshold is the lowest MOS;
    with fewer than K, K is the number of candidates.
    """
    if k < 1 or n < 1:
        raise InputError(f"Acc_K/N needs K >= 1 and N >= 1, got K={k}, N={n}")
    p, m = _pair(pred_scores, mos)
    order = np.argsort(-p, kind="stable")
    threshold = np.sort(m)[::-1][min(n, m.size) - 1]
    kk = min(k, m.size)
    hits = int(np.sum(m[order[:kk]] >= threshold))
    return hits / kk


def srcc(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy); 0.0 for constant input or fewer than 2 values."""
    x, y = _pair(a, b)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = float(spearmanr(x, y).statistic)
    return r if math.isfinite(r) else 0.0


def pcc(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson's linear correlation; 0.0 for constant input or fewer than 2 values."""
    x, y = _pair(a, b)
    if x.size < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(dx @ dy) / den))


def ranking_metrics(pred_scores: Sequence[float], mos: Sequence[float]) -> dict[str, float]:
    """acc1_5..acc4_5, acc1_10..acc4_10, acc5, acc10, srcc and pcc for one image."""
    out: dict[str, float] = {}
    for n in NS:
        for k in KS:
            out[f"acc{k}_{n}"] = acc_k_n(pred_scores, mos, k, n)
    for n in NS:
        out[f"acc{n}"] = sum(out[f"acc{k}_{n}"] for k in KS) / len(KS)
    out["srcc"] = srcc(pred_scores, mos)
    out["pcc"] = pcc(pred_scores, mos)
    return out


RANKING_KEYS = tuple([f"acc{k}_{n}" for n in NS for k in KS] + ["acc5", "acc10", "srcc", "pcc"])


class MetricAccumulator:
    """Collects per-image metrics and averages them over images.

    `add` scores one predicted box against one or more ground-truth boxes; `add_ranking` scores
    one image's candidate ranking. `summary()` gives n, iou, disp, alpha_recall (NaN for the
    three means when no box was added) and, once a ranking was added, n_ranked and the means of
    `ranking_metrics`. The per-image values stay in `ious`, `disps` and `rankings`.
    """

    def __init__(self, alpha: float = 0.75) -> None:
        self.alpha = alpha
        self.ids: list[str | None] = []
        self.ious: list[float] = []
        self.disps: list[float] = []
        self.rankings: list[dict[str, float]] = []

    def add(self, pred_box: Box, gt_boxes: Box | Sequence[Box], width: float, height: float,
            id: str | None = None) -> tuple[float, float]:
        """Add one image; return its (IoU, Disp) against the best-matching ground truth."""
        i, d = best_gt(pred_box, gt_boxes, width, height)
        self.ids.append(id)
        self.ious.append(i)
        self.disps.append(d)
        return i, d

    def add_ranking(self, pred_scores: Sequence[float], mos: Sequence[float]) -> dict[str, float]:
        """Add one image's candidate ranking; return its metrics."""
        r = ranking_metrics(pred_scores, mos)
        self.rankings.append(r)
        return r

    def __len__(self) -> int:
        return len(self.ious)

    def summary(self) -> dict[str, float | int]:
        n = len(self.ious)
        out: dict[str, float | int] = {
            "n": n,
            "iou": float(np.mean(self.ious)) if n else math.nan,
            "disp": float(np.mean(self.disps)) if n else math.nan,
            "alpha_recall": alpha_recall(self.ious, self.alpha) if n else math.nan,
        }
        if self.rankings:
            out["n_ranked"] = len(self.rankings)
            for key in RANKING_KEYS:
                out[key] = float(np.mean([r[key] for r in self.rankings]))
        return out


__all__ = [
    "RANKING_KEYS",
    "MetricAccumulator",
    "acc_k_n",
    "alpha_recall",
    "best_gt",
    "disp",
    "iou",
    "pcc",
    "ranking_metrics",
    "srcc",
]
