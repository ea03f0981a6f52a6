"""Candidate features the ranker study tried and the default does not ship (bench only).

Each is computed for the boxes the study's rows already hold (every training image and its
mirror image, as `fit_default.build_rows` numbers them), from the same working image as
`engine/analysis.py`:

  c_*   colour: the Lab colour contrast (Delta E, /100) between each cut-off strip and the crop,
        the lightness spread inside each strip and inside the crop, the crop's lightness against
        the image's and its mean chroma (what FCDB's annotators cut off: frames, skies, walls);
  t_*   composition: each saliency map's density on the crop's thirds lines and in its central
        ninth, relative to the crop's own density;
  mb_*  the saliency mass box: for each map the box holding its central 90 % and 70 % of mass
        along each axis; the candidate's IoU with it, the share of it inside the candidate and
        the offsets of the four sides;
  g_*   the image: the share of each map's mass in its top tenth of cells (how concentrated).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

EMPTY = -1.0  # a strip feature where the crop edge lies on the image edge (as engine/features.py)
_EDGE = 0.005


def _sat(v: np.ndarray) -> np.ndarray:
    h, w = v.shape
    out = np.zeros((h + 1, w + 1))
    out[1:, 1:] = v.astype(np.float64).cumsum(0).cumsum(1) / v.size
    return out


def mass_box(m: np.ndarray, lo: float) -> np.ndarray:
    """The unit box holding the central (1 - 2 lo) share of a map's mass along each axis."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0, None) + 1e-12
    h, w = m.shape
    cx = np.cumsum(m.sum(0))
    cy = np.cumsum(m.sum(1))
    cx, cy = cx / cx[-1], cy / cy[-1]
    return np.array([np.searchsorted(cx, lo) / w, np.searchsorted(cy, lo) / h,
                     (np.searchsorted(cx, 1 - lo) + 1) / w, (np.searchsorted(cy, 1 - lo) + 1) / h])


def _overlap(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of boxes [N, 4] with box a, and the share of a inside each."""
    ix = np.clip(np.minimum(b[:, 2], a[2]) - np.maximum(b[:, 0], a[0]), 0, None)
    iy = np.clip(np.minimum(b[:, 3], a[3]) - np.maximum(b[:, 1], a[1]), 0, None)
    inter = ix * iy
    area_a = max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)
    union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + area_a - inter
    return inter / np.maximum(union, 1e-9), inter / area_a


def features(image: Any, boxes_unit: np.ndarray) -> dict[str, np.ndarray]:
    """The tried features of candidate boxes (unit coordinates) of a decoded RGB image."""
    import cv2

    from cropper_engine.engine.analysis import BoxLookup, _small_rgb, analyse

    an = analyse(image)
    rgb = _small_rgb(image)
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab) / 100.0
    h, w = lab.shape[:2]
    b = np.clip(np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4), 0, 1)
    n = len(b)
    x1, y1, x2, y2 = b.T
    bw, bh = x2 - x1, y2 - y1
    z, o = np.zeros(n), np.ones(n)
    strips = {"L": np.stack([z, y1, x1, y2], 1), "R": np.stack([x2, y1, o, y2], 1),
              "T": np.stack([x1, z, x2, y1], 1), "B": np.stack([x1, y2, x2, o], 1)}
    has = {"L": x1 > _EDGE, "R": x2 < 1 - _EDGE, "T": y1 > _EDGE, "B": y2 < 1 - _EDGE}
    thirds = []
    for f in (1 / 3, 2 / 3):
        xc, yc = x1 + f * bw, y1 + f * bh
        thirds += [np.stack([xc - 0.04 * bw, y1, xc + 0.04 * bw, y2], 1),
                   np.stack([x1, yc - 0.04 * bh, x2, yc + 0.04 * bh], 1)]
    centre = np.stack([x1 + bw / 3, y1 + bh / 3, x2 - bw / 3, y2 - bh / 3], 1)
    every = np.clip(np.concatenate([b, *(strips[s] for s in "LRTB"), *thirds, centre]), 0, 1)
    areas = np.maximum((every[:, 2] - every[:, 0]) * (every[:, 3] - every[:, 1]), 1e-6)

    def part(v: np.ndarray, k: int) -> np.ndarray:
        return v[k * n:(k + 1) * n]

    look = BoxLookup(every, h, w)
    L, A, B = lab[..., 0], lab[..., 1], lab[..., 2]
    mean = {k: look.mass(_sat(v)) / areas for k, v in (("L", L), ("A", A), ("B", B), ("L2", L * L))}
    out: dict[str, np.ndarray] = {}
    inL, inA, inB = part(mean["L"], 0), part(mean["A"], 0), part(mean["B"], 0)
    out["c_in_Lstd"] = np.sqrt(np.maximum(part(mean["L2"], 0) - inL ** 2, 0))
    out["c_in_L"] = inL - float(L.mean())
    out["c_in_chroma"] = np.hypot(inA, inB)
    de_max, std_max = np.full(n, EMPTY), np.full(n, EMPTY)
    for k, s in enumerate("LRTB", start=1):
        sl = part(mean["L"], k)
        de = np.sqrt((sl - inL) ** 2 + (part(mean["A"], k) - inA) ** 2 + (part(mean["B"], k) - inB) ** 2)
        sd = np.sqrt(np.maximum(part(mean["L2"], k) - sl ** 2, 0))
        out[f"c_dE{s}"] = np.where(has[s], de, EMPTY)
        out[f"c_std{s}"] = np.where(has[s], sd, EMPTY)
        de_max, std_max = np.maximum(de_max, out[f"c_dE{s}"]), np.maximum(std_max, out[f"c_std{s}"])
    out["c_dEmax"], out["c_stdmax"] = de_max, std_max
    for name in ("sr", "fg", "ft"):
        t = an.tables[name]
        m = (look if (t.h, t.w) == (h, w) else BoxLookup(every, t.h, t.w)).mass(t.sat) / areas
        dens = np.maximum(part(m, 0), 1e-6)
        out[f"t_{name}_thirds"] = sum(part(m, k) for k in (5, 6, 7, 8)) / 4 / dens
        out[f"t_{name}_centre"] = part(m, 9) / dens
    for name in ("sr", "fg", "ft", "grad"):
        cells = np.diff(np.diff(an.tables[name].sat, axis=0), axis=1)  # the map back from its table
        for lo, tag in ((0.05, "90"), (0.15, "70")):
            mb = mass_box(cells, lo)
            out[f"mb_{name}{tag}_iou"], out[f"mb_{name}{tag}_hold"] = _overlap(b, mb)
            for i, side in enumerate(("x1", "y1", "x2", "y2")):
                out[f"mb_{name}{tag}_d{side}"] = b[:, i] - mb[i]
        flat = np.sort(cells.ravel())[::-1]
        out[f"g_{name}_top10"] = o * float(flat[:max(1, len(flat) // 10)].sum() / max(flat.sum(), 1e-9))
    return out


def columns(rows: dict[str, Any], fcdb: str | Path, log: Any = print) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The tried features of every row of each task: {task: (x [N, F] float32, names)}. The rows'
    groups are FCDB train's images in order, then their mirror images (`fit_default.build_rows`)."""
    from PIL import Image

    from cropper_engine.engine.fit_default import read_fcdb
    from cropper_engine.imageio import open_image

    records = read_fcdb(fcdb)
    starts = {t: np.r_[0, np.flatnonzero(np.diff(r.group)) + 1, len(r.group)] for t, r in rows.items()}
    groups = len(next(iter(starts.values()))) - 1
    n = int(next(iter(rows.values())).image.max()) + 1
    per: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in rows}
    t0 = time.perf_counter()
    for g in range(groups):
        img = open_image(str(Path(fcdb) / "images" / records[g % n]["image"])).image
        if g >= n:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for t, r in rows.items():
            per[t].append(features(img, r.boxes[starts[t][g]:starts[t][g + 1]]))
        if g % 500 == 0:
            log(f"  tried features: {g}/{groups} images, {time.perf_counter() - t0:.0f} s")
    out = {}
    for t, ds in per.items():
        names = sorted(ds[0])
        out[t] = (np.concatenate([np.stack([d[k] for k in names], 1) for d in ds]).astype(np.float32), names)
    return out
