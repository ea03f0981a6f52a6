"""Face geometry: the main faces, the faces a crop of a ratio keeps whole, and crops grown or
shrunk so they cut through no face; the notes saying which faces a crop cuts or leaves out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropper_engine.types import Box

MAX_FACES = 16  # a crowd: only the largest faces are kept whole
MAIN_FACE_SHARE = 0.5  # a face ranked at least this share of the best face is a main face: always inside
MAIN_PERSON_SHARE = 0.5  # the same for persons (side: square root of the box's area)
CUT_PAD = 2.0  # px: a kept face is padded by this, so rounding a crop to whole pixels never cuts it


@dataclass
class Face:
    """A detected face (detectors.detect_faces), with what the ranking found of it (rank_faces)."""

    box: Box  # as detected, pixels of the full image
    score: float
    keep: Box  # with FACE_MARGIN, clipped to the image: what a crop should keep whole
    # MediaPipe's six keypoints (right eye, left eye, nose tip, mouth, right ear, left ear), image pixels
    keypoints: tuple[tuple[float, float], ...] | None = None
    features: dict[str, Any] = field(default_factory=dict)  # `face_features`: what the ranking reads
    rank_score: float | None = None  # faces.rank_faces: 0 for a detection that is not taken for a face
    main: bool | None = None  # faces.rank_faces: a main face (None: not ranked)
    why: str | None = None  # faces.rank_faces: why the detection is not taken for a face

    @property
    def area(self) -> float:
        return self.box.area


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


# --- ranking: the faces a person would keep ----------------------------------------------

STRONG_FACE = 0.8  # detector confidence from which a detection is a face whatever its look says
LARGE_FACE = 0.15  # a face's side over the image's shorter side from which its look is checked
NO_PERSON = 0.2  # a weaker detection with less person (segmentation) than this in its middle: not a face
ON_BODY_SIZE = 1.3  # a face this much larger than a face above it, on that face's body: a print, not a face
ON_BODY_SHOULDERS = 2.2  # ... unless shoulders of its own, this many of its widths wide, lie below it
FOCUS_BLUR, FOCUS_SHARP = 0.2, 0.4  # a face's focus over the sharpest face's: out of focus .. in focus
PROFILE = 0.5  # frontal-ness (0 profile .. 1 frontal) from which a face counts as turned to the camera


def _on_body(upper: Box, lower: Box) -> bool:
    """Whether `lower` lies on the body below `upper`: its top between the upper face's chin
    (less a tenth of its height) and three of its heights lower, its centre within one of its
    widths of the upper face's centre line."""
    gap = (lower.y1 - upper.y2) / max(upper.height, 1e-9)
    return -0.1 <= gap <= 3.0 and abs(lower.center[0] - upper.center[0]) <= upper.width


def not_a_face(faces: Sequence[Face]) -> list[str | None]:
    """Per detection, why it is not taken for a face (None: it is one). A large detection (side
    LARGE_FACE of the image's shorter side or more) under STRONG_FACE confidence is not a face
    where the person segmentation sees nobody in its middle (`person` under NO_PERSON: clouds,
    fireworks, a wall; it misses the smaller faces of real people, so they are not checked) or
    where its keypoints are not where a face has them; any detection is not a face where it
    lies on the body of a face above it and is ON_BODY_SIZE times larger (a print on a
    shirt), unless shoulders of its own (ON_BODY_SHOULDERS of its widths) lie below it."""
    why: list[str | None] = [None] * len(faces)
    for i, f in enumerate(faces):
        ft = f.features
        if f.score < STRONG_FACE and ft.get("share", 0.0) >= LARGE_FACE:
            person = ft.get("person")
            if person is not None and person < NO_PERSON:
                why[i] = "no person around it"
            elif ft.get("keypoints_ok") is False:
                why[i] = "its eyes, nose and mouth are not where a face has them"
    for i, f in enumerate(faces):
        if why[i] is not None:
            continue
        sh = f.features.get("shoulders")
        if sh is not None and sh >= ON_BODY_SHOULDERS:
            continue
        for j, g in enumerate(faces):
            if j != i and why[j] is None and _side(f.box) >= ON_BODY_SIZE * _side(g.box) and _on_body(g.box, f.box):
                why[i] = f"on the body below the face at {g.box.as_int()}"
                break
    return why


def rank_scores(faces: Sequence[Face]) -> list[float]:
    """Each face's rank: its side over the largest face's (faces only: `not_a_face`), times
    three factors in (0, 1] for what makes a person look at a face first: confidence (0.75 at
    0.5 to 1 from STRONG_FACE), focus against the sharpest face (1 from FOCUS_SHARP of it, down
    to 0.3 at FOCUS_BLUR: out of focus) and frontal-ness (0.7 in profile, 1 from PROFILE). So a
    weak detection or a profile, even both, stays a main face beside a sharp frontal face of its
    size; a face out of focus does not. A feature a face does not carry (no keypoints, a
    hand-made Face) counts 1. 0 for a detection that is not a face."""
    why = not_a_face(faces)
    ok = [i for i, w in enumerate(why) if w is None]
    if not ok:
        return [0.0] * len(faces)
    big = max(_side(faces[i].box) for i in ok)
    foci = [faces[i].features.get("focus") for i in ok]
    sharpest = max((x for x in foci if x is not None), default=None)
    out = [0.0] * len(faces)
    for i in ok:
        f = faces[i]
        conf = 0.75 + 0.25 * min(max((f.score - 0.5) / (STRONG_FACE - 0.5), 0.0), 1.0)
        focus = f.features.get("focus")
        rel = 1.0 if focus is None or not sharpest else focus / sharpest
        sharp = min(max((rel - FOCUS_BLUR) / (FOCUS_SHARP - FOCUS_BLUR), 0.3), 1.0)
        frontal = f.features.get("frontal")
        turn = 1.0 if frontal is None else 0.7 + 0.3 * min(frontal / PROFILE, 1.0)
        out[i] = _side(f.box) / big * conf * sharp * turn
    return out


def rank_faces(faces: Sequence[Face]) -> list[int]:
    """Rank the faces (`rank_scores`) and store it on each: rank_score, main
    (`main_face_indices`) and why (`not_a_face`). Returns the main faces, best-ranked first."""
    why = not_a_face(faces)
    scores = rank_scores(faces)
    main = main_face_indices(faces)
    for i, f in enumerate(faces):
        f.rank_score, f.main, f.why = round(scores[i], 4), i in main, why[i]
    return main


def main_face_indices(faces: Sequence[Face]) -> list[int]:
    """The main faces, best-ranked first (`rank_scores`): the best-ranked face, every face ranked
    at least MAIN_FACE_SHARE of it, and every other face (not a non-face) whose centre lies
    between them (inside their bounding box). The others are faces a crop may leave out:
    passers-by, faces out of focus or turned away beside the one the photo is about."""
    if not faces:
        return []
    scores = rank_scores(faces)
    best = max(scores)
    if best <= 0:
        return []
    why = not_a_face(faces)
    main = [i for i, r in enumerate(scores) if r >= MAIN_FACE_SHARE * best - 1e-9]
    u = _union([faces[i].box for i in main])
    for i, f in enumerate(faces):
        cx, cy = f.box.center
        if i not in main and why[i] is None and u.x1 <= cx <= u.x2 and u.y1 <= cy <= u.y2:
            main.append(i)
    return sorted(main, key=lambda i: (-scores[i], i))


def main_face_indices_by_size(faces: Sequence[Face]) -> list[int]:
    """The rule before the ranking (kept for the face benchmark's comparison): the largest face,
    every face at least MAIN_FACE_SHARE of its side, and smaller faces between them."""
    if not faces:
        return []
    big = max(_side(f.box) for f in faces)
    main = [i for i, f in enumerate(faces) if _side(f.box) >= MAIN_FACE_SHARE * big - 1e-9]
    u = _union([faces[i].box for i in main])
    for i, f in enumerate(faces):
        cx, cy = f.box.center
        if i not in main and u.x1 <= cx <= u.x2 and u.y1 <= cy <= u.y2:
            main.append(i)
    return sorted(main)


def needs_segmentation(faces: Sequence[Face]) -> bool:
    """Whether `not_a_face` would read the person segmentation: a large detection under
    STRONG_FACE, or one ON_BODY_SIZE times larger than a face above it, on its body."""
    if any(f.score < STRONG_FACE and f.features.get("share", 0.0) >= LARGE_FACE for f in faces):
        return True
    return any(j != i and _side(f.box) >= ON_BODY_SIZE * _side(g.box) and _on_body(g.box, f.box)
               for i, f in enumerate(faces) for j, g in enumerate(faces))


def faces_to_keep(faces: Sequence[Face], ratio: float | None, width: float, height: float,
                  main_rule: Callable[[Sequence[Face]], list[int]] | None = None) -> list[KeptFace]:
    """The boxes a crop of this ratio keeps whole: each face with its margin where a crop of
    the ratio can hold that, else as detected (padded by CUT_PAD px). The main faces
    (`main_face_indices`, or `main_rule`) are marked `main` as long as one crop of the ratio can
    hold them, best-ranked first: a main face that does not fit beside the better-ranked ones is
    only kept whole."""
    faces = list(faces[:MAX_FACES])  # largest first
    boxes = []
    for f in faces:
        k = _pad(f.keep, width, height)
        boxes.append(k if fits(k, ratio, width, height) else _pad(f.box, width, height))
    main: list[int] = []
    core: Box | None = None
    for i in (main_rule or main_face_indices)(faces):
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


def _worse(face: Face, than: Face) -> list[str]:
    """What makes `face` rank below `than`, in words (the features `rank_scores` reads)."""
    words = []
    if _side(face.box) < 0.9 * _side(than.box):
        words.append("smaller")
    a, b = face.features.get("focus"), than.features.get("focus")
    if a is not None and b and a / b < FOCUS_SHARP:
        words.append("out of focus")
    a, b = face.features.get("frontal"), than.features.get("frontal")
    if a is not None and b is not None and a < PROFILE <= b:
        words.append("turned away")
    if face.score < STRONG_FACE <= than.score:
        words.append("less clearly a face")
    return words


def _ranked_first(best: Face, others: Sequence[Face]) -> str:
    """Why `best` ranks above `others`: the words true of every one of them."""
    common = None
    for o in others:
        w = _worse(o, best)
        common = w if common is None else [x for x in common if x in w]
    flip = {"smaller": "larger", "out of focus": "sharper", "turned away": "more frontal",
            "less clearly a face": "more clearly a face"}
    return ", ".join(flip[w] for w in common or [])


def faces_left_out_note(crop: Box, faces: Sequence[Face], kept: Sequence[Box], ratio_text: str | None) -> str | None:
    """A note naming the detected faces a crop leaves out entirely, and why: main faces that no
    crop of the ratio holds beside the best-ranked one (naming the face kept and why it ranks
    first), minor faces (ranked under MAIN_FACE_SHARE of the best face: passers-by, faces out of
    focus or turned away beside the one the photo is about), and detections not taken for a
    face (`not_a_face`)."""
    if not faces:
        return None
    order = main_face_indices(faces)
    main = set(order)
    why = not_a_face(faces)
    marked = {i for i, k in enumerate(kept) if getattr(k, "main", False)}
    out = [i for i, f in enumerate(faces[:MAX_FACES]) if _overlap(crop, f.box)[0] <= 0.5 or
           _overlap(crop, f.box)[1] <= 0.5]
    if not out:
        return None
    what = f"a {ratio_text} crop" if ratio_text else "the crop"
    parts = []
    lost_main = [i for i in out if i in main]
    fake = [i for i in out if why[i] is not None]
    minor = [i for i in out if i not in main and why[i] is None]
    w = max(crop.x2, *(f.box.x2 for f in faces))
    h = max(crop.y2, *(f.box.y2 for f in faces))
    if lost_main:
        them = "them" if len(lost_main) > 1 else "it"
        held = [i for i in order if i not in lost_main]
        if any(i not in marked for i in lost_main) and held:
            best = faces[held[0]]
            words = _ranked_first(best, [faces[i] for i in lost_main])
            why_text = (f"cannot hold {them} beside the face it keeps ({best.box.as_int()}, ranked first"
                        f"{': ' + words if words else ''})")
        elif any(i not in marked for i in lost_main):
            why_text = f"cannot hold {them}"
        else:
            why_text = f"was chosen without {them}"
        parts.append(f"{len(lost_main)} main face{'s' if len(lost_main) > 1 else ''} "
                     f"({', '.join(str(faces[i].box.as_int()) for i in lost_main)}): {what} {why_text}")
    if minor:
        where = sorted({_where(faces[i].box, w, h) for i in minor})
        best = faces[order[0]] if order else None
        words = sorted({x for i in minor for x in (_worse(faces[i], best) if best is not None else [])})
        parts.append(f"{len(minor)} minor face{'s' if len(minor) > 1 else ''} "
                     f"({', '.join(str(faces[i].box.as_int()) for i in minor)}; ranked under "
                     f"{MAIN_FACE_SHARE:.0%} of the best face{': ' + ', '.join(words) if words else ''}; "
                     f"{' or '.join(where)})")
    if fake:
        parts.append(f"{len(fake)} detection{'s' if len(fake) > 1 else ''} not taken for a face ("
                     + "; ".join(f"{faces[i].box.as_int()}: {why[i]}" for i in fake) + ")")
    return "faces left out of the crop: " + "; ".join(parts)


def face_cut_note(crop: Box, faces: Sequence[Face], ratio_text: str | None) -> str | None:
    """A note when the chosen crop cuts a detected face (the ratio left no way round it)."""
    cut = [f for f in faces if cuts(crop, f.box)]
    if not cut:
        return None
    order = main_face_indices(faces)
    best = faces[order[0]] if order else max(faces, key=lambda f: f.area)
    what = f"a {ratio_text} crop" if ratio_text else "a crop"
    if crop.contains(best.box, tol=0.5):
        return (f"{what} cannot keep all {len(faces)} faces whole: it keeps the best-ranked face "
                f"({best.box.as_int()}) and cuts {len(cut)} other{'s' if len(cut) > 1 else ''}")
    return f"{what} cannot keep the best-ranked face ({best.box.as_int()}) whole: the face is cut"
