"""What a person sees in a detected face: the features the ranking reads (faces.rank_faces),
from the detection-size copy of the image (size, focus, frontal-ness, keypoints in place) and
from a person segmentation (someone there, the shoulders' width)."""

from __future__ import annotations

import math

import numpy as np

from cropper_engine.engine.subject.faces import Face
from cropper_engine.types import Box

FOCUS_SIDE = 32  # a face's sharpness is measured at most this many px across (detection size)
R_EYE, L_EYE, NOSE, MOUTH, R_EAR, L_EAR = range(6)


def _focus(grey: np.ndarray, box: Box) -> float | None:
    """Sharpness: the Laplacian's variance over the variance of the detail finer than 4 px
    (the grey level less its Gaussian blur), inside the face (its middle, resampled to at most
    FOCUS_SIDE px): how much of the face's detail is at the finest scale, whatever its contrast
    or lighting (a white cap or a shadow leaves it). None for a face under 6 px."""
    import cv2

    gh, gw = grey.shape
    ix, iy = 0.15 * box.width, 0.15 * box.height
    x1, y1 = max(0, int(box.x1 + ix)), max(0, int(box.y1 + iy))
    x2, y2 = min(gw, int(math.ceil(box.x2 - ix))), min(gh, int(math.ceil(box.y2 - iy)))
    if x2 - x1 < 6 or y2 - y1 < 6:
        return None
    patch = grey[y1:y2, x1:x2].astype(np.float32)
    n = min(FOCUS_SIDE, x2 - x1, y2 - y1)
    if n < x2 - x1 or n < y2 - y1:
        patch = cv2.resize(patch, (n, n), interpolation=cv2.INTER_AREA)
    lap = cv2.Laplacian(patch, cv2.CV_32F, ksize=3)
    detail = patch - cv2.GaussianBlur(patch, (0, 0), 4.0)
    return round(float(lap.var() / (detail.var() + 4.0)), 4)


def _frontal(kp: tuple[tuple[float, float], ...]) -> float:
    """1 for a face seen from the front, 0 in profile: how nearly the nose tip lies halfway
    between the eyes, and halfway between the ears, along the line of the eyes."""
    p = np.asarray(kp, dtype=np.float64)
    ex = p[L_EYE] - p[R_EYE]
    n = float(np.hypot(*ex))
    if n < 1e-6:
        return 0.0
    x = p @ (ex / n)  # positions along the eyes' line
    t = (x[NOSE] - x[R_EYE]) / (x[L_EYE] - x[R_EYE])
    eyes = max(0.0, 1.0 - abs(2.0 * t - 1.0))
    dr, dl = x[NOSE] - x[R_EAR], x[L_EAR] - x[NOSE]
    ears = min(dr, dl) / max(dr, dl) if dr > 0 and dl > 0 else 0.0
    return round(float(0.5 * (eyes + ears)), 4)


def _keypoints_ok(kp: tuple[tuple[float, float], ...], box: Box) -> bool:
    """Whether the eyes, nose and mouth sit where a face has them in its box (in any rotation):
    the mouth 0.28-0.62 of the box's side from the eyes' middle, the nose between them, the
    eyes at most 0.6 of the side apart. FCDB's faces of confidence >= 0.8 all pass; some large
    detections in fire, clouds or grass do not."""
    p = np.asarray(kp, dtype=np.float64)
    side = math.sqrt(max(box.area, 1e-9))
    e = 0.5 * (p[R_EYE] + p[L_EYE])
    em = p[MOUTH] - e
    d = float(np.hypot(*em))
    if not 0.28 * side <= d <= 0.62 * side:
        return False
    tn = float((p[NOSE] - e) @ em) / (d * d)
    return 0.05 <= tn <= 1.0 and float(np.hypot(*(p[L_EYE] - p[R_EYE]))) <= 0.6 * side


def face_features(faces: list[Face], arr: np.ndarray, f: float) -> None:
    """The features read from the detection-size copy `arr` (image px = its px * f), stored in
    each face's `features`: share (its side over the image's shorter side), focus (`_focus`),
    frontal (`_frontal`) and keypoints_ok (`_keypoints_ok`) where the detector gave keypoints."""
    import cv2

    grey = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
    for fc in faces:
        b = fc.box.scale(1.0 / f)
        fc.features["share"] = round(math.sqrt(max(b.area, 0.0)) / max(1, min(grey.shape)), 4)
        fc.features["focus"] = _focus(grey, b)
        if fc.keypoints:
            fc.features["frontal"] = _frontal(fc.keypoints)
            fc.features["keypoints_ok"] = _keypoints_ok(fc.keypoints, fc.box)


def person_features(faces: list[Face], prob: np.ndarray, f: float) -> None:
    """From a person segmentation (`prob`, at the detection size): `person`, its mean over the
    face's middle (someone is there), and `shoulders`, the width of the person at 0.75 of the
    face's height below its chin, in face widths (None: that row is off the image)."""
    ph, pw = prob.shape[:2]
    on = prob > 0.5
    for fc in faces:
        b = fc.box.scale(1.0 / f)
        ix, iy = 0.2 * b.width, 0.2 * b.height
        x1, y1 = max(0, int(b.x1 + ix)), max(0, int(b.y1 + iy))
        x2, y2 = min(pw, int(math.ceil(b.x2 - ix))), min(ph, int(math.ceil(b.y2 - iy)))
        fc.features["person"] = round(float(prob[y1:y2, x1:x2].mean()), 4) if x2 > x1 and y2 > y1 else None
        y = int(round(b.y2 + 0.75 * b.height))
        if y >= ph or b.width <= 0:
            fc.features["shoulders"] = None
            continue
        row = on[y]
        c = int(min(max(b.center[0], 0), pw - 1))
        if not row[c]:
            idx = np.flatnonzero(row)
            if len(idx) == 0 or np.abs(idx - c).min() > 0.5 * b.width:
                fc.features["shoulders"] = 0.0
                continue
            c = int(idx[np.abs(idx - c).argmin()])
        left = c - int(np.argmin(row[c::-1])) + 1 if not row[:c + 1].all() else 0
        right = c + int(np.argmin(row[c:])) if not row[c:].all() else pw
        fc.features["shoulders"] = round((right - left) / b.width, 3)
