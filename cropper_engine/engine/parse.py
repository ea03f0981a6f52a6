"""VLM text -> boxes in the paper's 1..1000 convention, repairing what can be repaired.

Handles what models answer when not constrained: prose around the boxes, code fences,
any kind of brackets, key=value forms, a missing score, floats in 0..1, swapped corners,
values out of range, and too few or too many boxes. `parse_boxes` never raises on model
text: it returns the boxes it could use and a list of what it had to repair.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cropper_engine.types import NORM_HI, NORM_LO

# a number not glued to a letter (so the "1" of "x1" is not taken for a value)
_NUM = r"(?<![A-Za-z_\d.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_])"
_NUM_RE = re.compile(_NUM)
_GROUP_RE = re.compile(r"[\(\[\{<]([^()\[\]{}<>]*)[\)\]\}>]")
_MAX_TEXT = 20_000  # longer answers are cut: a model that rambles gets no more of our time


@dataclass(frozen=True)
class ParsedBox:
    """A box in the 1..1000 convention, and the score the model gave it (if any)."""

    x1: float
    y1: float
    x2: float
    y2: float
    s: float | None = None

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class ParseResult:
    boxes: list[ParsedBox] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.boxes)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUM_RE.finditer(text):
        try:
            v = float(m.group(0))
        except ValueError:
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def _groups(text: str) -> tuple[list[list[float]], bool]:
    """Number groups from bracketed tuples; else all numbers chunked. Returns (groups, chunked)."""
    groups = []
    for m in _GROUP_RE.finditer(text):
        nums = _numbers(m.group(1))
        if len(nums) in (4, 5):
            groups.append(nums)
        elif len(nums) > 5 and len(nums) % 5 == 0:
            groups.extend(nums[i:i + 5] for i in range(0, len(nums), 5))
    if groups:
        return groups, False
    nums = _numbers(text)
    if len(nums) >= 5 and len(nums) % 5 == 0:
        return [nums[i:i + 5] for i in range(0, len(nums), 5)], True
    if len(nums) >= 4 and len(nums) % 4 == 0:
        return [nums[i:i + 4] for i in range(0, len(nums), 4)], True
    if len(nums) >= 5:
        n = len(nums) // 5 * 5
        return [nums[i:i + 5] for i in range(0, n, 5)], True
    if len(nums) == 4:
        return [nums], True
    return [], True


def _widen(a: float, b: float) -> tuple[float, float]:
    if b - a >= 1:
        return a, b
    mid = min(max((a + b) / 2, NORM_LO + 0.5), NORM_HI - 0.5)
    return mid - 0.5, mid + 0.5


def parse_boxes(text: object, expected: int | None = None) -> ParseResult:
    """Parse up to `expected` boxes (all when None) from a model's answer."""
    res = ParseResult()
    try:
        _parse_into(str(text) if text is not None else "", expected, res)
    except Exception as exc:
        res.boxes.clear()
        res.repairs.append(f"unparseable answer ({type(exc).__name__})")
    return res


def _parse_into(text: str, expected: int | None, res: ParseResult) -> None:
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT]
        res.repairs.append(f"answer cut to {_MAX_TEXT} characters")
    if "```" in text:
        res.repairs.append("code fences ignored")
        text = text.replace("```", " ")
    opened = max(text.rfind(c) for c in "([{<")
    if opened > max(text.rfind(c) for c in ")]}>") and _NUM_RE.search(text[opened:]):
        # an answer cut short: "(4.5, 123, 456, 789, 100" is no box (its numbers read in order
        # would make one of the wrong values)
        res.repairs.append("unfinished box at the end dropped")
        text = text[:opened]
    groups, chunked = _groups(text)
    if not groups:
        res.repairs.append("no box found")
        return
    if chunked:
        res.repairs.append("no bracketed boxes: numbers taken in order")
    raw: list[tuple[float | None, list[float]]] = []
    for g in groups:
        if len(g) == 5:
            raw.append((g[0], g[1:]))
        else:
            raw.append((None, g))
    if any(s is None for s, _ in raw):
        res.repairs.append("missing score")
    coords = [c for _, c in raw]
    flat = [v for c in coords for v in c]
    if flat and max(abs(v) for v in flat) <= 1.0 and any(0 < v < 1 for v in flat):
        res.repairs.append("coordinates in 0..1 scaled to 1..1000")
        coords = [[NORM_LO + v * (NORM_HI - NORM_LO) for v in c] for c in coords]
    clamped = swapped = widened = False
    for (s, c) in zip((s for s, _ in raw), coords, strict=True):
        x1, y1, x2, y2 = c
        if x1 > x2 or y1 > y2:
            swapped = True
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
        vals = []
        for v in (x1, y1, x2, y2):
            cv = min(max(v, NORM_LO), NORM_HI)
            clamped |= cv != v
            vals.append(cv)
        x1, y1, x2, y2 = vals
        if x2 - x1 < 1 or y2 - y1 < 1:  # a line or a point: widened to one unit, the loop grows it
            widened = True
            x1, x2 = _widen(x1, x2)
            y1, y2 = _widen(y1, y2)
        res.boxes.append(ParsedBox(x1, y1, x2, y2, s))
    if swapped:
        res.repairs.append("swapped corners reordered")
    if clamped:
        res.repairs.append("values clamped to 1..1000")
    if widened:
        res.repairs.append("degenerate boxes widened")
    if expected is not None:
        if len(res.boxes) > expected:
            res.repairs.append(f"{len(res.boxes)} boxes, kept the first {expected}")
            del res.boxes[expected:]
        elif len(res.boxes) < expected:
            res.repairs.append(f"{len(res.boxes)} of {expected} boxes")
