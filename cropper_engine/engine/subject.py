"""Subjects without a hand-made mask: faces, persons, the salient region, a focal point or a box.

`--subject` (a `CropRequest.subject`) names where the subject of the subject-aware task comes from:

  auto              faces when any are found, else persons, else the salient region
  face | person     the detected faces (all of them) / persons
  saliency          the salient region (weight-free: contrast with the image border + a centre prior)
  X,Y               a focal point, in pixels of the upright image: a square of side
                    FOCAL_FRACTION (10 %) of the image's shorter side centred on it
  X1,Y1,X2,Y2       a box, in pixels
  PATH              a mask image (white = subject) of the image's size, as `--mask`

`resolve_subject(spec, image)` turns a spec into a `Subject`: a boolean mask of the image's size,
its box, which source was used (`kind`), the faces found and notes saying what happened.
Detection runs on a copy whose longest side is DETECT_SIDE (512) px.

Detectors sit behind two tiny protocols (`FaceDetector`, `PersonDetector`). The real ones come
from MediaPipe's legacy solutions, whose weights ship inside its wheel (the `subject` extra):
BlazeFace full range + short range for faces, the BlazePose detector gating the selfie
segmentation for persons. Without MediaPipe, faces come from OpenCV's Haar cascade where an
OpenCV build ships its XML (4.x wheels do, 5.x do not), else from nothing: `auto` then uses the
salient region and says so; an explicit `face` / `person` is refused with the install command.

Keeping faces whole (`keep_faces_whole`): a crop that cuts through a face (overlaps it without
containing it) is either grown, at its ratio, to contain the face, or shrunk to leave it out,
whichever is closer (IoU) to the crop as proposed; a repair never gives up the subject box. When
no repair exists the crop is grown around the largest face, and `face_cut_note` says so. A face
is kept with a margin (FACE_MARGIN: 10 % of its size left, right and below, 25 % above for the
forehead and hair the detector leaves out) where the crop's ratio leaves room for it, else as
detected.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cropper_engine.errors import BackendUnavailableError
from cropper_engine.types import FORMS, Box, SubjectSpec, parse_subject

DETECT_SIDE = 512  # detection runs on a copy with this longest side, px
SALIENCY_SIDE = 96  # the salient region is found at this longest side, px
FOCAL_FRACTION = 0.10  # a focal point becomes a square of this share of the shorter side
FACE_MIN_SCORE = 0.5
FACE_MIN_FRACTION = 0.015  # faces smaller than this share of the shorter side are ignored
FACE_MARGIN = (0.10, 0.25, 0.10, 0.10)  # left, top, right, bottom, as shares of the face's size
PERSON_MIN_SCORE = 0.5
MAX_FACES = 16  # a crowd: only the largest faces are kept whole
MAIN_FACE_SHARE = 0.5  # a face at least this share of the largest face's side is a main face: always inside
MAIN_PERSON_SHARE = 0.5  # the same for persons (side: square root of the box's area)
CUT_PAD = 2.0  # px: a kept face is padded by this, so rounding a crop to whole pixels never cuts it
INSTALL_HINT = "pip install 'cropper-engine[subject]' (MediaPipe, whose wheel ships the detectors' weights)"

# --- results ----------------------------------------------------------------------------


@dataclass
class Face:
    box: Box  # as detected, pixels of the full image
    score: float
    keep: Box  # with FACE_MARGIN, clipped to the image: what a crop should keep whole

    @property
    def area(self) -> float:
        return self.box.area


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
            out["faces"] = [{"box": f.box.as_int(), "score": round(f.score, 3)} for f in self.faces]
            if self.persons:
                out["persons"] = [b.as_int() for b in self.persons]
            out["detectors"] = dict(self.detectors)
        out["keep_faces"] = self.keep_faces
        return out


# --- detectors --------------------------------------------------------------------------


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        """Faces in an RGB uint8 array: boxes in its pixels, with scores in 0..1."""
        ...


class PersonDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> tuple[list[tuple[Box, float]], np.ndarray | None]:
        """Persons: boxes in the array's pixels with scores, and a probability map (H x W, 0..1) or None."""
        ...


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ logging MediaPipe / TFLite write straight to file descriptor 2."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _clip(box: Box, w: float, h: float) -> Box:
    return box.clamp(w, h)


class MediaPipeFaces:
    """BlazeFace: the full-range model (faces up to ~5 m), plus the short-range one for close-ups."""

    name = "mediapipe"

    def __init__(self) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        with _quiet_stderr():
            import mediapipe as mp

            fd = mp.solutions.face_detection
            self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=FACE_MIN_SCORE)
            self._short = fd.FaceDetection(model_selection=0, min_detection_confidence=FACE_MIN_SCORE)
            blank = np.zeros((64, 64, 3), np.uint8)
            self._full.process(blank)
            self._short.process(blank)
        self._lock = threading.Lock()

    @staticmethod
    def _boxes(result: Any, w: int, h: int) -> list[tuple[Box, float]]:
        out = []
        for d in result.detections or []:
            rb = d.location_data.relative_bounding_box
            box = _clip(Box(rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h), w, h)
            if box.is_valid():
                out.append((box, float(d.score[0])))
        return out

    def detect(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        h, w = rgb.shape[:2]
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            full = self._boxes(self._full.process(arr), w, h)
            short = self._boxes(self._short.process(arr), w, h)
        # a close-up face the full-range model missed; where both found it, the full-range box
        return full + [(b, s) for b, s in short if all(b.iou(f) < 0.3 for f, _ in full)]


class MediaPipePersons:
    """BlazePose's person detector says where people are (also seen from behind); the selfie
    segmentation, kept only around those detections, gives their outline."""

    name = "mediapipe"

    def __init__(self) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        with _quiet_stderr():
            import mediapipe as mp
            from google.protobuf import text_format
            from mediapipe.framework import calculator_pb2
            from mediapipe.python.solution_base import SolutionBase

            graph = text_format.Parse(
                'input_stream: "image" output_stream: "detections" '
                'node { calculator: "PoseDetectionCpu" input_stream: "IMAGE:image" '
                'output_stream: "DETECTIONS:detections" }', calculator_pb2.CalculatorGraphConfig())
            self._pose = SolutionBase(graph_config=graph, outputs=["detections"])
            self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            blank = np.zeros((64, 64, 3), np.uint8)
            self._pose.process({"image": blank})
            self._seg.process(blank)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> tuple[list[tuple[Box, float]], np.ndarray | None]:
        h, w = rgb.shape[:2]
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            dets = self._pose.process({"image": arr}).detections or []
            people = []
            for d in dets:
                score = float(d.score[0])
                kp = d.location_data.relative_keypoints
                if score < PERSON_MIN_SCORE or len(kp) < 2:
                    continue
                # keypoint 0: the hips' centre; keypoint 1 lies on the circle around the whole body
                cx, cy = kp[0].x * w, kp[0].y * h
                r = math.hypot((kp[1].x - kp[0].x) * w, (kp[1].y - kp[0].y) * h)
                box = _clip(Box(cx - r, cy - r, cx + r, cy + r), w, h)
                if box.is_valid():
                    people.append((box, score))
            if not people:
                return [], None
            prob = np.asarray(self._seg.process(arr).segmentation_mask, dtype=np.float32)
        return people, prob


class HaarFaces:
    """OpenCV's frontal-face Haar cascade: the fallback where MediaPipe is missing and OpenCV
    ships the cascade files (the 4.x wheels; 5.x wheels do not)."""

    name = "opencv-haar"

    def __init__(self, path: str) -> None:
        import cv2

        self._cv2 = cv2
        self._clf = cv2.CascadeClassifier(path)
        if self._clf.empty():
            raise OSError(f"cannot load {path}")
        self._lock = threading.Lock()

    @staticmethod
    def find() -> str | None:
        try:
            import cv2
        except ImportError:
            return None
        base = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if not base or not hasattr(cv2, "CascadeClassifier"):
            return None
        path = os.path.join(base, "haarcascade_frontalface_default.xml")
        return path if os.path.exists(path) else None

    def detect(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        cv2 = self._cv2
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        side = max(12, int(FACE_MIN_FRACTION * min(grey.shape) * 2))
        with self._lock:
            faces = self._clf.detectMultiScale(grey, scaleFactor=1.15, minNeighbors=5, minSize=(side, side))
        return [(Box(float(x), float(y), float(x + fw), float(y + fh)), 1.0) for x, y, fw, fh in faces]


_UNSET: Any = object()
_lock = threading.Lock()
_face_detector: Any = _UNSET
_person_detector: Any = _UNSET
_why: dict[str, str] = {}


def face_detector() -> FaceDetector | None:
    """The face detector (built once): MediaPipe, else OpenCV's Haar cascade, else None."""
    global _face_detector
    with _lock:
        if _face_detector is _UNSET:
            try:
                _face_detector = MediaPipeFaces()
            except Exception as exc:  # ImportError, or a broken install
                _why["face"] = f"MediaPipe unavailable ({type(exc).__name__}: {exc})"
                path = HaarFaces.find()
                try:
                    _face_detector = HaarFaces(path) if path else None
                except Exception:
                    _face_detector = None
        return _face_detector


def person_detector() -> PersonDetector | None:
    """The person detector (built once): MediaPipe, else None."""
    global _person_detector
    with _lock:
        if _person_detector is _UNSET:
            try:
                _person_detector = MediaPipePersons()
            except Exception as exc:
                _why["person"] = f"MediaPipe unavailable ({type(exc).__name__}: {exc})"
                _person_detector = None
        return _person_detector


def set_detectors(faces: Any = _UNSET, persons: Any = _UNSET) -> None:
    """Replace the detectors (tests, another backend); None means none. `reset_detectors()`
    goes back to the built-in choice."""
    global _face_detector, _person_detector
    with _lock:
        if faces is not _UNSET:
            _face_detector = faces
        if persons is not _UNSET:
            _person_detector = persons


def reset_detectors() -> None:
    """Forget the detectors: the next use builds them again."""
    global _face_detector, _person_detector
    with _lock:
        _face_detector = _person_detector = _UNSET
        _why.clear()


def detectors_available() -> dict[str, str | None]:
    """Which detector serves faces and persons here (None: none)."""
    f, p = face_detector(), person_detector()
    return {"face": getattr(f, "name", None), "person": getattr(p, "name", None)}


def require_detectors(spec: SubjectSpec | None, keep_faces: bool | None = None) -> None:
    """Raise at once (before a batch starts) when a spec or --keep-faces needs a detector this
    machine does not have; `auto` never does (it falls back to the salient region)."""
    if ((spec is not None and spec.kind == "face") or keep_faces) and face_detector() is None:
        raise BackendUnavailableError(f"face detection is not installed here ({_why.get('face', '')}); "
                                      f"install it with: {INSTALL_HINT}")
    if spec is not None and spec.kind == "person" and person_detector() is None:
        raise BackendUnavailableError(f"person detection is not installed here ({_why.get('person', '')}); "
                                      f"install it with: {INSTALL_HINT}")


# --- images -----------------------------------------------------------------------------


def _pil(image: Any) -> Any:
    img = getattr(image, "image", image)  # a LoadedImage or a PIL image
    if isinstance(img, np.ndarray):
        from PIL import Image

        img = Image.fromarray(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _small(img: Any, side: int) -> tuple[np.ndarray, float]:
    """An RGB array with longest side <= `side`, and the factor from its pixels to the image's."""
    from PIL import Image

    w, h = img.size
    s = min(1.0, side / max(w, h))
    if s >= 1.0:
        return np.asarray(img, dtype=np.uint8), 1.0
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    # reduce by an integer factor first (a fast box filter), then resize the rest
    k = int(1 / s)
    small = img.reduce(k) if k >= 2 else img
    small = small.resize((tw, th), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8), w / tw


def _grow_face(box: Box, w: float, h: float) -> Box:
    ml, mt, mr, mb = FACE_MARGIN
    fw, fh = box.width, box.height
    return _clip(Box(box.x1 - ml * fw, box.y1 - mt * fh, box.x2 + mr * fw, box.y2 + mb * fh), w, h)


def detect_faces(image: Any, detector: FaceDetector | None = None,
                 small: tuple[np.ndarray, float] | None = None) -> list[Face]:
    """Faces in a decoded image (largest first), in its pixels; [] without a detector."""
    det = detector if detector is not None else face_detector()
    if det is None:
        return []
    img = _pil(image)
    w, h = img.size
    arr, f = small if small is not None else _small(img, DETECT_SIDE)
    faces = []
    for box, score in det.detect(arr):
        b = _clip(box.scale(f), w, h)
        if score < FACE_MIN_SCORE or min(b.width, b.height) < FACE_MIN_FRACTION * min(w, h):
            continue
        faces.append(Face(b, float(score), _grow_face(b, w, h)))
    faces.sort(key=lambda fc: -fc.area)
    return faces


def detect_persons(image: Any, detector: PersonDetector | None = None,
                   small: tuple[np.ndarray, float] | None = None) -> tuple[list[Box], np.ndarray | None]:
    """Person boxes (image pixels) and a mask at the small size, or ([], None)."""
    det = detector if detector is not None else person_detector()
    if det is None:
        return [], None
    img = _pil(image)
    w, h = img.size
    arr, f = small if small is not None else _small(img, DETECT_SIDE)
    people, prob = det.detect(arr)
    if not people:
        return [], None
    sh, sw = arr.shape[:2]
    region = np.zeros((sh, sw), bool)
    for b, _ in people:
        bb = b.clamp(sw, sh)
        region[int(bb.y1):int(math.ceil(bb.y2)), int(bb.x1):int(math.ceil(bb.x2))] = True
    mask = region & (prob > 0.5) if prob is not None and prob.shape == region.shape else region
    if mask.sum() < 0.002 * mask.size:  # the segmentation saw nobody there: the detections' boxes
        mask = region
    boxes = []
    from scipy import ndimage

    lab, _ = ndimage.label(mask)
    for sl in ndimage.find_objects(lab):
        if sl is None:
            continue
        ys, xs = sl
        b = Box(xs.start * f, ys.start * f, xs.stop * f, ys.stop * f).clamp(w, h)
        if b.area >= 0.002 * w * h:
            boxes.append(b)
    boxes.sort(key=lambda b: -b.area)
    return boxes, mask


def salient_mask(image: Any) -> np.ndarray:
    """The salient region at SALIENCY_SIDE px (bool): Lab colour distance from the image border's
    main colours (k-means), weighted by a centre prior, thresholded; the components that hold
    most of the saliency. Never empty."""
    import cv2
    from scipy import ndimage

    img = _pil(image)
    arr, _ = _small(img, SALIENCY_SIDE)
    h, w = arr.shape[:2]
    if h < 4 or w < 4:
        return np.ones((h, w), bool)
    lab = cv2.GaussianBlur(cv2.cvtColor(arr.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab), (3, 3), 0)
    b = max(2, round(0.05 * min(h, w)))
    ring = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                           lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)]).astype(np.float32)
    k = min(8, len(ring))
    cv2.setRNGSeed(0)
    _, labels, centres = cv2.kmeans(ring, k, None, (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, 20, 0.5),
                                    2, cv2.KMEANS_PP_CENTERS)
    counts = np.bincount(labels.ravel(), minlength=k)
    centres = centres[counts >= 0.03 * len(ring)]
    dist = np.sqrt(((lab[:, :, None, :] - centres[None, None]) ** 2).sum(-1)).min(-1)
    yy, xx = np.mgrid[0:h, 0:w]
    prior = np.exp(-(((xx + 0.5) / w - 0.5) ** 2 + ((yy + 0.5) / h - 0.5) ** 2) / (2 * 0.3 ** 2))
    m = ndimage.gaussian_filter(dist * (0.5 + 0.5 * prior), 1.0)
    if m.max() <= 1e-9:  # a flat image: the centre
        out = np.zeros((h, w), bool)
        out[h // 4: h - h // 4, w // 4: w - w // 4] = True
        return out
    m = m / m.max()
    t = max(float(m.mean() + 0.5 * m.std()), 0.35)
    lab_, n = ndimage.label(m > t)
    if n == 0:
        return m >= m.max()
    mass = np.asarray(ndimage.sum(m, lab_, index=range(1, n + 1)))
    keep = [i + 1 for i in range(n) if mass[i] >= 0.25 * mass.max()]
    return np.isin(lab_, keep)


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
    if spec is not None and spec.kind in ("auto", "face") and sub.faces:
        boxes = [f.box for f in sub.faces]
        sub.kind, sub.mask = "face", _mask_of_boxes([f.keep for f in sub.faces], w, h)
        sub.outline = _box_polys([f.keep for f in sub.faces])  # the mask: the faces with their margins
        n = len(boxes)
        sub.notes.append(f"subject: {n} face{'s' if n > 1 else ''} ({sub.detectors['faces']})")
    elif spec is not None and spec.kind in ("auto", "person", "face"):
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


# --- keeping faces whole ----------------------------------------------------------------


def _overlap(a: Box, b: Box) -> tuple[float, float]:
    return (min(a.x2, b.x2) - max(a.x1, b.x1), min(a.y2, b.y2) - max(a.y1, b.y1))


def cuts(crop: Box, face: Box, tol: float = 0.5) -> bool:
    """Whether a crop cuts through a face: they overlap (by more than `tol` px both ways) and
    the crop does not contain the face (within `tol`)."""
    ox, oy = _overlap(crop, face)
    return ox > tol and oy > tol and not crop.contains(face, tol=tol)


def fits(inner: Box, ratio: float | None, width: float, height: float) -> bool:
    """Whether a crop of `ratio` (or any crop) inside the image can contain `inner`."""
    if ratio is None:
        return inner.width <= width + 1e-6 and inner.height <= height + 1e-6
    max_w = min(float(width), height * ratio)
    return inner.width <= max_w + 1e-6 and inner.height <= max_w / ratio + 1e-6


def _pad(box: Box, w: float, h: float) -> Box:
    return Box(box.x1 - CUT_PAD, box.y1 - CUT_PAD, box.x2 + CUT_PAD, box.y2 + CUT_PAD).clamp(w, h)


def _side(b: Box) -> float:
    return math.sqrt(max(b.area, 0.0))


@dataclass(frozen=True)
class KeptFace(Box):
    """A face a crop keeps whole (with its margin where the ratio has room for it); a `main` face
    must also be inside every crop (`keep_faces_whole` grows a crop around the main faces)."""

    main: bool = False
    detected: Box | None = None  # the face as detected (padded by CUT_PAD): kept instead when the margin is in the way


def main_face_indices(faces: Sequence[Face]) -> list[int]:
    """The main faces (largest first): the largest, every face whose side is at least
    MAIN_FACE_SHARE of its side, and every smaller face lying between them (its centre inside
    their bounding box). The others are small faces a crop may leave out (passers-by)."""
    if not faces:
        return []
    big = _side(faces[0].box)
    main = [i for i, f in enumerate(faces) if _side(f.box) >= MAIN_FACE_SHARE * big - 1e-9]
    u = _union([faces[i].box for i in main])
    for i, f in enumerate(faces):
        cx, cy = f.box.center
        if i not in main and u.x1 <= cx <= u.x2 and u.y1 <= cy <= u.y2:
            main.append(i)
    return sorted(main)


def faces_to_keep(faces: Sequence[Face], ratio: float | None, width: float, height: float) -> list[KeptFace]:
    """The boxes a crop of this ratio keeps whole: each face with its margin where a crop of
    the ratio can hold that, else as detected (padded by CUT_PAD px). The main faces
    (`main_face_indices`) are marked `main` as long as one crop of the ratio can hold them all,
    largest first: a main face that does not fit beside the larger ones is only kept whole."""
    faces = list(faces[:MAX_FACES])  # largest first
    boxes = []
    for f in faces:
        k = _pad(f.keep, width, height)
        boxes.append(k if fits(k, ratio, width, height) else _pad(f.box, width, height))
    main: list[int] = []
    core: Box | None = None
    for i in main_face_indices(faces):
        raw = _pad(faces[i].box, width, height)
        for b in (boxes[i], raw):  # with its margin, else as detected
            u = b if core is None else _union([core, b])
            if fits(u, ratio, width, height):
                core, boxes[i] = u, b
                main.append(i)
                break
        else:  # the faces so far without their margins, then this one beside them
            raws = [_pad(faces[j].box, width, height) for j in main]
            if main and fits(_union([*raws, raw]), ratio, width, height):
                for j, r in zip(main, raws, strict=True):
                    boxes[j] = r
                boxes[i] = raw
                main.append(i)
                core = _union([*raws, raw])
    return [KeptFace(b.x1, b.y1, b.x2, b.y2, i in main, _pad(faces[i].box, width, height)) for i, b in enumerate(boxes)]


def _union(boxes: Sequence[Box]) -> Box:
    return Box(min(b.x1 for b in boxes), min(b.y1 for b in boxes), max(b.x2 for b in boxes), max(b.y2 for b in boxes))


def _inside_with_ratio(region: Box, ratio: float | None, prefer: Box, required: Box | None = None) -> Box | None:
    """The largest box of `ratio` inside `region`, as near `prefer`'s centre as it can be while
    it holds `required` (where it can)."""
    if not region.is_valid():
        return None
    if ratio is None:
        return region
    w = min(region.width, region.height * ratio)
    h = w / ratio
    cx, cy = prefer.center

    def place(c: float, size: float, lo: float, hi: float, need_lo: float | None, need_hi: float | None) -> float:
        a, b = lo, hi - size  # where the box may start inside the region
        if need_lo is not None and need_hi is not None:  # and where it holds the required span
            a2, b2 = max(a, need_hi - size), min(b, need_lo)
            if a2 <= b2 + 1e-9:
                a, b = a2, b2
        return min(max(c - size / 2, a), b)

    rq = required
    x1 = place(cx, w, region.x1, region.x2, rq.x1 if rq else None, rq.x2 if rq else None)
    y1 = place(cy, h, region.y1, region.y2, rq.y1 if rq else None, rq.y2 if rq else None)
    return Box(x1, y1, x1 + w, y1 + h)


def _valid(box: Box | None, faces: Sequence[Box], required: Box | None, min_w: float, min_h: float) -> bool:
    if box is None or not box.is_valid() or box.width < min_w - 1e-6 or box.height < min_h - 1e-6:
        return False
    if required is not None and not box.contains(required, tol=0.5):
        return False
    return not any(cuts(box, f) for f in faces)


def _grown(box: Box, faces: Sequence[Box], width: float, height: float, ratio: float | None) -> Box | None:
    from cropper_engine.engine.geometry import expand_to_contain

    b = box
    for _ in range(len(faces) + 1):
        cut = [f for f in faces if cuts(b, f)]
        if not cut:
            return b
        u = _union(cut)
        nb = expand_to_contain(b, u, width, height, ratio)
        if not nb.contains(u, tol=0.5):
            return None
        b = nb
    return None


def _shrunk(box: Box, faces: Sequence[Box], ratio: float | None, required: Box | None,
            min_w: float, min_h: float, depth: int = 0, origin: Box | None = None) -> Box | None:
    """The crop shrunk to leave out each face it cuts: cut at one of the face's four sides, then
    the same for the faces the smaller crop still cuts. All four sides are tried for the first
    face, the best one (IoU with the crop) for the next ones: at most 4 + 4 * 4 * len(faces) boxes."""
    origin = origin or box
    cut = [f for f in faces if cuts(box, f)]
    if not cut:
        return box
    if depth > len(faces):
        return None
    f = max(cut, key=lambda c: c.area)
    options = []
    for region in (Box(box.x1, box.y1, min(box.x2, f.x1), box.y2), Box(max(box.x1, f.x2), box.y1, box.x2, box.y2),
                   Box(box.x1, box.y1, box.x2, min(box.y2, f.y1)), Box(box.x1, max(box.y1, f.y2), box.x2, box.y2)):
        cand = _inside_with_ratio(region, ratio, box, required)
        if cand is None or cand.width < min_w - 1e-6 or cand.height < min_h - 1e-6:
            continue
        if required is not None and not cand.contains(required, tol=0.5):
            continue
        options.append(cand)
    options.sort(key=lambda c: -c.iou(origin))
    best, best_iou = None, -1.0
    for cand in options if depth == 0 else options[:1]:
        out = _shrunk(cand, faces, ratio, required, min_w, min_h, depth + 1, origin)
        if out is not None and out.iou(origin) > best_iou:
            best, best_iou = out, out.iou(origin)
    return best


def keep_faces_whole(box: Box, faces: Sequence[Box], width: float, height: float, ratio: float | None,
                     required: Box | None = None, min_w: float = 2.0, min_h: float = 2.0) -> tuple[Box, bool]:
    """A crop that cuts through none of `faces` and holds the main ones: `box` grown first to
    contain the faces marked `main` (KeptFace, with `required` beside them when one crop of the
    ratio holds both), then grown to contain the other faces it cuts or shrunk to leave them
    out, whichever is closer to that box; the main faces and `required` (the subject box) stay
    inside. When no repair exists: the box grown around the largest face it cuts (or kept, if
    that is impossible too), and False. A repair that exists only with the faces as detected
    (without their margins: KeptFace.detected) is taken before that."""
    box0, required0 = box, required
    mains = [f for f in faces if getattr(f, "main", False)]
    if mains:
        core = _union(mains)
        both = core if required is None else _union([core, required])
        need = both if fits(both, ratio, width, height) else (required if required is not None else core)
        if not box.contains(need, tol=0.5):
            from cropper_engine.engine.geometry import expand_to_contain

            box = expand_to_contain(box, need, width, height, ratio)
        required = need
    if not any(cuts(box, f) for f in faces):
        return box, True
    cands = [_grown(box, faces, width, height, ratio), _shrunk(box, faces, ratio, required, min_w, min_h)]
    ok = [c for c in cands if _valid(c, faces, required, min_w, min_h)]
    if ok:
        return max(ok, key=lambda c: c.iou(box)), True
    tight = [KeptFace(d.x1, d.y1, d.x2, d.y2, f.main) for f in faces
             if isinstance(f, KeptFace) and (d := f.detected) is not None]
    if len(tight) == len(faces) and any(t.as_list() != f.as_list() for t, f in zip(tight, faces, strict=True)):
        out, done = keep_faces_whole(box0, tight, width, height, ratio, required0, min_w, min_h)
        if done:
            return out, True
    from cropper_engine.engine.geometry import expand_to_contain

    largest = max((f for f in faces if cuts(box, f)), key=lambda f: f.area)
    if fits(largest, ratio, width, height):
        grown = expand_to_contain(box, largest, width, height, ratio)
        if required is None or grown.contains(required, tol=0.5):
            return grown, False
    return box, False


def _where(b: Box, width: float, height: float) -> str:
    cx, cy = b.center
    edge = min(cx, width - cx) < 0.2 * width or min(cy, height - cy) < 0.2 * height
    return "near the image's edge" if edge else "inside the frame"


def faces_left_out_note(crop: Box, faces: Sequence[Face], kept: Sequence[Box], ratio_text: str | None) -> str | None:
    """A note naming the detected faces a crop leaves out entirely, and why: small faces (under
    MAIN_FACE_SHARE of the largest face's side; passers-by), or main faces that no crop of the
    ratio holds beside the larger ones."""
    if not faces:
        return None
    main = set(main_face_indices(faces))
    marked = {i for i, k in enumerate(kept) if getattr(k, "main", False)}
    out = [i for i, f in enumerate(faces[:MAX_FACES]) if _overlap(crop, f.box)[0] <= 0.5 or
           _overlap(crop, f.box)[1] <= 0.5]
    if not out:
        return None
    what = f"a {ratio_text} crop" if ratio_text else "the crop"
    parts = []
    lost_main = [i for i in out if i in main]
    small = [i for i in out if i not in main]
    w = max(crop.x2, *(f.box.x2 for f in faces))
    h = max(crop.y2, *(f.box.y2 for f in faces))
    if lost_main:
        them = "them" if len(lost_main) > 1 else "it"
        why = f"cannot hold {them} beside the larger face" if any(i not in marked for i in lost_main) else \
            f"was chosen without {them}"
        parts.append(f"{len(lost_main)} main face{'s' if len(lost_main) > 1 else ''} "
                     f"({', '.join(str(faces[i].box.as_int()) for i in lost_main)}): {what} {why}")
    if small:
        where = sorted({_where(faces[i].box, w, h) for i in small})
        parts.append(f"{len(small)} small face{'s' if len(small) > 1 else ''} "
                     f"({', '.join(str(faces[i].box.as_int()) for i in small)}; under "
                     f"{MAIN_FACE_SHARE:.0%} of the largest face's size, {' or '.join(where)})")
    return "faces left out of the crop: " + "; ".join(parts)


def face_cut_note(crop: Box, faces: Sequence[Face], ratio_text: str | None) -> str | None:
    """A note when the chosen crop cuts a detected face (the ratio left no way round it)."""
    cut = [f for f in faces if cuts(crop, f.box)]
    if not cut:
        return None
    kept = [f for f in faces if crop.contains(f.box, tol=0.5)]
    what = f"a {ratio_text} crop" if ratio_text else "a crop"
    if kept and max(kept, key=lambda f: f.area) is faces[0]:
        return (f"{what} cannot keep all {len(faces)} faces whole: it keeps the largest face and cuts "
                f"{len(cut)} other{'s' if len(cut) > 1 else ''}")
    return f"{what} cannot keep the largest face whole: the face is cut"


def _greedy_fit(boxes: Sequence[Box], ratio: float | None, width: float, height: float) -> Box | None:
    """The union of `boxes` (largest first) taken in order while one crop of the ratio holds it."""
    core = None
    for b in boxes:
        u = b if core is None else _union([core, b])
        if fits(u, ratio, width, height):
            core = u
    return core


def job_subject_box(sub: Subject, ratio: float | None, width: float, height: float) -> tuple[Box | None, str | None]:
    """The subject box a crop of this ratio must contain. Faces or persons that do not fit one
    crop of the ratio together: the main ones (the largest and those at least half its size),
    as many as fit, largest first (with a note); the largest alone when even it does not fit."""
    if sub.box is None:
        return None, None
    if fits(sub.box, ratio, width, height):
        return sub.box, None
    if sub.kind == "face" and sub.faces:
        kept = faces_to_keep(sub.faces, ratio, width, height)
        main = [k for k in kept if k.main]
        if not main:
            return kept[0], None
        core = Box(*_union(main).as_list())
        n = len(sub.faces)
        if len(main) == n:  # all of them fit without their margins
            return core, None
        what = "the largest face" if len(main) == 1 else f"the {len(main)} largest faces"
        return core, f"the {n} faces do not fit one crop of this ratio: the subject is {what}"
    if sub.kind == "person" and sub.persons:
        big = _side(sub.persons[0])
        main = [b for b in sub.persons if _side(b) >= MAIN_PERSON_SHARE * big - 1e-9]
        core = _greedy_fit(main, ratio, width, height)
        if core is None:
            return sub.persons[0], None  # not even the largest fits: the crop is centred on it (note below)
        k = sum(1 for b in main if core.contains(b, tol=0.5))
        what = "the largest person" if k == 1 else f"the {k} largest persons"
        return core, f"the {len(sub.persons)} persons do not fit one crop of this ratio: the subject is {what}"
    return sub.box, None


def attach_subject(job: Any, sub: Subject) -> None:
    """Give a loop Job (engine/loop.py) its subject box, the faces to keep whole and the notes."""
    w, h = job.size
    ratio = job.ratio.value if job.ratio else None
    job.subject_info = sub
    job.notes[:0] = list(sub.notes)
    at = f"a {job.ratio} crop" if job.ratio else "a crop"
    if sub.box is not None and (job.mask is not None or job.ratio is not None):
        box, note = job_subject_box(sub, ratio, w, h)
        job.subject = box
        if note:
            job.notes.append(note)
        elif not fits(box, ratio, w, h):
            job.notes.append(f"the subject ({round(box.width)}x{round(box.height)} px) does not fit {at}: "
                             "the crop is centred on it")
    if sub.keep_faces and sub.faces:
        job.faces = faces_to_keep(sub.faces, ratio, w, h)
        if any(not fits(_pad(f.keep, w, h), ratio, w, h) for f in sub.faces):
            job.notes.append(f"{at} has no room for a face's margin (forehead, hair): the face is kept "
                             "whole as detected")


def result_extra(job: Any, crop: Box) -> dict[str, Any]:
    """The result row's subject keys for a job and its chosen crop; a note if the crop cuts a face."""
    sub: Subject = job.subject_info
    out = sub.to_extra()
    out["subject_ms"] = {k: round(v, 2) for k, v in sub.ms.items()}
    if job.faces:
        ratio_text = str(job.ratio) if job.ratio else None
        for note in (face_cut_note(crop.rounded(), sub.faces, ratio_text),
                     faces_left_out_note(crop.rounded(), sub.faces, job.faces, ratio_text)):
            if note:
                job.notes.append(note)
    return out


__all__ = [
    "DETECT_SIDE",
    "FACE_MARGIN",
    "FOCAL_FRACTION",
    "FORMS",
    "Face",
    "FaceDetector",
    "HaarFaces",
    "KeptFace",
    "MediaPipeFaces",
    "MediaPipePersons",
    "PersonDetector",
    "Subject",
    "SubjectSpec",
    "attach_subject",
    "cuts",
    "detect_faces",
    "detect_persons",
    "detectors_available",
    "face_cut_note",
    "face_detector",
    "faces_left_out_note",
    "faces_to_keep",
    "fits",
    "job_subject_box",
    "keep_faces_whole",
    "main_face_indices",
    "parse_subject",
    "person_detector",
    "require_detectors",
    "reset_detectors",
    "resolve_subject",
    "result_extra",
    "salient_mask",
    "set_detectors",
]
