"""A hand-crafted global image descriptor: retrieval for machines without CLIP weights.

Blocks (each normalised on its own, weighted, then the whole vector L2-normalised):

  saliency_8x8 / saliency_4x4  spectral-residual saliency pooled to grids (where the subject is)
  gradient_4x4x8               GIST/HOG-like: 8 gradient orientations on a 4x4 grid (structure)
  luma_8x8                     coarse luminance layout, mean removed (light and dark regions)
  chroma_4x4x2                 coarse opponent-colour layout
  colour_hist                  HSV histogram, 12 hues x 2 saturations x 3 values + 4 greys
  aspect                       soft bins of log(width/height): crops transfer between like shapes

Everything is computed at 128 px on the longest side, so a full-size photo costs a few ms,
most of it the downscale. numpy, scipy and Pillow only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import InputError
from cropper_engine.models.saliency import spectral_residual_saliency

WORK_SIZE = 128  # longest side of the working image, px
MIN_SIDE = 8
ASPECT_CENTRES = np.log(np.array([9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9]))
ASPECT_SIGMA = 0.2


@dataclass(frozen=True)
class Block:
    name: str
    dim: int
    share: float  # share of the squared norm: the block's weight in the cosine similarity


# Changing any of these changes the descriptor: bump CLASSICAL_ID with it.
BLOCKS: tuple[Block, ...] = (
    Block("saliency_8x8", 64, 0.18),
    Block("saliency_4x4", 16, 0.12),
    Block("gradient_4x4x8", 128, 0.20),
    Block("luma_8x8", 64, 0.15),
    Block("chroma_4x4x2", 32, 0.10),
    Block("colour_hist", 76, 0.15),
    Block("aspect", 5, 0.10),
)
CLASSICAL_ID = "classical:v1"


def _grid_mean(a: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Mean of a 2-D (or H x W x C) array over a gh x gw grid of (nearly) equal cells."""
    h, w = a.shape[:2]
    cy = (np.arange(h) * gh) // h
    cx = (np.arange(w) * gw) // w
    cell = (cy[:, None] * gw + cx[None, :]).ravel()
    counts = np.maximum(np.bincount(cell, minlength=gh * gw), 1)
    if a.ndim == 2:
        return np.bincount(cell, weights=a.ravel(), minlength=gh * gw) / counts
    flat = a.reshape(h * w, -1)
    return np.stack(
        [np.bincount(cell, weights=flat[:, c], minlength=gh * gw) / counts for c in range(flat.shape[1])],
        axis=1,
    )


def _unit(v: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """L2-normalise; `floor` keeps a near-empty block (a flat image's layout) from turning into noise."""
    return v / max(float(np.linalg.norm(v)), floor)


def _load_small(source: Any) -> tuple[np.ndarray, float]:
    """Any image source -> (RGB float32 H x W x 3 in 0..1, longest side WORK_SIZE), and log aspect."""
    from PIL import Image, ImageOps

    if isinstance(source, (str, os.PathLike)):
        try:
            with Image.open(Path(source)) as im:
                # JPEG: decode at 1/2..1/8 scale directly (several times faster than a full decode).
                im.draft("RGB", (WORK_SIZE * 2, WORK_SIZE * 2))
                im.load()
                im = ImageOps.exif_transpose(im) or im
                img = im.convert("RGB")
        except OSError as exc:
            from cropper_engine.errors import ImageError

            raise ImageError(f"{source}: cannot read image ({exc})") from None
    elif isinstance(source, np.ndarray):
        arr = source if source.ndim == 3 else np.stack([source] * 3, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))
    elif isinstance(source, Image.Image):
        img = source if source.mode == "RGB" else source.convert("RGB")
    elif hasattr(source, "working"):  # cropper_engine.imageio.LoadedImage: its decode (reduced for a large JPEG)
        img = source.working
    else:
        raise InputError(f"cannot embed a {type(source).__name__}; pass a PIL image, an array or a path")

    w, h = img.size
    scale = WORK_SIZE / max(w, h)
    tw, th = max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))
    if (tw, th) != (w, h):
        # reducing_gap: integer box-reduce first, then a short bilinear step (fast and antialiased).
        img = img.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
    rgb = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    return rgb, math.log(w / h)


def _colour_hist(rgb: np.ndarray) -> np.ndarray:
    """HSV histogram: 4 grey levels for unsaturated or dark pixels, else 12 x 2 x 3 (H x S x V)."""
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    chroma = mx - mn
    sat = chroma / np.maximum(mx, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    ) / 6.0  # 0..1
    grey = (sat < 0.15) | (mx < 0.12)
    h_bin = np.minimum((hue * 12).astype(np.int64), 11)
    s_bin = (sat >= 0.5).astype(np.int64)
    v_bin = np.minimum((mx * 3).astype(np.int64), 2)
    colour_idx = 4 + (h_bin * 2 + s_bin) * 3 + v_bin
    grey_idx = np.minimum((mx * 4).astype(np.int64), 3)
    idx = np.where(grey, grey_idx, colour_idx).ravel()
    hist = np.bincount(idx, minlength=76).astype(np.float64)
    return np.sqrt(hist / hist.sum())  # Hellinger: unit L2 norm already


def _gradient_grid(gray: np.ndarray, cells: int = 4, bins: int = 8) -> np.ndarray:
    """Magnitude-weighted, orientation-interpolated histograms of unsigned gradients per cell."""
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
    mag = np.hypot(gx, gy)
    f = (np.arctan2(gy, gx) % np.pi) * (bins / np.pi) - 0.5
    b0 = np.floor(f)
    w1 = f - b0
    b0 = b0.astype(np.int64) % bins
    b1 = (b0 + 1) % bins
    h, w = gray.shape
    cy = (np.arange(h) * cells) // h
    cx = (np.arange(w) * cells) // w
    cell = (cy[:, None] * cells + cx[None, :]) * bins
    n = cells * cells * bins
    hist = np.bincount((cell + b0).ravel(), weights=(mag * (1 - w1)).ravel(), minlength=n)
    hist += np.bincount((cell + b1).ravel(), weights=(mag * w1).ravel(), minlength=n)
    # One norm over the whole grid (not per cell), so where the edges are stays in the vector.
    return _unit(np.sqrt(hist), floor=0.5)


def _saliency_grid(sal: np.ndarray, g: int) -> np.ndarray:
    grid = _grid_mean(sal, g, g)
    total = grid.sum()
    if total <= 1e-9:
        return np.zeros(g * g)
    # A distribution minus the uniform one: what is left is where the saliency is.
    return _unit(grid / total - 1.0 / (g * g))


def describe_array(rgb: np.ndarray, log_aspect: float) -> np.ndarray:
    """The descriptor of a small RGB float image (see the module docstring); float32, unit norm."""
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    sal = spectral_residual_saliency(gray, size=64)

    luma = _grid_mean(gray, 8, 8)
    luma = _unit(luma - luma.mean(), floor=0.05)
    opp = np.stack(
        [(rgb[..., 0] - rgb[..., 1]) / math.sqrt(2), (rgb[..., 0] + rgb[..., 1] - 2 * rgb[..., 2]) / math.sqrt(6)],
        axis=-1,
    )
    chroma = _unit(_grid_mean(opp, 4, 4).ravel(), floor=0.2)
    aspect = _unit(np.exp(-0.5 * ((log_aspect - ASPECT_CENTRES) / ASPECT_SIGMA) ** 2))

    parts = {
        "saliency_8x8": _saliency_grid(sal, 8),
        "saliency_4x4": _saliency_grid(sal, 4),
        "gradient_4x4x8": _gradient_grid(gray),
        "luma_8x8": luma,
        "chroma_4x4x2": chroma,
        "colour_hist": _colour_hist(rgb),
        "aspect": aspect,
    }
    vec = np.concatenate([parts[b.name] * math.sqrt(b.share) for b in BLOCKS])
    return _unit(vec, floor=1e-12).astype(np.float32)


class ClassicalEmbedder:
    """Embedder protocol on the classical descriptor: deterministic, CPU, no weights."""

    id: str = CLASSICAL_ID
    dim: int = sum(b.dim for b in BLOCKS)

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images, uint8 arrays or paths -> float32 [N, dim] unit rows.

        Paths are decoded at reduced scale (JPEG draft mode), the fastest way in.
        """
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, image in enumerate(images):
            rgb, log_aspect = _load_small(image)
            out[i] = describe_array(rgb, log_aspect)
        return out

    def describe(self) -> dict[str, Any]:
        offsets: dict[str, Any] = {}
        start = 0
        for b in BLOCKS:
            offsets[b.name] = {"start": start, "dim": b.dim, "share": b.share}
            start += b.dim
        return {
            "id": self.id,
            "dim": self.dim,
            "kind": "classical",
            "input_size": WORK_SIZE,
            "resize": "longest-side (aspect kept)",
            "blocks": offsets,
        }


__all__ = ["BLOCKS", "CLASSICAL_ID", "ClassicalEmbedder", "describe_array"]
