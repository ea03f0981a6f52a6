"""Classical composition features of candidate crops, computed in bulk from a saliency map.

For one image: a saliency map (spectral residual, no weights) turned into a summed-area
table, so the saliency inside, on the border of, and around any number of boxes costs a
few array lookups. Features are what a composition scorer needs; `FEATURE_NAMES` orders them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
