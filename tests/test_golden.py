"""Golden crops: the public-domain samples (`python -m cropper_engine.samples DIR`) cropped by the
shipped default at every common ratio and free-form, each crop checked for what a person would
accept: the subject inside (as far as a crop of the ratio can hold it), the astronaut's face
inside at every ratio, the exact ratio, and no crop under half the largest crop of its ratio.

The subject boxes were drawn by hand on the photos (pixels of the sample JPEGs):
astronaut: her head with the hair; chelsea: the cat's eyes and nose; coffee: the cup with its
handle; rocket: the rocket on the pad.
"""

from __future__ import annotations

import pytest

from cropper_engine.config import load_config
from cropper_engine.types import Box, CropRequest, Ratio, Task

RATIOS = ["1:1", "4:5", "3:2", "16:9", "9:16"]
SUBJECTS = {
    "astronaut": Box(150, 15, 305, 175),
    "chelsea": Box(130, 85, 350, 270),
    "coffee": Box(170, 15, 420, 310),
    "rocket": Box(305, 125, 340, 410),
}
HER_FACE = Box(180, 75, 270, 165)  # the astronaut's face, brows to chin (as tests/test_subject.py)
MIN_SHARE = 0.5  # of the largest crop of the ratio (of the image, free-form)
SUBJECT_SHARE = 0.8  # of the subject a crop of the ratio could hold at best



@pytest.fixture(scope="module")
def default_cropper():
    """The shipped default as `cropper-engine crop` runs it without a VLM (keep_faces auto)."""
    from cropper_engine.engine.loop import Cropper

    return Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))


@pytest.fixture(scope="module")
def golden(photos, default_cropper):
    """name -> {ratio text or 'free': CropResult}, every sample at every ratio and free-form."""
    out = {}
    for p in photos:
        if p.stem not in SUBJECTS:
            continue
        rows = default_cropper.crop(CropRequest(p, Task.RATIO, RATIOS))
        free = default_cropper.crop(CropRequest(p, Task.FREE))
        out[p.stem] = {str(r.ratio): r for r in rows} | {"free": free[0]}
    return out


def largest_area(ratio: str, w: int, h: int) -> float:
    if ratio == "free":
        return float(w * h)
    r = Ratio.parse(ratio).value
    cw = min(float(w), h * r)
    return cw * cw / r


def best_cover(subject: Box, ratio: str, w: int, h: int) -> float:
    """The largest share of the subject any crop of the ratio inside the image can hold."""
    if ratio == "free":
        return 1.0
    r = Ratio.parse(ratio).value
    cw = min(float(w), h * r)
    ch = cw / r
    return min(1.0, cw / subject.width) * min(1.0, ch / subject.height)


@pytest.mark.parametrize("name", sorted(SUBJECTS))
@pytest.mark.parametrize("ratio", [*RATIOS, "free"])
def test_golden_crop(golden, name, ratio):
    res = golden[name][ratio]
    w, h = res.width, res.height
    box = res.box
    assert box.x1 >= 0 and box.y1 >= 0 and box.x2 <= w and box.y2 <= h
    if ratio != "free":
        assert box.aspect == pytest.approx(Ratio.parse(ratio).value, rel=0.02), box
    assert box.area >= MIN_SHARE * largest_area(ratio, w, h), (box, w, h)
    subject = SUBJECTS[name]
    cover = box.intersection(subject) / subject.area
    assert cover >= SUBJECT_SHARE * best_cover(subject, ratio, w, h), (name, ratio, box, round(cover, 3))
    if ratio == "free":  # free-form does crop something away, but never the subject
        assert box.area < 0.999 * w * h or cover == pytest.approx(1.0)


@pytest.mark.usefixtures("mediapipe_installed")  # skips here without it, fails in CI
@pytest.mark.parametrize("ratio", [*RATIOS, "free"])
def test_the_astronaut_keeps_her_face(golden, ratio):
    """Her detected face is inside the crop at every ratio (the crop that once showed her body
    without her head at 16:9), and no note says a face was left out."""
    res = golden["astronaut"][ratio]
    faces = res.extra.get("faces") or []
    assert len(faces) == 1 and res.extra["keep_faces"] is True
    face = Box(*faces[0]["box"])
    assert face.contains(HER_FACE), face  # the detector found her face, where the photo has it
    assert res.box.contains(HER_FACE, tol=1), (ratio, res.box, face)  # measured on the photo, not the report
    assert res.box.contains(face, tol=1), (ratio, res.box, face)
    assert not any("left out" in n or "cannot keep" in n for n in res.notes), res.notes

