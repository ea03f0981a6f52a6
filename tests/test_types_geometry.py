"""Box conversions, ratios and geometry helpers."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cropper_engine.engine.geometry import (
    dedupe,
    expand_to_contain,
    fit_ratio,
    iou_matrix,
    largest_centered,
    mask_bbox,
    mask_center,
    nms,
)
from cropper_engine.errors import InputError
from cropper_engine.types import Box, CropRequest, Ratio, Task


def test_norm_round_trip_edges():
    b = Box(0, 0, 800, 600)
    assert b.to_norm(800, 600) == (1, 1, 1000, 1000)
    back = Box.from_norm((1, 1, 1000, 1000), 800, 600)
    assert back == Box(0.0, 0.0, 800.0, 600.0)
    # the centre of a 1000-px axis: 1 + 0.5 * 999 = 500.5 -> 500 (banker's rounding) or 501
    assert Box(500, 500, 1000, 1000).to_norm(1000, 1000)[0] in (500, 501)


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1),
       st.integers(16, 4000), st.integers(16, 4000))
def test_norm_round_trip_error_below_one_step(a, b, c, d, w, h):
    box = Box(min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h)
    back = Box.from_norm(box.to_norm(w, h), w, h)
    # one normalised step is size/999 px; rounding loses at most half of it
    assert abs(back.x1 - box.x1) <= w / 999 / 2 + 1e-6
    assert abs(back.y2 - box.y2) <= h / 999 / 2 + 1e-6


def test_box_basics():
    b = Box(10, 20, 110, 70)
    assert b.width == 100 and b.height == 50 and b.area == 5000 and b.aspect == 2
    assert b.center == (60, 45)
    assert Box(-5, -5, 50, 900).clamp(100, 100) == Box(0, 0, 50, 100)
    assert Box(50, 60, 10, 20).clamp(100, 100) == Box(10, 20, 50, 60)  # corners ordered
    # IoU by hand: overlap 50x50=2500; union 10000+10000-2500=17500
    assert Box(0, 0, 100, 100).iou(Box(50, 50, 150, 150)) == pytest.approx(2500 / 17500)
    assert Box(0, 0, 10, 10).iou(Box(20, 20, 30, 30)) == 0.0
    assert not Box(5, 5, 5, 10).is_valid()


def test_ratio_parse():
    assert Ratio.parse("16:9").value == pytest.approx(16 / 9)
    assert str(Ratio.parse("4x5")) == "4:5"
    assert str(Ratio.parse("1.91:1")) == "1.91:1"
    for bad in ("0:5", "abc", "3:", "-1:2", "inf:1", "100:1", ""):
        with pytest.raises(InputError):
            Ratio.parse(bad)


def test_crop_request_validation():
    with pytest.raises(InputError, match="ratio"):
        CropRequest("x.jpg", "ratio")
    with pytest.raises(InputError, match="mask"):
        CropRequest("x.jpg", "subject")
    with pytest.raises(InputError, match="free, subject, ratio"):
        CropRequest("x.jpg", "square")
    r = CropRequest("x.jpg", "aspect-ratio", ["1:1", "16:9"])
    assert r.task is Task.RATIO and [str(x) for x in r.ratios] == ["1:1", "16:9"]


def test_largest_centered():
    assert largest_centered(800, 600, 1.0) == Box(100, 0, 700, 600)
    b = largest_centered(800, 600, 16 / 9)
    assert b.width == 800 and b.height == pytest.approx(450) and b.y1 == pytest.approx(75)
    assert largest_centered(800, 600) == Box(0, 0, 800, 600)


@given(st.floats(0, 700), st.floats(0, 500), st.floats(10, 800), st.floats(10, 600),
       st.sampled_from([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.5]))
def test_fit_ratio_exact_and_inside(x, y, w, h, ratio):
    box = Box(x, y, min(x + w, 800), min(y + h, 600))
    if not box.is_valid():
        return
    out = fit_ratio(box, ratio, 800, 600)
    assert out.aspect == pytest.approx(ratio, rel=1e-6)
    assert out.x1 >= -1e-9 and out.y1 >= -1e-9 and out.x2 <= 800 + 1e-9 and out.y2 <= 600 + 1e-9


def test_expand_to_contain_keeps_ratio_and_subject():
    subject = Box(600, 100, 700, 300)
    out = expand_to_contain(Box(0, 0, 300, 300), subject, 800, 600, 1.0)
    assert out.contains(subject) and out.aspect == pytest.approx(1.0)
    # a subject taller than the image allows at 4:1: the largest 4:1 box centred on it
    tall = Box(380, 0, 420, 600)
    out = expand_to_contain(Box(0, 0, 100, 25), tall, 800, 600, 4.0)
    assert out.aspect == pytest.approx(4.0) and out.width == pytest.approx(800)


def test_iou_matrix_nms_dedupe():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    m = iou_matrix(a, a)
    assert m[0, 1] == 1 and m[0, 2] == 0
    boxes = [Box(*r) for r in a]
    assert nms(boxes, [0.1, 0.9, 0.5], 0.5) == [1, 2]
    assert dedupe(boxes, 0.9) == [0, 2]


def test_mask_helpers():
    m = np.zeros((10, 20), bool)
    m[2:4, 5:9] = True
    assert mask_bbox(m) == Box(5, 2, 9, 4)
    cx, cy = mask_center(m)
    assert (cx, cy) == (7.0, 3.0)
    assert math.isfinite(cx)


def test_types_import_nothing_of_the_engine():
    """types.py is the bottom layer: parsing a request's subject needs no engine module (the
    circle types -> engine/subject -> types is gone)."""
    import subprocess
    import sys

    code = ("import sys; from cropper_engine.types import CropRequest, SubjectSpec; "
            "r = CropRequest('x.jpg', 'subject', subject='10,10,50,60'); assert r.subject.kind == 'box'; "
            "bad = [m for m in sys.modules if m.startswith('cropper_engine.engine')]; assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_whole_pixel_size_is_the_nearest_ratio_a_pixel_or_two_away():
    """For each box, the whole-pixel size has the ratio nearest the one asked for among every
    integer size whose width is within a pixel or two of the box's (any height): the measure
    is the input's own geometry, not a tolerance. (Rounding the height down instead of to the
    nearest, `int(w / ratio)`, gives about one box in six a worse ratio: this fails then.)"""
    from cropper_engine.engine.geometry import ratio_error, whole_pixel_size

    rng = np.random.default_rng(20)
    ratios = [16 / 9, 4 / 3, 3 / 2, 4 / 5, 9 / 16, 1.85, 2.39, 1.618, 5 / 4, 21 / 9]
    worse = []
    for _ in range(3000):
        ratio = ratios[int(rng.integers(len(ratios)))]
        W, H = 1600, 1200
        w0 = float(rng.uniform(40, min(W, H * ratio) - 3))
        w, h = whole_pixel_size(w0, ratio, W, H)
        assert 1 <= w <= W and 1 <= h <= H and abs(w - w0) <= 2
        best = min(ratio_error(cw, ch, ratio) for cw in range(math.floor(w0) - 1, math.floor(w0) + 3)
                   for ch in (math.floor(cw / ratio), math.ceil(cw / ratio)) if 1 <= cw <= W and 1 <= ch <= H)
        if ratio_error(w, h, ratio) > best + 1e-12:
            worse.append((w0, ratio, (w, h)))
    assert not worse, (len(worse), worse[:3])
    assert whole_pixel_size(300.4, 1.0, 800, 600) in ((300, 300), (301, 301))  # 1:1 stays square


def test_tiny_images_get_the_exact_ratio_that_fits_or_a_note():
    """50 x 20000 at 20:1: 40x2 (exact) rather than 49x2 or 50x2 (a quarter off); a 1x1 image has
    no box near 16:9 at all: 1x1, and the note says so; a big image needs no note."""
    from cropper_engine.engine.geometry import ratio_note, whole_pixel_box, whole_pixel_size

    assert whole_pixel_size(50.0, 20.0, 50, 20_000) == (40, 2)
    b = whole_pixel_box(Box(0, 100, 50, 102.5), 20.0, 50, 20_000)
    assert (b.width, b.height) == (40, 2) and ratio_note(b, 20.0, "20:1", 50, 20_000) is None
    assert whole_pixel_size(1.0, 16 / 9, 1, 1) == (1, 1)
    note = ratio_note(Box(0, 0, 1, 1), 16 / 9, "16:9", 1, 1)
    assert note and "no whole-pixel box of 16:9 fits this 1x1 image: the crop is 1x1" in note
    assert whole_pixel_size(7.0, 16 / 9, 1000, 4) == (7, 4)  # 1.75: within 1.6% of 16:9 ...
    assert ratio_note(Box(0, 0, 7, 4), 16 / 9, "16:9", 1000, 4)  # ... over the 1% a note allows
    assert ratio_note(Box(0, 0, 1600, 900), 16 / 9, "16:9", 2000, 1000) is None
