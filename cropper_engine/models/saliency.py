"""Spectral-residual saliency (Hou & Zhang, CVPR 2007): a weight-free saliency map in numpy.

The log amplitude spectrum of a natural image is close to smooth; what sticks out of it
(the "spectral residual": log amplitude minus its local 3x3 mean) back-transformed with the
original phase marks the regions that are unexpected, i.e. salient. Used by the classical
embedder (saliency layout), and by the scorers and crop proposers.
"""

from __future__ import annotations

import numpy as np


def _resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Longest side -> `size` (never upscaled), aspect kept, antialiased; float32 0..1 in."""
    h, w = gray.shape
    scale = size / max(h, w)
    if scale >= 1.0:
        return gray
    from PIL import Image

    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # PIL resizes float images ("F" mode) with a filter support widened by the scale: antialiased.
    return np.asarray(Image.fromarray(gray, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR))


def spectral_residual_saliency(gray: np.ndarray, size: int = 64, sigma: float | None = None) -> np.ndarray:
    """A saliency map of a grey image, shape (H', W') with longest side `size`, values in 0..1.

    `gray` is a 2-D array of any size and any value range (0..1 or 0..255: the map does not
    change with a gain); it is downscaled first, as the method works at a coarse scale (the
    paper uses width 64); a smaller image is used as it is. `sigma` is the Gaussian
    smoothing in map pixels (default 2.5 at size 64, scaled with `size`). A flat image has no
    salient region and gives all zeros.
    """
    from scipy import ndimage

    arr = np.asarray(gray)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"a grey image must be a non-empty 2-D array, got shape {np.shape(gray)}")
    arr = arr.astype(np.float32)
    if np.issubdtype(np.asarray(gray).dtype, np.integer):
        arr = arr / 255.0
    small = _resize_gray(arr, size).astype(np.float64)

    spectrum = np.fft.fft2(small)
    amplitude = np.abs(spectrum)
    log_amp = np.log(amplitude + 1e-8)
    phase = np.angle(spectrum)
    # The spectrum is periodic: wrap at its borders for the local mean.
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode="wrap")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    if sigma is None:
        sigma = 2.5 * max(small.shape) / 64.0
    if sigma > 0:
        sal = ndimage.gaussian_filter(sal, sigma=sigma, mode="nearest")

    lo, hi = float(sal.min()), float(sal.max())
    # A (near) constant image: the residual is numerical noise, not saliency.
    if hi - lo <= 1e-12 or float(small.std()) < 1e-4:
        return np.zeros(small.shape, dtype=np.float32)
    return ((sal - lo) / (hi - lo)).astype(np.float32)


__all__ = ["spectral_residual_saliency"]
