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
