"""Classical composition features of candidate crops, computed in bulk from a saliency map.

For one image: a saliency map (spectral residual, no weights) turned into a summed-area
table, so the saliency inside, on the border of, and around any number of boxes costs a
few array lookups. Features are what a composition scorer needs; `FEATURE_NAMES` orders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURE_NAMES = (
    "area",  # crop area / image area
    "mass",  # share of the image's saliency inside the crop
    "density",  # mass / area
    "border",  # mean saliency on the crop's border band, relative to the image mean
    "outside_peak",  # strongest saliency cell left outside the crop, relative to the max
    "com_dx",  # saliency centroid inside the crop, offset from the crop centre (unit of width)
    "com_dy",
    "center_dx",  # crop centre offset from the image centre (unit of image width)
    "center_dy",
    "log_aspect_change",  # |log(crop aspect / image aspect)|
    "edge_touch",  # how many image edges the crop keeps (0..4) / 4
)


@dataclass
class SaliencyTable:
    """A saliency map (h x w, sums to 1) with summed-area tables for fast box sums."""

    sal: np.ndarray
    sat: np.ndarray  # (h+1, w+1) cumulative sums of sal
    sat_x: np.ndarray  # of sal * x (cell centres in 0..1)
    sat_y: np.ndarray
    peak: float

    @classmethod
    def from_map(cls, sal: np.ndarray) -> SaliencyTable:
        s = np.asarray(sal, dtype=np.float64)
        s = np.clip(s, 0, None)
        total = s.sum()
        s = s / total if total > 0 else np.full_like(s, 1.0 / s.size)
        h, w = s.shape
        xs = (np.arange(w) + 0.5) / w
        ys = (np.arange(h) + 0.5) / h

        def sat(a: np.ndarray) -> np.ndarray:
            out = np.zeros((h + 1, w + 1))
            out[1:, 1:] = a.cumsum(0).cumsum(1)
            return out

        return cls(s, sat(s), sat(s * xs[None, :]), sat(s * ys[:, None]), float(s.max()))

    def box_sums(self, table: np.ndarray, boxes_unit: np.ndarray) -> np.ndarray:
        """Sums of `table`'s map over boxes in unit coords [N, 4], with bilinear edges."""
        h, w = self.sal.shape
        b = np.clip(boxes_unit, 0.0, 1.0)

        def at(xf: np.ndarray, yf: np.ndarray) -> np.ndarray:
            # bilinear interpolation of the summed-area table at fractional cells
            x = xf * w
            y = yf * h
            x0 = np.clip(np.floor(x).astype(int), 0, w - 1)
            y0 = np.clip(np.floor(y).astype(int), 0, h - 1)
            tx, ty = x - x0, y - y0
            a = table[y0, x0] * (1 - tx) * (1 - ty) + table[y0, x0 + 1] * tx * (1 - ty)
            return a + table[y0 + 1, x0] * (1 - tx) * ty + table[y0 + 1, x0 + 1] * tx * ty

        return at(b[:, 2], b[:, 3]) - at(b[:, 0], b[:, 3]) - at(b[:, 2], b[:, 1]) + at(b[:, 0], b[:, 1])


def box_features(table: SaliencyTable, boxes_unit: np.ndarray, image_aspect: float) -> np.ndarray:
    """[N, len(FEATURE_NAMES)] features for boxes in unit coordinates (x1, y1, x2, y2)."""
    b = np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    w = np.clip(b[:, 2] - b[:, 0], 1e-6, None)
    h = np.clip(b[:, 3] - b[:, 1], 1e-6, None)
    area = w * h
    mass = table.box_sums(table.sat, b)
    density = mass / area
    mx = table.box_sums(table.sat_x, b)
    my = table.box_sums(table.sat_y, b)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    safe = np.maximum(mass, 1e-12)
    com_dx = np.where(mass > 1e-9, (mx / safe - cx) / w, 0.0)
    com_dy = np.where(mass > 1e-9, (my / safe - cy) / h, 0.0)
    # border band: 6% of the crop's size on each side, inside the crop
    bw, bh = 0.06 * w, 0.06 * h
    inner = np.stack([b[:, 0] + bw, b[:, 1] + bh, b[:, 2] - bw, b[:, 3] - bh], axis=1)
    inner_mass = table.box_sums(table.sat, inner)
    band_area = np.clip(area - (w - 2 * bw) * (h - 2 * bh), 1e-6, None)
    border = (mass - inner_mass) / band_area  # mean density on the band (image mean = 1)
    # strongest outside cell: coarse, from the 16x16 pooled map
    outside_peak = _outside_peak(table, b)
    aspect = (w * image_aspect) / h
    log_aspect_change = np.abs(np.log(aspect / image_aspect))
    edges = ((b[:, 0] <= 0.005).astype(float) + (b[:, 1] <= 0.005) + (b[:, 2] >= 0.995)
             + (b[:, 3] >= 0.995)) / 4
    return np.stack([area, mass, density, border, outside_peak, com_dx, com_dy, cx - 0.5, cy - 0.5,
                     log_aspect_change, edges], axis=1)


def _outside_peak(table: SaliencyTable, b: np.ndarray, grid: int = 16) -> np.ndarray:
    h, w = table.sal.shape
    gy, gx = max(1, h // grid), max(1, w // grid)
    pooled = table.sal[: h // gy * gy, : w // gx * gx].reshape(h // gy, gy, w // gx, gx).mean((1, 3))
    ph, pw = pooled.shape
    centres_x = (np.arange(pw) + 0.5) / pw
    centres_y = (np.arange(ph) + 0.5) / ph
    inside_x = (centres_x[None, :] >= b[:, 0:1]) & (centres_x[None, :] <= b[:, 2:3])  # [N, pw]
    inside_y = (centres_y[None, :] >= b[:, 1:2]) & (centres_y[None, :] <= b[:, 3:4])  # [N, ph]
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    peak = pooled.max() if pooled.size else 1.0
    out = np.where(inside, 0.0, pooled[None]).reshape(len(b), -1).max(axis=1)
    return out / max(peak, 1e-12)


# --- features of the default (learned) scorer ------------------------------------------------
#
# One row per candidate crop, from the image analysis (engine/analysis.py), the candidate's
# geometry, the requested ratio and the crops of the retrieved neighbours. The fitted model
# (models/default_model.py) names the version it was fitted on; change any feature: bump it.

CROP_FEATURES_VERSION = 1
EMPTY = -1.0  # the value of a strip / edge feature that does not exist (a crop edge on the image edge)
NEIGHBOURS_K = 30  # neighbours whose crops the features look at
_EDGE = 0.005  # an edge within this of the image edge keeps the whole side
_LINE = 0.01  # half-width of the band along a crop edge (unit of the image)
_BAND = 0.05  # width of the inner border band (unit of the crop)


@dataclass
class NeighbourCrops:
    """Retrieved neighbours' crops in unit coordinates (most similar first) and similarities."""

    boxes_unit: np.ndarray  # [K, 4]
    similarity: np.ndarray  # [K]

    @classmethod
    def empty(cls) -> NeighbourCrops:
        return cls(np.zeros((0, 4)), np.zeros(0))

    def top(self, k: int = NEIGHBOURS_K) -> NeighbourCrops:
        return NeighbourCrops(self.boxes_unit[:k], self.similarity[:k])


def _iou_unit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    ua = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    ub = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(ua + ub - inter, 1e-9)


def fit_ratio_unit(boxes_unit: np.ndarray, ratio: float, image_aspect: float) -> np.ndarray:
    """Vectorised geometry.fit_ratio in unit coordinates: same centre and area, the exact ratio
    (W/H in pixels), shrunk to fit and shifted inside the image."""
    b = np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)  # unit area = px area / (W H)
    r = ratio / image_aspect  # the ratio in unit coordinates
    w = np.sqrt(area * r)
    h = w / r
    s = np.minimum(1.0, np.minimum(1.0 / w, 1.0 / h))
    w, h = w * s, h * s
    x1 = np.clip(cx - w / 2, 0.0, 1.0 - w)
    y1 = np.clip(cy - h / 2, 0.0, 1.0 - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def neighbour_summary(nb: NeighbourCrops, ratio: float | None, image_aspect: float) -> dict[str, np.ndarray]:
    """Per-image summaries of the neighbours' crops: their median box (raw and fitted to the ratio)."""
    if len(nb.boxes_unit) == 0:
        med = np.array([0.05, 0.06, 0.95, 0.94])  # ~ FCDB's median crop: the features stay defined
        boxes = med[None]
    else:
        boxes = nb.boxes_unit
        med = np.median(boxes, axis=0)
    out = {"median": med, "boxes": boxes}
    if ratio:
        fitted = fit_ratio_unit(boxes, ratio, image_aspect)
        out["fitted"] = fitted
        out["median_fitted"] = fit_ratio_unit(np.median(fitted, axis=0)[None], ratio, image_aspect)[0]
    return out


def _map_features(an: Any, b: np.ndarray, out: dict[str, np.ndarray]) -> None:
    from cropper_engine.engine.analysis import BoxLookup

    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    w, h = x2 - x1, y2 - y1
    area = w * h
    n = len(b)
    zeros, ones = np.zeros_like(x1), np.ones_like(x1)
    strips = {
        "L": np.stack([zeros, zeros, x1, ones], 1),
        "R": np.stack([x2, zeros, ones, ones], 1),
        "T": np.stack([zeros, zeros, ones, y1], 1),
        "B": np.stack([zeros, y2, ones, ones], 1),
    }
    has = {"L": x1 > _EDGE, "R": x2 < 1 - _EDGE, "T": y1 > _EDGE, "B": y2 < 1 - _EDGE}
    lines = {
        "L": np.stack([x1 - _LINE, y1, x1 + _LINE, y2], 1),
        "R": np.stack([x2 - _LINE, y1, x2 + _LINE, y2], 1),
        "T": np.stack([x1, y1 - _LINE, x2, y1 + _LINE], 1),
        "B": np.stack([x1, y2 - _LINE, x2, y2 + _LINE], 1),
    }
    inner = np.stack([x1 + _BAND * w, y1 + _BAND * h, x2 - _BAND * w, y2 - _BAND * h], 1)
    # every box any map is read over, in one array: the crop, its inner band, 4 strips, 4 lines
    parts = [b, inner, *(strips[s] for s in "LRTB"), *(lines[s] for s in "LRTB")]
    every = np.clip(np.concatenate(parts), 0.0, 1.0)
    areas = (every[:, 2] - every[:, 0]) * (every[:, 3] - every[:, 1])
    lookups: dict[tuple[int, int], BoxLookup] = {}
    full = np.array([[0.0, 0.0, 1.0, 1.0]])

    def part(v: np.ndarray, k: int) -> np.ndarray:
        return v[k * n:(k + 1) * n]

    def density(mass: np.ndarray, k: int) -> np.ndarray:  # MapTable.density of part k
        a = part(areas, k)
        return np.where(a > 1e-4, part(mass, k) / np.maximum(a, 1e-4), EMPTY)

    for name, t in an.tables.items():
        look = lookups.get((t.h, t.w))
        if look is None:
            look = lookups[(t.h, t.w)] = BoxLookup(every, t.h, t.w)
        masses = look.mass(t.sat)
        mass = part(masses, 0)
        out[f"{name}_in"] = mass / np.maximum(area, 1e-6)
        if t.sat_x is not None and t.sat_y is not None:  # the map's centroid in the crop, from its centre
            safe = np.maximum(mass, 1e-9)
            mx, my = part(look.mass(t.sat_x), 0), part(look.mass(t.sat_y), 0)
            out[f"{name}_comx"] = np.where(mass > 1e-6, (mx / safe - (x1 + x2) / 2) / w, 0.0)
            out[f"{name}_comy"] = np.where(mass > 1e-6, (my / safe - (y1 + y2) / 2) / h, 0.0)
            gx, gy = float(t.mass(full, t.sat_x)[0]), float(t.mass(full, t.sat_y)[0])  # the image's centroid
            out[f"{name}_gcx"] = zeros + gx - 0.5
            out[f"{name}_gcy"] = zeros + gy - 0.5
            out[f"{name}_dgx"] = (x1 + x2) / 2 - gx
            out[f"{name}_dgy"] = (y1 + y2) / 2 - gy
        out[f"{name}_out"] = np.where(area < 0.999, (1 - mass) / np.maximum(1 - area, 1e-3), EMPTY)
        band_area = np.maximum(area - (w * (1 - 2 * _BAND)) * (h * (1 - 2 * _BAND)), 1e-6)
        out[f"{name}_band"] = (mass - part(masses, 1)) / band_area
        strip_max = np.full_like(x1, EMPTY)
        line_max = np.full_like(x1, EMPTY)
        for k, side in enumerate("LRTB"):
            s = np.where(has[side], density(masses, 2 + k), EMPTY)
            out[f"{name}_cut{side}"] = s
            strip_max = np.maximum(strip_max, s)
            if name in ("grad", "fg"):
                v = np.where(has[side], density(masses, 6 + k), EMPTY)
                out[f"{name}_line{side}"] = v
                line_max = np.maximum(line_max, v)
        out[f"{name}_cutmax"] = strip_max
        if name in ("grad", "fg"):
            out[f"{name}_linemax"] = line_max


def crop_feature_dict(an: Any, boxes_unit: np.ndarray, ratio: float | None,
                      nb: NeighbourCrops) -> dict[str, np.ndarray]:
    """Every feature of every candidate, by name (see `crop_features`)."""
    b = np.clip(np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    A = an.width / an.height
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    w, h = x2 - x1, y2 - y1
    one = np.ones_like(x1)
    out: dict[str, np.ndarray] = {
        "m_left": x1, "m_top": y1, "m_right": 1 - x2, "m_bottom": 1 - y2,
        "w": w, "h": h, "area": w * h,
        "cx": (x1 + x2) / 2 - 0.5, "cy": (y1 + y2) / 2 - 0.5,
        "log_aspect_rel": np.log(np.maximum(w, 1e-6) * A / np.maximum(h, 1e-6)),
        "log_image_aspect": one * np.log(A),
    }
    out["acx"] = np.abs(out["cx"])
    out["acy"] = np.abs(out["cy"])
    if ratio:
        r = ratio / A  # unit-coordinate aspect of the ratio
        wmax = min(1.0, r)  # the largest box of the ratio, in unit coordinates
        out["log_ratio_rel"] = one * np.log(r)
        out["scale"] = w / wmax
        sx, sy = 1 - w, 1 - h
        out["tx"] = np.where(sx > 0.01, x1 / np.maximum(sx, 1e-6), 0.5)
        out["ty"] = np.where(sy > 0.01, y1 / np.maximum(sy, 1e-6), 0.5)
    _map_features(an, b, out)

    nbs = neighbour_summary(nb, ratio, A)
    med = nbs["median"]
    for i, k in enumerate(("x1", "y1", "x2", "y2")):
        out[f"nb_d{k}"] = b[:, i] - med[i]
        out[f"nb_med_{k}"] = one * med[i]
    out["nb_iou_med"] = _iou_unit(b, med[None])
    ious = _iou_unit(b[:, None, :], nbs["boxes"][None, :, :])  # [N, K]
    out["nb_iou_mean"] = ious.mean(1)
    out["nb_iou_top5"] = ious[:, :5].mean(1)
    out["nb_iou_q75"] = np.quantile(ious, 0.75, axis=1) if ious.shape[1] > 1 else ious[:, 0]
    out["nb_iou_q90"] = np.quantile(ious, 0.9, axis=1) if ious.shape[1] > 1 else ious[:, 0]
    if len(nb.similarity) == ious.shape[1] and len(nb.similarity):  # the more similar, the more weight
        wts = np.exp((nb.similarity - nb.similarity.max()) / 0.05)
        out["nb_iou_wmean"] = ious @ (wts / wts.sum())
    else:
        out["nb_iou_wmean"] = out["nb_iou_mean"]
    if ratio:
        out["nb_iou_med_fitted"] = _iou_unit(b, nbs["median_fitted"][None])
        out["nb_iou_fitted_mean"] = _iou_unit(b[:, None, :], nbs["fitted"][None, :, :]).mean(1)
    sim = nb.similarity[:10]
    out["nb_sim"] = one * (float(sim.mean()) if len(sim) else 0.0)
    return out


def crop_features(an: Any, boxes_unit: np.ndarray, ratio: float | None, nb: NeighbourCrops,
                  names: Sequence[str]) -> np.ndarray:
    """[N, len(names)] features of candidate boxes (unit coordinates) in the order `names`."""
    d = crop_feature_dict(an, boxes_unit, ratio, nb)
    n = len(np.asarray(boxes_unit).reshape(-1, 4))
    return np.stack([np.asarray(d[k], dtype=np.float64).reshape(n) for k in names], axis=1) if names else \
        np.zeros((n, 0))


NO_FACE = 9.0  # the value of a face feature when the image has no detected face


def face_feature_dict(boxes_unit: np.ndarray, faces_unit: np.ndarray) -> dict[str, np.ndarray]:
    """Features of candidate crops from the detected faces (unit boxes [n, 4], largest first):
    how many, how large, which are inside, where the largest sits in the crop and how much room
    is above it. Images without faces get NO_FACE (or 0 for counts)."""
    b = np.clip(np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    f = np.asarray(faces_unit, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    w = np.maximum(b[:, 2] - b[:, 0], 1e-6)
    h = np.maximum(b[:, 3] - b[:, 1], 1e-6)
    none = np.full(n, NO_FACE)
    out = {"face_n": np.full(n, float(min(len(f), 8)))}
    if len(f) == 0:
        for k in ("face_area", "face_in", "face_main_in", "face_cut", "face_dx", "face_dy", "face_h", "face_top"):
            out[k] = none if k not in ("face_area", "face_cut") else np.zeros(n)
        return out
    fa = (f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1])
    side = np.sqrt(fa)
    main = side >= 0.5 * side[0]
    ix = np.clip(np.minimum(b[:, None, 2], f[None, :, 2]) - np.maximum(b[:, None, 0], f[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(b[:, None, 3], f[None, :, 3]) - np.maximum(b[:, None, 1], f[None, :, 1]), 0, None)
    share = ix * iy / np.maximum(fa[None, :], 1e-9)  # [N, faces]: the share of each face inside
    inside = share > 0.98
    out["face_area"] = np.full(n, fa[0])
    out["face_in"] = inside.mean(1)
    out["face_main_in"] = inside[:, main].all(1).astype(np.float64)
    out["face_cut"] = ((share > 0.02) & ~inside).sum(1).astype(np.float64)
    fcx, fcy = (f[0, 0] + f[0, 2]) / 2, (f[0, 1] + f[0, 3]) / 2
    out["face_dx"] = (fcx - (b[:, 0] + b[:, 2]) / 2) / w
    out["face_dy"] = (fcy - (b[:, 1] + b[:, 3]) / 2) / h
    out["face_h"] = (f[0, 3] - f[0, 1]) / h
    out["face_top"] = (f[0, 1] - b[:, 1]) / h
    return out
