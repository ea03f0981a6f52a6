"""Outlines: masks made of boxes, a mask's outer contours as polygons (for drawing), its box."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cropper_engine.types import Box


def _upsample(small: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def _outline(small: np.ndarray, scale_x: float, scale_y: float, max_polys: int = 8) -> list[list[list[int]]]:
    """The mask's outer contours as polygons in image pixels (simplified), for drawing."""
    import cv2

    m = np.ascontiguousarray(small.astype(np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)[:max_polys]
    out = []
    for c in contours:
        eps = 0.01 * cv2.arcLength(c, True)
        poly = cv2.approxPolyDP(c, eps, True).reshape(-1, 2)
        if len(poly) >= 3:
            out.append([[round(float(x) * scale_x), round(float(y) * scale_y)] for x, y in poly])
    return out


def _mask_of_boxes(boxes: Sequence[Box], w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    for b in boxes:
        bb = b.clamp(w, h)
        mask[int(bb.y1):int(math.ceil(bb.y2)), int(bb.x1):int(math.ceil(bb.x2))] = True
    return mask


def _box_polys(boxes: Sequence[Box]) -> list[list[list[int]]]:
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b.as_int()
        out.append([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    return out


def _bbox(mask: np.ndarray) -> Box:
    from cropper_engine.engine.geometry import mask_bbox

    return mask_bbox(mask)
