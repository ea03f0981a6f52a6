"""The detectors: MediaPipe faces and persons, OpenCV's Haar cascade as the face fallback,
the weight-free salient region; built once per process behind `face_detector()` /
`person_detector()` (replaceable with `set_detectors`)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from cropper_engine.engine.subject.face_features import (
    _frontal as _frontal,  # tests import it from here
)
from cropper_engine.engine.subject.face_features import (
    _keypoints_ok as _keypoints_ok,  # tests import it from here
)
from cropper_engine.engine.subject.face_features import face_features, person_features
from cropper_engine.engine.subject.faces import Face
from cropper_engine.errors import BackendUnavailableError, ImageError
from cropper_engine.types import Box, SubjectSpec

DETECT_SIDE = 512  # detection runs on a copy with this longest side, px
SALIENCY_SIDE = 96  # the salient region is found at this longest side, px
FACE_MIN_SCORE = 0.5
FACE_MIN_FRACTION = 0.015  # faces smaller than this share of the shorter side are ignored
FACE_MARGIN = (0.10, 0.25, 0.10, 0.10)  # left, top, right, bottom, as shares of the face's size
PERSON_MIN_SCORE = 0.5
INSTALL_HINT = "pip install 'cropper-engine[subject]' (MediaPipe, whose wheel ships the detectors' weights)"


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


def same_face(outer: Box, face: Box) -> bool:
    """Whether `outer` (a short-range detection) is `face` found again: they overlap (IoU >= 0.3),
    or `outer` holds at least 70 % of it and is at most 25 times its area (a looser box around
    the face, often with the hair and the neck: FCDB has a dozen)."""
    return outer.iou(face) >= 0.3 or (outer.intersection(face) >= 0.7 * face.area and outer.area <= 25 * face.area)


class MediaPipeFaces:
    """BlazeFace: the full-range model (faces up to ~5 m), plus the short-range one for close-ups."""

    name = "mediapipe"

    def __init__(self) -> None:
        self._build()
        self._lock = threading.Lock()
        self.rebuilds = 0  # graphs rebuilt after an error (tests, logs)

    def _build(self) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        with _quiet_stderr():
            import mediapipe as mp

            for old in (getattr(self, "_full", None), getattr(self, "_short", None)):
                _close(old)
            fd = mp.solutions.face_detection
            self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=FACE_MIN_SCORE)
            self._short = fd.FaceDetection(model_selection=0, min_detection_confidence=FACE_MIN_SCORE)
            blank = np.zeros((64, 64, 3), np.uint8)
            self._full.process(blank)
            self._short.process(blank)

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
        if h < 1 or w < 1:  # MediaPipe's graph errors on it, and then on every later image
            return []
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            full, short = _run_graph(self, lambda: (self._boxes(self._full.process(arr), w, h),
                                                    self._boxes(self._short.process(arr), w, h)), w, h, "face")
        # a close-up face the full-range model missed; where both found it, the full-range box
        return full + [(b, s) for b, s in short if all(b.iou(f) < 0.3 for f, _ in full)]

    @staticmethod
    def _details(result: Any, w: int, h: int) -> list[tuple[Box, float, tuple[tuple[float, float], ...]]]:
        out = []
        for d in result.detections or []:
            rb = d.location_data.relative_bounding_box
            box = _clip(Box(rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h), w, h)
            kp = tuple((k.x * w, k.y * h) for k in d.location_data.relative_keypoints)
            if box.is_valid():
                out.append((box, float(d.score[0]), kp if len(kp) == 6 else ()))
        return out

    def detect_details(self, rgb: np.ndarray) -> list[tuple[Box, float, tuple[tuple[float, float], ...]]]:
        """As `detect`, with each face's six keypoints; a short-range box that holds most of a
        full-range face is that face seen again (larger), not a second face."""
        h, w = rgb.shape[:2]
        if h < 1 or w < 1:  # MediaPipe's graph errors on it, and then on every later image
            return []
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            full, short = _run_graph(self, lambda: (self._details(self._full.process(arr), w, h),
                                                    self._details(self._short.process(arr), w, h)), w, h, "face")
        return full + [d for d in short if not any(same_face(d[0], f) for f, _, _ in full)]


class MediaPipePersons:
    """BlazePose's person detector says where people are (also seen from behind); the selfie
    segmentation, kept only around those detections, gives their outline."""

    name = "mediapipe"

    def __init__(self) -> None:
        self._build()
        self._lock = threading.Lock()
        self.rebuilds = 0

    def _build(self) -> None:
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
            for old in (getattr(self, "_pose", None), getattr(self, "_seg", None)):
                _close(old)
            self._pose = SolutionBase(graph_config=graph, outputs=["detections"])
            self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            blank = np.zeros((64, 64, 3), np.uint8)
            self._pose.process({"image": blank})
            self._seg.process(blank)

    def detect(self, rgb: np.ndarray) -> tuple[list[tuple[Box, float]], np.ndarray | None]:
        h, w = rgb.shape[:2]
        if h < 1 or w < 1:
            return [], None
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            dets = _run_graph(self, lambda: self._pose.process({"image": arr}).detections or [], w, h, "person")
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
            prob = np.asarray(_run_graph(self, lambda: self._seg.process(arr).segmentation_mask, w, h, "person"),
                              dtype=np.float32)
        return people, prob

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """The selfie segmentation alone (H x W, 0..1: a person there), without the pose gate."""
        arr = np.ascontiguousarray(rgb)
        with self._lock:
            return np.asarray(self._seg.process(arr).segmentation_mask, dtype=np.float32)


def _close(solution: Any) -> None:
    close = getattr(solution, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):  # a graph that errored may refuse to close cleanly
            close()


def _run_graph(det: Any, run: Any, w: int, h: int, what: str) -> Any:
    """Run a MediaPipe graph; a graph that errors (RuntimeError "Graph has errors") refuses every
    later image, so it is rebuilt and the image tried once more; when that fails too, the graph is
    rebuilt again and the image (only it) gets an ImageError."""
    for attempt in (0, 1):
        try:
            return run()
        except RuntimeError as exc:
            det.rebuilds += 1
            det._build()
            if attempt:
                first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
                raise ImageError(f"{what} detection failed on this {w}x{h} image ({first}); crop it without "
                                 f"{what} detection (keep_faces=False / --keep-faces off)") from None
    return None  # pragma: no cover


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
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8), 1.0
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    # reduce by an integer factor first (a fast box filter), then resize the rest
    k = int(1 / s)
    small = img.reduce(k) if k >= 2 else img
    small = small.resize((tw, th), Image.Resampling.BILINEAR)
    if small.mode != "RGB":  # a grey or palette image (a detector reads three channels)
        small = small.convert("RGB")
    return np.asarray(small, dtype=np.uint8), w / tw


def _grow_face(box: Box, w: float, h: float) -> Box:
    ml, mt, mr, mb = FACE_MARGIN
    fw, fh = box.width, box.height
    return _clip(Box(box.x1 - ml * fw, box.y1 - mt * fh, box.x2 + mr * fw, box.y2 + mb * fh), w, h)


def detect_faces(image: Any, detector: FaceDetector | None = None,
                 small: tuple[np.ndarray, float] | None = None, rank: bool = True,
                 persons: Any = _UNSET) -> list[Face]:
    """Faces in a decoded image (largest first), in its pixels; [] without a detector. With
    `rank`, each face carries its `face_features` and its rank (faces.rank_faces: rank_score,
    main, why); `persons` (default: the person detector) gives the segmentation they may need."""
    det = detector if detector is not None else face_detector()
    if det is None:
        return []
    img = _pil(image)
    w, h = img.size
    arr, f = small if small is not None else _small(img, DETECT_SIDE)
    details = getattr(det, "detect_details", None)
    found = details(arr) if details is not None else [(b, s, ()) for b, s in det.detect(arr)]
    faces = []
    for box, score, kp in found:
        b = _clip(box.scale(f), w, h)
        if score < FACE_MIN_SCORE or min(b.width, b.height) < FACE_MIN_FRACTION * min(w, h):
            continue
        pts = tuple((x * f, y * f) for x, y in kp) if kp else None
        faces.append(Face(b, float(score), _grow_face(b, w, h), pts))
    faces.sort(key=lambda fc: -fc.area)
    if rank and faces:
        rank_detected(faces, arr, f, persons)
    return faces


def rank_detected(faces: list[Face], arr: np.ndarray, f: float, persons: Any = _UNSET) -> None:
    """The ranking's features of detected faces (`face_features`; `person_features` where
    faces.needs_segmentation says a check reads them, from `persons`' segmentation, default the
    person detector's), then their rank (faces.rank_faces), stored on each face."""
    from cropper_engine.engine.subject.faces import needs_segmentation, rank_faces

    face_features(faces, arr, f)
    if needs_segmentation(faces):
        pdet = person_detector() if persons is _UNSET else persons
        seg = getattr(pdet, "segment", None)
        if seg is not None:
            person_features(faces, seg(arr), f)
    rank_faces(faces)


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
