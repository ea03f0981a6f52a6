"""What every reader shares: the `Dataset` a read returns, one read's state (`_Reader`: examples,
messages, limit, split filter, image sizes) and its box checks.

Boxes come out in pixels of the upright (EXIF-rotated) image as `Box(x1, y1, x2, y2)`; image
paths are absolute.

Box checks (all formats): a box that overshoots the image by at most 2% of the side (or 2 px)
is clamped silently; one that overshoots more but lies mostly (>= 50%) inside is clamped with a
note in `Dataset.notes`; non-finite, degenerate (zero or negative size) or mostly-outside boxes
are dropped with a message, and a record with no valid box left is skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.errors import AnnotationError, ImageError
from cropper_engine.imageio import image_size
from cropper_engine.types import Box

# A box may overshoot the image by this share of the side (or _TOL_PX) and is clamped silently.
_TOL_FRAC = 0.02
_TOL_PX = 2.0
_MIN_INSIDE = 0.5


@dataclass
class Dataset:
    """Examples read from one annotation source, and what was left out on the way."""

    examples: list[Example]
    skipped: list[str]
    kind: str
    source: str
    images: str | None = None
    notes: list[str] = field(default_factory=list)
    n_skipped: int = 0  # records (images) skipped; `skipped` also lists single dropped boxes

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def summary(self) -> str:
        text = f"{self.kind}: {len(self.examples)} examples from {self.source}"
        if self.n_skipped:
            text += f", {self.n_skipped} skipped"
        return text


# --- small helpers --------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _four(raw: Any) -> list[float] | None:
    if isinstance(raw, (list, tuple)) and len(raw) == 4 and all(_num(v) for v in raw):
        return [float(v) for v in raw]
    return None


def _is_box_list(raw: Any) -> bool:
    return isinstance(raw, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in raw)


def _positive_int(v: Any) -> int | None:
    if _num(v) and math.isfinite(v) and v > 0 and float(v).is_integer():
        return int(v)
    return None


class _Finder:
    """Files of a folder by stem, listed once (for names given without their extension)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, list[str]]] = {}

    def find(self, folder: Path, stem: str, suffixes: Iterable[str] | None = None) -> Path | None:
        if folder not in self._cache:
            index: dict[str, list[str]] = {}
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                index.setdefault(os.path.splitext(name)[0], []).append(name)
            self._cache[folder] = index
        for name in self._cache[folder].get(stem, []):
            if suffixes is None or os.path.splitext(name)[1].lower() in suffixes:
                return folder / name
        return None


class _Reader:
    """Shared state of one read: examples, messages, limit, split filter, image sizes."""

    def __init__(self, kind: str, source: Path, images: Path, require_images: bool,
                 limit: int | None, keep: Callable[[str], bool] | None) -> None:
        self.kind = kind
        self.source = source
        self.images = images
        self.require_images = require_images
        self.limit = limit
        self.keep = keep
        self.examples: list[Example] = []
        self.by_id: dict[str, Example] = {}
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.n_skipped = 0
        self.finder = _Finder()

    # bookkeeping
    def full(self) -> bool:
        return self.limit is not None and len(self.examples) >= self.limit

    def wanted(self, *names: str) -> bool:
        if self.keep is None:
            return True
        return any(self.keep(n) for n in names if n)

    def skip(self, message: str) -> None:
        self.skipped.append(message)
        self.n_skipped += 1

    def drop(self, message: str) -> None:
        """A dropped box (the record may still be kept)."""
        self.skipped.append(message)

    def add(self, ex: Example) -> None:
        if ex.id in self.by_id:
            self.skip(f"{ex.id}: duplicate id (already read); skipped - give each record its own id")
            return
        self.by_id[ex.id] = ex
        self.examples.append(ex)

    def dataset(self) -> Dataset:
        return Dataset(self.examples, self.skipped, self.kind, str(self.source),
                       str(self.images), self.notes, self.n_skipped)

    # paths and sizes
    def image_path(self, name: str) -> Path:
        p = Path(name).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.images / p))

    def size(self, label: str, path: Path, declared: tuple[int, int] | None = None,
             infer: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Upright size from the header; without the file (and require_images=False) the
        declared size, else the inferred one. None (with a message) when the record must go."""
        try:
            actual = image_size(path)
        except ImageError as exc:
            missing = not path.is_file()
            if missing and self.require_images:
                self.skip(f"{label}: image file {path} not found; skipped")
                return None
            if not missing and self.require_images:
                self.skip(f"{label}: {exc}; skipped")
                return None
            if declared is not None:
                return declared
            if infer is not None:
                return infer
            why = "not found" if missing else f"unreadable ({exc})"
            self.skip(f"{label}: image file {path} {why} and the annotation gives no size; skipped")
            return None
        if declared is not None and tuple(declared) != actual:
            self.skip(f"{label}: annotation says {declared[0]}x{declared[1]} but image is "
                      f"{actual[0]}x{actual[1]}; skipped")
            return None
        return actual

    def declared_size(self, label: str, rec: dict[str, Any]) -> tuple[int, int] | bool | None:
        """(w, h) from a record, None when absent, False (with a message) when malformed."""
        if rec.get("width") is None and rec.get("height") is None:
            return None
        w, h = _positive_int(rec.get("width")), _positive_int(rec.get("height"))
        if w is None or h is None:
            self.skip(f"{label}: width/height {_fmt(rec.get('width'))}x{_fmt(rec.get('height'))} "
                      "must be positive integers; skipped")
            return False
        return w, h

    # boxes
    def box(self, label: str, what: str, raw: Any, width: int, height: int,
            fmt: str = "xyxy") -> Box | None:
        """Check one box (`raw` as written, in `fmt`); clamp small overshoots; None if dropped."""
        shown = f"{what} {_fmt(raw)}"
        vals = _four(raw)
        if vals is None:
            self.drop(f"{label}: {shown} is not 4 numbers; skipped")
            return None
        if not all(math.isfinite(v) for v in vals):
            self.drop(f"{label}: {shown} has non-finite values; skipped")
            return None
        if fmt == "xywh":
            x, y, w, h = vals
            if w <= 0 or h <= 0:
                self.drop(f"{label}: {shown} (x, y, w, h) is degenerate (w <= 0 or h <= 0); skipped")
                return None
            b = Box.from_xywh(x, y, w, h)
        elif fmt == "yxyx":
            b = Box(vals[1], vals[0], vals[3], vals[2])
        else:
            b = Box(*vals)
        if b.x2 <= b.x1 or b.y2 <= b.y1:
            axis = "x2 <= x1" if b.x2 <= b.x1 else "y2 <= y1"
            self.drop(f"{label}: {shown} is degenerate ({axis}); skipped")
            return None
        over_x = max(0.0, -b.x1, b.x2 - width)
        over_y = max(0.0, -b.y1, b.y2 - height)
        if over_x == 0 and over_y == 0:
            return b
        inside = b.intersection(Box.full(width, height)) / b.area
        if inside < _MIN_INSIDE:
            self.drop(f"{label}: {shown} lies mostly outside the {width}x{height} image "
                      f"({inside:.0%} inside); skipped")
            return None
        clamped = b.clamp(width, height)
        if not clamped.is_valid():
            self.drop(f"{label}: {shown} has no area inside the {width}x{height} image; skipped")
            return None
        if over_x > max(_TOL_PX, _TOL_FRAC * width) or over_y > max(_TOL_PX, _TOL_FRAC * height):
            self.notes.append(f"{label}: {shown} overshoots the {width}x{height} image by "
                              f"{max(over_x, over_y):g} px; clamped")
        return clamped

    def boxes(self, label: str, raws: list[Any], width: int, height: int, fmt: str = "xyxy",
              scores: list[Any] | None = None, what: str = "crop") -> tuple[list[Box], list[float] | None]:
        out: list[Box] = []
        kept: list[float] = []
        for i, raw in enumerate(raws):
            s = None
            if scores is not None:
                s = scores[i]
                if not (_num(s) and math.isfinite(s)):
                    self.drop(f"{label}: score {_fmt(s)} of {what} {_fmt(raw)} is not a number; "
                              "crop skipped")
                    continue
            b = self.box(label, what, raw, width, height, fmt)
            if b is None:
                continue
            out.append(b)
            if s is not None:
                kept.append(float(s))
        return out, (kept if scores is not None else None)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None
