"""Pure data types: boxes, aspect ratios, tasks, requests, candidates and results.

Boxes live in pixel space (floats, half-open: x2 and y2 are the right and bottom edges).
The paper's prompt convention normalises each axis to integers 1..1000, where 1 is the
left / top edge and 1000 the right / bottom edge; `Box.to_norm` and `Box.from_norm` convert.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cropper_engine.errors import InputError

NORM_LO = 1
NORM_HI = 1000


class Task(StrEnum):
    FREE = "free"
    SUBJECT = "subject"
    RATIO = "ratio"

    @classmethod
    def parse(cls, value: str | Task) -> Task:
        if isinstance(value, Task):
            return value
        key = str(value).strip().lower()
        aliases = {"free-form": "free", "freeform": "free", "subject-aware": "subject",
                   "aspect": "ratio", "aspect-ratio": "ratio"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            from cropper_engine.errors import InputError

            raise InputError(
                f"unknown task {value!r}; choose one of: free, subject, ratio"
            ) from None


@dataclass(frozen=True)
class Ratio:
    """An aspect ratio W:H with positive integer or decimal terms."""

    w: float
    h: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.w) and math.isfinite(self.h)) or self.w <= 0 or self.h <= 0:
            from cropper_engine.errors import InputError

            raise InputError(f"aspect ratio {self.w}:{self.h} must have two positive terms, e.g. 4:3")

    @property
    def value(self) -> float:
        return self.w / self.h

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        return f"{fmt(self.w)}:{fmt(self.h)}"

    @classmethod
    def parse(cls, text: str | Ratio | float) -> Ratio:
        """Parse 'W:H' (also 'WxH' or 'W/H'), or a number (width / height); raise InputError
        naming the problem. Terms must be positive and the ratio no more extreme than 20:1."""
        if isinstance(text, Ratio):
            return text
        from cropper_engine.errors import InputError

        if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
            raise InputError(f"bad aspect ratio {text!r}: write it as 'W:H' (e.g. '16:9') or a number "
                             "(width / height, e.g. 1.5)")
        if not isinstance(text, str):
            v = float(text)
            if not math.isfinite(v) or v <= 0:
                raise InputError(f"bad aspect ratio {text!r}: a ratio as a number is width / height and must be "
                                 "positive, e.g. 1.5 (or write 'W:H', e.g. '3:2')")
            if max(v, 1 / v) > MAX_RATIO:
                raise InputError(f"bad aspect ratio {text!r}: more extreme than {MAX_RATIO:g}:1 "
                                 f"(width / height must be within 1/{MAX_RATIO:g} .. {MAX_RATIO:g})")
            return cls(v, 1.0)
        raw = str(text).strip()
        for sep in (":", "x", "X", "/"):
            if sep in raw:
                a, _, b = raw.partition(sep)
                break
        else:
            raise InputError(f"bad aspect ratio {raw!r}: write it as W:H, e.g. 16:9 or 1:1")
        try:
            w, h = float(a), float(b)
        except ValueError:
            raise InputError(f"bad aspect ratio {raw!r}: write it as W:H with numbers, e.g. 4:3") from None
        if not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
            raise InputError(f"bad aspect ratio {raw!r}: both terms must be positive, e.g. 3:2")
        if max(w / h, h / w) > MAX_RATIO:
            raise InputError(f"bad aspect ratio {raw!r}: more extreme than {MAX_RATIO:g}:1")
        return cls(w, h)


MAX_RATIO = 20.0  # the most extreme aspect ratio asked for, either way


def parse_ratios(value: Any, field: str = "ratio") -> list[Ratio]:
    """The one reading of a ratio option, for the library, the command line, manifests and the
    server: 'W:H', a comma list 'W:H,W:H', a number (width / height), a Ratio, or a list of
    any of these (nested lists and comma lists flattened, in order). None means no ratio and
    gives []; anything that names no ratio (an empty string or list, only commas, 0, False) is
    refused with an InputError naming `field`, as is each bad ratio (`Ratio.parse`)."""
    from cropper_engine.errors import InputError

    if value is None:
        return []
    out: list[Ratio] = []

    def add(v: Any, depth: int) -> None:
        if isinstance(v, (Ratio, numbers.Real)) and not isinstance(v, bool):
            out.append(Ratio.parse(v))
        elif isinstance(v, str):
            out.extend(Ratio.parse(p) for p in v.split(",") if p.strip())
        elif isinstance(v, (list, tuple)) and depth < 4:
            for x in v:
                add(x, depth + 1)
        else:
            raise InputError(f"bad {field} {v!r}: give 'W:H' (e.g. '16:9'), several ('1:1,16:9' or a list of "
                             "them), or a number (width / height)")

    add(value, 0)
    if not out:
        raise InputError(f"{field} {value!r} names no ratio: give W:H, e.g. 16:9 or 1:1,4:5 (leave {field} out "
                         "for a free-form crop)")
    return out


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: (x1, y1) top-left, (x2, y2) bottom-right, x2 > x1."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def aspect(self) -> float:
        """Width / height; inf for a zero-height box."""
        return self.width / self.height if self.height > 0 else math.inf

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def is_valid(self) -> bool:
        vals = (self.x1, self.y1, self.x2, self.y2)
        return all(math.isfinite(v) for v in vals) and self.x2 > self.x1 and self.y2 > self.y1

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def rounded(self) -> Box:
        return Box(*(float(round(v)) for v in self.as_list()))

    def as_int(self) -> list[int]:
        return [int(round(v)) for v in self.as_list()]

    def clamp(self, width: float, height: float) -> Box:
        """Clip to the image [0, width] x [0, height]; corners are ordered first."""
        x1, x2 = sorted((self.x1, self.x2))
        y1, y2 = sorted((self.y1, self.y2))
        return Box(min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                   min(max(x2, 0.0), width), min(max(y2, 0.0), height))

    def intersection(self, other: Box) -> float:
        iw = min(self.x2, other.x2) - max(self.x1, other.x1)
        ih = min(self.y2, other.y2) - max(self.y1, other.y1)
        return max(0.0, iw) * max(0.0, ih)

    def iou(self, other: Box) -> float:
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def contains(self, other: Box, tol: float = 1e-6) -> bool:
        return (self.x1 <= other.x1 + tol and self.y1 <= other.y1 + tol
                and self.x2 >= other.x2 - tol and self.y2 >= other.y2 - tol)

    def scale(self, sx: float, sy: float | None = None) -> Box:
        sy = sx if sy is None else sy
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)

    # --- the paper's 1..1000 convention -------------------------------------------------
    def to_norm(self, width: float, height: float) -> tuple[int, int, int, int]:
        """Pixels -> integers in 1..1000 (1 = left/top edge, 1000 = right/bottom edge)."""
        def n(v: float, size: float) -> int:
            t = min(max(v / size, 0.0), 1.0)
            return int(round(NORM_LO + t * (NORM_HI - NORM_LO)))

        return (n(self.x1, width), n(self.y1, height), n(self.x2, width), n(self.y2, height))

    @classmethod
    def from_norm(cls, values: tuple[float, float, float, float] | list[float],
                  width: float, height: float) -> Box:
        """Integers (or floats) in 1..1000 -> pixels; the inverse of `to_norm`."""
        x1, y1, x2, y2 = (float(v) for v in values)

        def p(v: float, size: float) -> float:
            return (v - NORM_LO) / (NORM_HI - NORM_LO) * size

        return cls(p(x1, width), p(y1, height), p(x2, width), p(y2, height))

    def to_unit(self, width: float, height: float) -> tuple[float, float, float, float]:
        """Pixels -> fractions of the image in 0..1."""
        return (self.x1 / width, self.y1 / height, self.x2 / width, self.y2 / height)

    @classmethod
    def from_unit(cls, values: tuple[float, float, float, float] | list[float],
                  width: float, height: float) -> Box:
        x1, y1, x2, y2 = values
        return cls(x1 * width, y1 * height, x2 * width, y2 * height)

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        return cls(x, y, x + w, y + h)

    @classmethod
    def full(cls, width: float, height: float) -> Box:
        return cls(0.0, 0.0, float(width), float(height))


# --- subjects (the `--subject` spec) ------------------------------------------------------

WORDS = {"auto": "auto", "face": "face", "faces": "face", "person": "person", "persons": "person",
         "people": "person", "saliency": "saliency", "salient": "saliency"}
KINDS = ("face", "person", "saliency", "point", "box", "mask")  # what a result's `subject` can say
FORMS = ("auto, face, person, saliency, X,Y (a focal point in pixels), X1,Y1,X2,Y2 (a box in pixels) "
         "or the path of a mask image (white = subject, the image's size)")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBERS = re.compile(rf"^\s*{_NUMBER}(?:\s*[,;\s]\s*{_NUMBER})*\s*$")


@dataclass(frozen=True)
class SubjectSpec:
    """A parsed `--subject`: kind is auto | face | person | saliency | point | box | mask.

    Resolved against an image (faces, persons, the salient region) by engine/subject/resolve.py."""

    kind: str
    values: tuple[float, ...] = ()
    path: str | None = None
    mask: Any = field(default=None, compare=False, repr=False)  # an in-memory mask (array / PIL)

    @property
    def detects(self) -> bool:
        return self.kind in ("auto", "face", "person")

    def describe(self) -> str:
        if self.kind == "point":
            return "focal point {:g},{:g}".format(*self.values)
        if self.kind == "box":
            return "box {:g},{:g},{:g},{:g}".format(*self.values)
        if self.kind == "mask":
            return f"mask {self.path}" if self.path else "mask"
        return self.kind

    def check(self, width: int, height: int) -> None:
        """Refuse a focal point outside a width x height image, or a box that misses it."""
        if self.kind == "point":
            x, y = self.values
            if not (0 <= x <= width and 0 <= y <= height):
                raise InputError(f"the focal point {x:g},{y:g} lies outside the {width}x{height} image: X must be "
                                 f"in 0..{width} and Y in 0..{height} (pixels of the upright image)")
        elif self.kind == "box":
            clipped = Box(*self.values).clamp(width, height)
            if not clipped.is_valid() or clipped.width < 1 or clipped.height < 1:
                raise InputError("the subject box {:g},{:g},{:g},{:g} lies outside the ".format(*self.values)
                                 + f"{width}x{height} image (pixels of the upright image)")

    @classmethod
    def parse(cls, value: Any) -> SubjectSpec:
        """A spec from text (a word, numbers or a path), a path, or a mask (array / PIL image).

        Only the syntax is checked here; `resolve_subject` checks points and boxes against the
        image. Raises InputError naming the valid forms."""
        if isinstance(value, SubjectSpec):
            return value
        if value is None:
            raise InputError(f"no subject given; use {FORMS}")
        if isinstance(value, os.PathLike):
            return cls("mask", path=os.fspath(value))
        if not isinstance(value, str):
            if hasattr(value, "shape") or hasattr(value, "mode"):  # a numpy array or a PIL image
                return cls("mask", mask=value)
            if isinstance(value, (list, tuple)) and len(value) in (2, 4):
                value = ",".join(str(v) for v in value)
            else:
                raise InputError(f"bad subject {value!r}: use {FORMS}")
        text = value.strip()
        if not text:
            raise InputError(f"empty subject: use {FORMS}")
        word = WORDS.get(text.lower())
        if word:
            return cls(word)
        if _NUMBERS.match(text):
            try:
                nums = tuple(float(v) for v in re.split(r"[,;\s]+", text.strip()) if v)
            except ValueError:  # pragma: no cover - the regex admits only numbers
                raise InputError(f"bad subject {text!r}: use {FORMS}") from None
            if not all(math.isfinite(v) for v in nums):
                raise InputError(f"bad subject {text!r}: coordinates must be finite numbers")
            if len(nums) == 2:
                return cls("point", nums)
            if len(nums) == 4:
                x1, y1, x2, y2 = nums
                if x2 <= x1 or y2 <= y1:
                    what = ("a negative width" if x2 < x1 else "no width" if x2 == x1
                            else "a negative height" if y2 < y1 else "no height")
                    raise InputError(f"the subject box {text} has {what}: write it as X1,Y1,X2,Y2 (pixels) with "
                                     "X2 > X1 and Y2 > Y1, e.g. 10,10,200,150")
                return cls("box", nums)
            raise InputError(f"bad subject {text!r}: {len(nums)} numbers; a focal point is X,Y and a box "
                             f"X1,Y1,X2,Y2 (pixels). Valid forms: {FORMS}")
        p = Path(text).expanduser()
        from cropper_engine.imageio import is_image_path

        if p.exists() or is_image_path(p) or os.sep in text:
            return cls("mask", path=str(p))
        raise InputError(f"unknown subject {text!r}: use {FORMS}")


def parse_subject(value: Any) -> SubjectSpec | None:
    """None stays None; anything else goes through `SubjectSpec.parse`."""
    return None if value is None else SubjectSpec.parse(value)



@dataclass
class CropRequest:
    """What to crop and how.

    image: a path, a PIL image or an RGB uint8 array (H, W, 3).
    task: free-form, subject-aware (needs `mask`, a boolean H x W array, or `subject`) or
    ratio-aware (needs one or more `ratios`; each gives its own result).
    subject: where the subject comes from (engine/subject/): "auto", "face", "person",
    "saliency", "X,Y" (a focal point), "X1,Y1,X2,Y2" (a box), a mask path or array. The subject
    task crops around it; the ratio task keeps it inside each crop.
    keep_faces: no crop cuts through a detected face; None: the config's `loop.keep_faces` (auto: on
    wherever a face detector is installed).
    """

    image: Any
    task: Task = Task.FREE
    ratios: list[Ratio] = field(default_factory=list)
    mask: Any = None
    id: str | None = None
    subject: Any = None
    keep_faces: bool | None = None

    def __post_init__(self) -> None:
        from cropper_engine.errors import InputError

        self.task = Task.parse(self.task)
        self.ratios = [Ratio.parse(r) for r in self.ratios]
        if self.subject is not None:
            self.subject = parse_subject(self.subject)
            if self.mask is not None:
                raise InputError("give a subject mask or a subject, not both")
            if self.task is Task.FREE:
                raise InputError("a subject applies to the subject task (or, with ratios, the ratio task), "
                                 "not to the free-form task")
        if self.task is Task.RATIO and not self.ratios:
            raise InputError("the ratio task needs at least one aspect ratio, e.g. --ratio 4:3")
        if self.mask is not None and self.task is not Task.SUBJECT:
            if self.task is Task.FREE:
                raise InputError("a subject mask applies to the subject task, or with a ratio to every "
                                 "ratio's crop (the subject kept inside); not to the free-form task")
            # a ratio: the mask's subject kept inside every crop
            mask, self.mask = self.mask, None
            self.subject = SubjectSpec("mask", path=os.fspath(mask)) if isinstance(mask, (str, os.PathLike)) \
                else SubjectSpec.parse(mask)
        if self.task is Task.SUBJECT and self.mask is None and self.subject is None:
            raise InputError("the subject task needs a subject: a mask (e.g. --mask subject.png) or "
                             "--subject auto | face | person | saliency | X,Y | X1,Y1,X2,Y2")


@dataclass
class Candidate:
    """One proposed crop and what the scorers made of it."""

    box: Box
    score: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    round: int = 0
    source: str = "vlm"
    vlm_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "box": [round(v, 2) for v in self.box.as_list()],
            "score": round(float(self.score), 5),
            "scores": {k: round(float(v), 5) for k, v in self.scores.items()},
            "round": self.round,
            "source": self.source,
        }
        if self.vlm_score is not None:
            out["vlm_score"] = self.vlm_score
        return out


# --- whole pixels at a ratio ----------------------------------------------------------------


RATIO_TOLERANCE = 0.01  # a whole-pixel box within 1% of the ratio asked for honours it (|log| error)


def ratio_error(w: float, h: float, ratio: float) -> float:
    """How far a w x h box is from `ratio` (W/H): |log((w / h) / ratio)|; 0 when exact."""
    return abs(math.log((w / h) / ratio))


def whole_pixel_size(w0: float, ratio: float, width: int, height: int) -> tuple[int, int]:
    """The whole-pixel size (w, h) a box about `w0` wide at `ratio` becomes in a width x height image.

    Among the widths within a pixel or two of w0, each with its nearest height, the one nearest
    the ratio (1:1 stays square). Where none of those is within RATIO_TOLERANCE of the ratio (a
    tiny image or box: 50x2.5 at 20:1 would be 49x2 or 50x2), the size within tolerance nearest
    w0 that fits the image (40x2, exact); where no size that fits is within it (a 1x1 image at
    16:9), the one nearest the ratio (`ratio_note` then says so)."""
    best: tuple[tuple[float, float], int, int] | None = None
    for w in sorted({max(1, min(width, math.floor(w0) + d)) for d in (-1, 0, 1, 2)}):
        h = max(1, min(height, round(w / ratio)))
        key = (ratio_error(w, h, ratio), abs(w - w0))
        if best is None or key < best[0]:
            best = (key, w, h)
    assert best is not None
    (err, _), w, h = best
    if err <= RATIO_TOLERANCE:
        return w, h
    import numpy as np

    # every size that fits: each height with its nearest width, each width with its nearest height
    hs = np.arange(1, height + 1, dtype=np.float64)
    ws = np.arange(1, width + 1, dtype=np.float64)
    cw = np.concatenate([np.clip(np.rint(hs * ratio), 1, width), ws])
    ch = np.concatenate([hs, np.clip(np.rint(ws / ratio), 1, height)])
    errs = np.abs(np.log((cw / ch) / ratio))
    ok = errs <= RATIO_TOLERANCE + 1e-12
    if ok.any():  # within tolerance: the nearest w0 in width, then the nearest the ratio, then the larger
        order = np.lexsort((-cw, errs, np.abs(cw - w0), ~ok))
    else:  # none: the nearest the ratio, then the nearest w0, then the larger
        order = np.lexsort((-cw, np.abs(cw - w0), errs))
    k = int(order[0])
    return int(cw[k]), int(ch[k])


def whole_pixel_box(box: Box, ratio: float | None, width: int, height: int) -> Box:
    """The box on whole pixels: rounding it later changes nothing, and with a ratio its size is
    `whole_pixel_size` (the integer size nearest that ratio; 1:1 stays square), placed about the
    same centre inside the image; a box on an image edge stays on it (a face there has no padding
    left to lose to rounding)."""
    if not ratio:
        return box.rounded()
    w, h = whole_pixel_size(box.width, ratio, width, height)
    cx, cy = box.center
    x1 = min(max(round(cx - w / 2), 0), width - w)
    y1 = min(max(round(cy - h / 2), 0), height - h)
    x1 = 0 if box.x1 <= 0.5 else width - w if box.x2 >= width - 0.5 else x1
    y1 = 0 if box.y1 <= 0.5 else height - h if box.y2 >= height - 0.5 else y1
    return Box(float(x1), float(y1), float(x1 + w), float(y1 + h))


def ratio_note(box: Box, ratio: float, label: str, width: int, height: int) -> str | None:
    """What a result says when its whole-pixel box is not within RATIO_TOLERANCE of the ratio
    asked for (`label`, e.g. "16:9"): no box that close fits the image; None when it is."""
    w, h = round(box.width), round(box.height)
    if w < 1 or h < 1 or ratio_error(w, h, ratio) <= RATIO_TOLERANCE:
        return None
    return (f"no whole-pixel box of {label} fits this {width}x{height} image: the crop is {w}x{h} "
            f"({w / h:.3g}:1; {label} is {ratio:.3g}:1), the nearest to it that fits")


@dataclass
class CropResult:
    """The chosen crop for one image (and one ratio, for the ratio task)."""

    image: str
    width: int
    height: int
    box: Box
    score: float
    task: Task
    ratio: Ratio | None
    pipeline: str
    candidates: list[Candidate] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    loaded: Any = field(default=None, repr=False, compare=False)  # the decoded image, not serialised
    prompts: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)  # see below
    # `prompts` (not serialised): with `Cropper.record_prompts`, each VLM call's prompt text and raw
    # answers as {"round", "attempt", "prompt", "answers"}; `crop --save-prompts` writes them

    def __post_init__(self) -> None:
        """A ratio's crop is on whole pixels at the integer size nearest its ratio
        (`whole_pixel_box`): a box whose height is not the nearest the ratio for its
        width (a rounded 319x320 at 1:1) is snapped, and where the box is further than
        RATIO_TOLERANCE from the ratio, the nearest size within it that fits (40x2 for 50x2.5 at
        20:1); where no box that close fits the image (1x1 at 16:9) a note says so."""
        if self.ratio is None or self.width < 1 or self.height < 1 or not self.box.is_valid():
            return
        r, b = self.ratio.value, self.box
        w, h = b.width, b.height
        h_best = max(1, min(self.height, round(w / r)))  # the height nearest the ratio for this width
        if (not all(float(v).is_integer() for v in b.as_list()) or ratio_error(w, h, r) > RATIO_TOLERANCE
                or ratio_error(w, h, r) > ratio_error(w, h_best, r) + 1e-12):  # e.g. 319x320 at 1:1
            self.box = whole_pixel_box(b, r, self.width, self.height)
        note = ratio_note(self.box, r, str(self.ratio), self.width, self.height)
        if note and note not in self.notes:
            self.notes.append(note)

    def to_json(self) -> dict[str, Any]:
        out = {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "box": self.box.as_int(),
            "score": round(float(self.score), 5),
            "task": self.task.value,
            "ratio": str(self.ratio) if self.ratio else None,
            "pipeline": self.pipeline,
            "candidates": [c.to_json() for c in self.candidates],
            "timings": {k: round(float(v), 5) for k, v in self.timings.items()},
        }
        if self.notes:
            out["notes"] = list(self.notes)
        out.update(self.extra)
        return out
