"""Subject spec resolution: `resolve_subject(spec, image)` turns a spec into a `Subject`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropper_engine.engine.subject.detectors import (
    DETECT_SIDE,
    INSTALL_HINT,
    Face,
    _pil,
    _small,
    _why,
    detect_faces,
    detect_persons,
    face_detector,
    person_detector,
    salient_mask,
)
from cropper_engine.engine.subject.outlines import _bbox, _box_polys, _mask_of_boxes, _outline, _upsample
from cropper_engine.errors import BackendUnavailableError
from cropper_engine.types import Box, SubjectSpec, parse_subject

FOCAL_FRACTION = 0.10  # a focal point becomes a square of this share of the shorter side


# --- results ----------------------------------------------------------------------------


@dataclass
class Subject:
    """What `resolve_subject` found: the mask is None only for a faces-only look-up."""

    kind: str | None  # face | person | saliency | point | box | mask (the source used)
    requested: str | None  # the spec's kind (auto, face, ...), None for a faces-only look-up
    mask: np.ndarray | None
    box: Box | None
    faces: list[Face] = field(default_factory=list)
    persons: list[Box] = field(default_factory=list)
    focal_points: list[tuple[float, float]] = field(default_factory=list)
    outline: list[list[list[int]]] = field(default_factory=list)  # polygons of the mask, for drawing
    notes: list[str] = field(default_factory=list)
    detectors: dict[str, str] = field(default_factory=dict)
    keep_faces: bool = False
    ms: dict[str, float] = field(default_factory=dict)

    def to_extra(self) -> dict[str, Any]:
        """The keys a result row carries (results.jsonl, the server's answer, the report)."""
        out: dict[str, Any] = {}
        if self.kind:
            out["subject"] = self.kind
        if self.requested and self.requested != self.kind:
            out["subject_requested"] = self.requested
        if self.focal_points:
            out["focal_points"] = [[round(x, 1), round(y, 1)] for x, y in self.focal_points]
        if self.outline:
            out["subject_outline"] = self.outline
        if self.detectors:
            out["faces"] = [_face_extra(f) for f in self.faces]
            if self.persons:
                out["persons"] = [b.as_int() for b in self.persons]
            out["detectors"] = dict(self.detectors)
        out["keep_faces"] = self.keep_faces
        return out


def _face_extra(f: Face) -> dict[str, Any]:
    """A face in a result row: its box and confidence; where ranked, its rank, whether it is a
    main face, and why a detection is not taken for a face."""
    out: dict[str, Any] = {"box": f.box.as_int(), "score": round(f.score, 3)}
    if f.rank_score is not None:
        out["rank"] = round(f.rank_score, 3)
        out["main"] = bool(f.main)
    if f.why:
        out["not_a_face"] = f.why
    return out



def resolve_subject(spec: SubjectSpec | str | None, image: Any, keep_faces: bool | None = None) -> Subject:
    """The subject of a decoded image (a LoadedImage or PIL image) for a spec; with spec None,
    only the faces to keep whole (`keep_faces`). `keep_faces` None: on for auto and face.

    Raises InputError for a point outside the image, a box that misses it, a bad mask (wrong
    size, empty, unreadable: the messages of `load_mask`); BackendUnavailableError for `face` /
    `person` without a detector."""
    from cropper_engine.imageio import load_mask

    spec = parse_subject(spec)
    img = _pil(image)
    w, h = img.size
    keep = bool(keep_faces) if keep_faces is not None else (spec is not None and spec.kind in ("auto", "face"))
    sub = Subject(None, spec.kind if spec else None, None, None, keep_faces=keep)
    t0 = time.perf_counter()

    if spec is not None and spec.kind == "mask":
        mask = load_mask(spec.mask if spec.mask is not None else spec.path, (w, h))
        sub.kind, sub.mask = "mask", mask
    elif spec is not None and spec.kind == "point":
        spec.check(w, h)
        x, y = spec.values
        r = max(1.0, FOCAL_FRACTION * min(w, h) / 2)
        box = Box(x - r, y - r, x + r, y + r).clamp(w, h)
        sub.kind, sub.focal_points = "point", [(x, y)]
        sub.mask = _mask_of_boxes([box], w, h)
    elif spec is not None and spec.kind == "box":
        spec.check(w, h)
        box = Box(*spec.values)
        clipped = box.clamp(w, h)
        if clipped.as_list() != box.as_list():
            sub.notes.append(f"subject box clipped to the {w}x{h} image")
        sub.kind, sub.mask = "box", _mask_of_boxes([clipped], w, h)

    wants_faces = keep or (spec is not None and spec.kind in ("auto", "face"))
    small = None
    if wants_faces or (spec is not None and spec.kind == "person"):
        small = _small(img, DETECT_SIDE)
    if wants_faces:
        det = face_detector()
        if det is None:
            if (spec is not None and spec.kind == "face") or keep_faces:
                raise BackendUnavailableError(f"face detection is not installed here; install it with: {INSTALL_HINT}")
            sub.notes.append(f"no face detector here ({_why.get('face', 'not installed')}): "
                             f"faces not looked for; {INSTALL_HINT}")
        else:
            t = time.perf_counter()
            sub.faces = detect_faces(img, det, small)
            sub.ms["faces"] = (time.perf_counter() - t) * 1000
            sub.detectors["faces"] = det.name
    faces = [f for f in sub.faces if not f.why]  # the detections taken for faces (faces.not_a_face)
    if spec is not None and spec.kind in ("auto", "face") and faces:
        sub.kind, sub.mask = "face", _mask_of_boxes([f.keep for f in faces], w, h)
        sub.outline = _box_polys([f.keep for f in faces])  # the mask: the faces with their margins
        n = len(faces)
        sub.notes.append(f"subject: {n} face{'s' if n > 1 else ''} ({sub.detectors['faces']})")
    elif spec is not None and spec.kind in ("auto", "person", "face"):
        if len(faces) < len(sub.faces):
            sub.notes.append("not taken for a face: " + "; ".join(f"{f.box.as_int()} ({f.why})" for f in sub.faces))
        if spec.kind == "face":
            sub.notes.append("no face found: the subject is the salient region")
        else:
            det_p = person_detector()
            if det_p is None:
                if spec.kind == "person":
                    raise BackendUnavailableError(f"person detection is not installed here; install it with: "
                                                  f"{INSTALL_HINT}")
                sub.notes.append(f"no person detector here ({_why.get('person', 'not installed')}): "
                                 "the subject is the salient region")
            else:
                t = time.perf_counter()
                boxes, pmask = detect_persons(img, det_p, small)
                sub.ms["persons"] = (time.perf_counter() - t) * 1000
                sub.detectors["persons"] = det_p.name
                sub.detectors.setdefault("faces", getattr(face_detector(), "name", None) or "none")
                if boxes and pmask is not None:
                    sub.persons = boxes
                    sub.kind, sub.mask = "person", _upsample(pmask, (w, h))
                    sh, sw = pmask.shape
                    sub.outline = _outline(pmask, w / sw, h / sh)
                    sub.notes.append(f"subject: {len(boxes)} person{'s' if len(boxes) > 1 else ''} "
                                     f"({det_p.name})")
                else:
                    sub.notes.append("no face or person found: the subject is the salient region"
                                     if spec.kind == "auto" else "no person found: the subject is the salient region")
    if spec is not None and (spec.kind == "saliency" or sub.mask is None):
        t = time.perf_counter()
        sm = salient_mask(img)
        sh, sw = sm.shape
        sub.kind, sub.mask = "saliency", _upsample(sm, (w, h))
        sub.outline = _outline(sm, w / sw, h / sh)
        sub.ms["saliency"] = (time.perf_counter() - t) * 1000
        if not sub.mask.any():  # pragma: no cover - salient_mask is never empty
            sub.mask[h // 4: h - h // 4, w // 4: w - w // 4] = True
    if sub.kind == "mask" and sub.mask is not None and not sub.outline:
        m = sub.mask
        step = max(1, max(w, h) // 256)
        small_m = m[::step, ::step]
        sub.outline = _outline(small_m, m.shape[1] / small_m.shape[1], m.shape[0] / small_m.shape[0])
    if sub.kind == "box" and sub.mask is not None:
        sub.outline = _box_polys([_bbox(sub.mask)])
    if sub.mask is not None:
        sub.box = _bbox(sub.mask)
    sub.ms["total"] = (time.perf_counter() - t0) * 1000
    return sub


