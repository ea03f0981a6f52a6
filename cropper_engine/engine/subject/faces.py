"""Face geometry: the main faces, the faces a crop of a ratio keeps whole, and crops grown or
shrunk so they cut through no face; the notes saying which faces a crop cuts or leaves out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cropper_engine.engine.subject.detectors import Face
from cropper_engine.types import Box

MAX_FACES = 16  # a crowd: only the largest faces are kept whole
MAIN_FACE_SHARE = 0.5  # a face at least this share of the largest face's side is a main face: always inside
MAIN_PERSON_SHARE = 0.5  # the same for persons (side: square root of the box's area)
CUT_PAD = 2.0  # px: a kept face is padded by this, so rounding a crop to whole pixels never cuts it


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


def main_faces_need(faces: Sequence[Box], width: float, height: float, ratio: float | None,
                    required: Box | None) -> Box | None:
    """What `keep_faces_whole` makes every crop hold: the main faces' union (with `required`
    beside it when one crop of the ratio holds both), else `required`."""
    mains = [f for f in faces if getattr(f, "main", False)]
    if not mains:
        return required
    core = _union(mains)
    both = core if required is None else _union([core, required])
    return both if fits(both, ratio, width, height) else (required if required is not None else core)


def untouched(boxes: np.ndarray, faces: Sequence[Box], need: Box | None) -> np.ndarray:
    """Rows of `boxes` [N, 4] that `keep_faces_whole` returns as they are: each holds `need`
    (see `main_faces_need`) and cuts through no face (the tests of `contains` and `cuts`)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]

    def holds(o: Box, tol: float) -> np.ndarray:
        return (x1 <= o.x1 + tol) & (y1 <= o.y1 + tol) & (x2 >= o.x2 - tol) & (y2 >= o.y2 - tol)

    ok = holds(need, 0.5) if need is not None else np.ones(len(b), dtype=bool)
    for f in faces:
        ox = np.minimum(x2, f.x2) - np.maximum(x1, f.x1)
        oy = np.minimum(y2, f.y2) - np.maximum(y1, f.y1)
        ok &= ~((ox > 0.5) & (oy > 0.5) & ~holds(f, 0.5))
    return ok


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
    if any(getattr(f, "main", False) for f in faces):
        need = main_faces_need(faces, width, height, ratio, required)
        assert need is not None
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


