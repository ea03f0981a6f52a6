"""Per-image analysis for the no-VLM default: a few small maps and their summed-area tables.

One downscale of the decoded image (longest side `WORK_SIDE`), then, all without weights:

  sr    spectral-residual saliency (Hou & Zhang 2007; models/saliency.py), 64 px
  fg    OpenCV's StaticSaliencyFineGrained (centre-surround differences)
  ft    frequency-tuned colour saliency (Achanta et al. 2009): distance of the blurred Lab
        colour from the image's mean colour
  grad  gradient magnitude (Sobel) of the grey image: where a crop border would cut objects

Each map is scaled to mean 1 over the image, so a box's mean value is its density relative to
the image. `MapTable` answers box sums for any number of boxes with four bilinear lookups, which
is what keeps the features of hundreds of candidates a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORK_SIDE = 160  # longest side of the working image, px
MAP_NAMES = ("sr", "fg", "ft", "grad")
MOMENT_MAPS = ("sr", "fg", "ft")  # maps whose centroid inside a crop is a feature


class BoxLookup:
    """The bilinear corner lookups of many boxes (unit coordinates, clipped to 0..1) into any
    summed-area table of one size (h+1, w+1): the indices and weights are computed once and
    serve every map of that size (the features read ~10 tables for the same ~5,000 boxes)."""

    def __init__(self, boxes_unit: np.ndarray, h: int, w: int) -> None:
        b = np.clip(np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
        self.n = len(b)
        # the four corners of every box, one after another: (x2, y2), (x1, y2), (x2, y1), (x1, y1)
        x = np.concatenate([b[:, 2], b[:, 0], b[:, 2], b[:, 0]]) * w
        y = np.concatenate([b[:, 3], b[:, 3], b[:, 1], b[:, 1]]) * h
        x0 = np.minimum(x.astype(np.int64), w - 1)
        y0 = np.minimum(y.astype(np.int64), h - 1)
        self.tx, self.ty = x - x0, y - y0
        self.i00 = y0 * (w + 1) + x0
        self.i10 = self.i00 + (w + 1)
        self.shape = (h + 1, w + 1)

    def mass(self, sat: np.ndarray) -> np.ndarray:
        """Each box's sum in `sat`, the same arithmetic as one corner at a time (bit for bit)."""
        t = sat.ravel()
        tx, ty = self.tx, self.ty
        a = t[self.i00] * (1 - tx) + t[self.i00 + 1] * tx
        c = t[self.i10] * (1 - tx) + t[self.i10 + 1] * tx
        v = (a * (1 - ty) + c * ty).reshape(4, self.n)
        return v[0] - v[1] - v[2] + v[3]


@dataclass
class MapTable:
    """A map (h x w, mean 1) with its summed-area table; box sums in unit coordinates."""

    sat: np.ndarray  # (h+1, w+1) cumulative sums of the map divided by its size (so the image sums to 1)
    h: int
    w: int
    sat_x: np.ndarray | None = None  # the same of map * x and map * y (cell centres, 0..1): centroids
    sat_y: np.ndarray | None = None

    @classmethod
    def from_map(cls, m: np.ndarray, moments: bool = False) -> MapTable:
        a = np.clip(np.asarray(m, dtype=np.float64), 0.0, None)
        mean = a.mean() if a.size else 0.0
        a = a / mean if mean > 1e-12 else np.ones_like(a)
        h, w = a.shape

        def sat(v: np.ndarray) -> np.ndarray:
            out = np.zeros((h + 1, w + 1))
            out[1:, 1:] = v.cumsum(0).cumsum(1) / a.size
            return out

        if not moments:
            return cls(sat(a), h, w)
        xs = (np.arange(w) + 0.5) / w
        ys = (np.arange(h) + 0.5) / h
        return cls(sat(a), h, w, sat(a * xs[None, :]), sat(a * ys[:, None]))

    def mass(self, boxes_unit: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        """Share of the map's total inside each box [N, 4] (x1, y1, x2, y2 in 0..1); of map * x
        or map * y with `table` = `sat_x` / `sat_y`."""
        return BoxLookup(boxes_unit, self.h, self.w).mass(self.sat if table is None else table)

    def density(self, boxes_unit: np.ndarray, empty: float = -1.0) -> np.ndarray:
        """Mean value (image mean = 1) inside each box; `empty` for boxes of (nearly) no area."""
        b = np.clip(boxes_unit, 0.0, 1.0)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        ok = area > 1e-4
        return np.where(ok, self.mass(b) / np.maximum(area, 1e-4), empty)


@dataclass
class ImageAnalysis:
    """What the default pipeline knows of one image besides its retrieved neighbours."""

    width: int
    height: int
    sr: np.ndarray  # spectral-residual saliency (longest side 64), 0..1: also the classical scorer's map
    tables: dict[str, MapTable]

    @property
    def aspect(self) -> float:
        return self.width / self.height


def _small_rgb(image: object) -> np.ndarray:
    from PIL import Image

    img = image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")  # type: ignore[attr-defined]
    w, h = img.size  # type: ignore[attr-defined]
    s = WORK_SIDE / max(w, h)
    tw, th = max(8, round(w * s)), max(8, round(h * s))
    if (tw, th) != (w, h):
        img = img.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)  # type: ignore[attr-defined]
    return np.asarray(img, dtype=np.uint8)


def analyse(image: object, size: tuple[int, int] | None = None) -> ImageAnalysis:
    """Analyse a decoded RGB PIL image (any size; it is downscaled first). `size`: the full
    image's width and height where `image` is a reduced decode of it (the analysis's aspect is
    the full image's)."""
    import cv2

    from cropper_engine.models.saliency import spectral_residual_saliency

    w, h = size if size is not None else image.size  # type: ignore[attr-defined]
    rgb = _small_rgb(image)
    grey8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    grey = grey8.astype(np.float32) / 255.0
    sr = spectral_residual_saliency(grey, 64)

    fg_algo = cv2.saliency.StaticSaliencyFineGrained_create()
    ok, fg = fg_algo.computeSaliency(grey8)
    fg = np.asarray(fg, dtype=np.float32) if ok else np.zeros_like(grey)

    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    blur = cv2.GaussianBlur(lab, (5, 5), 0)
    ft = np.sqrt(((blur - lab.reshape(-1, 3).mean(0)) ** 2).sum(axis=2))

    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.sqrt(gx * gx + gy * gy)

    maps = {"sr": sr, "fg": fg, "ft": ft, "grad": grad}
    return ImageAnalysis(w, h, sr, {k: MapTable.from_map(maps[k], moments=k in MOMENT_MAPS) for k in MAP_NAMES})


__all__ = ["MAP_NAMES", "WORK_SIDE", "BoxLookup", "ImageAnalysis", "MapTable", "analyse"]
