"""Golden crops for "the main face is the face the photo is about" (engine/subject/faces.py,
rank_scores / not_a_face), on two generated photos built from scikit-image's `astronaut`
(Eileen Collins, NASA: public domain), and unit tests of the ranking on hand-made detections.

  shirt    a portrait photo of two people (her head twice, above two plain shirts) with a larger
           copy of her face printed on the left shirt: MediaPipe finds the print, with more
           confidence than either head. A person keeps the two heads; the engine once kept the
           print (the largest 'face') and cut both heads off at 16:9.
  blurred  a landscape photo with her head, sharp, left of the middle and a larger copy at the
           right edge, out of focus: where one crop cannot hold both (1:1, 4:5, 9:16) a person
           keeps the sharp face; the engine once kept the larger, blurred one.

Each crop is checked against the faces' known pixel boxes (where the photo was built to have
them), not against what the engine reports.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cropper_engine.config import load_config
from cropper_engine.engine.subject import Face, faces_to_keep, fits, keep_faces_whole, main_face_indices
from cropper_engine.engine.subject.faces import (
    main_face_indices_by_size,
    not_a_face,
    rank_scores,
)
from cropper_engine.types import Box, CropRequest, Ratio, Task

needs_mp = pytest.mark.usefixtures("mediapipe_installed")  # skips here without it, fails in CI

# her head with the hair, and her face, in the astronaut photo (rows, columns)
HEAD = (slice(20, 210), slice(140, 320))
FACE = (slice(60, 185), slice(165, 290))


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def shirt_photo() -> tuple[np.ndarray, list[Box], Box]:
    """640x1000: two heads above two shirts, her face printed 200 px wide on the left shirt.
    Returns the photo, the two real faces' boxes and the print's."""
    import cv2

    ast = _astronaut()
    img = np.full((1000, 640, 3), (170, 190, 210), np.uint8)
    faces = []
    for x0, colour in ((60, (40, 60, 140)), (340, (140, 40, 40))):
        img[300:, x0:x0 + 240] = colour  # the shirt
        img[60:250, x0 + 30:x0 + 210] = ast[HEAD]  # the head: her face at x0+55..x0+180, 100..225
        faces.append(Box(x0 + 55, 100, x0 + 180, 225))
    img[420:620, 80:280] = cv2.resize(ast[FACE], (200, 200), interpolation=cv2.INTER_AREA)
    return img, faces, Box(80, 420, 280, 620)


def blurred_photo() -> tuple[np.ndarray, Box, Box]:
    """1200x700: her head (sharp) at x 300..480, and a copy 1.6 times larger, turned a little
    (its left side squeezed) and out of focus (Gaussian blur, sigma 5 px), at the right edge.
    Returns the photo, the sharp face's box and the blurred face's."""
    import cv2

    ast = _astronaut()
    h, w = 700, 1200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.dstack([(150 + 40 * xx / w).astype(np.uint8), (160 + 30 * yy / h).astype(np.uint8),
                     np.full((h, w), 170, np.uint8)])
    head = ast[HEAD]
    img[240:430, 300:480] = head  # her face at 325..450, 280..405
    u = np.linspace(0.0, 1.0, head.shape[1]) ** 1.3  # a head turned a little: the left side squeezed
    mapx = np.tile((u * (head.shape[1] - 1)).astype(np.float32), (head.shape[0], 1))
    mapy = np.repeat(np.arange(head.shape[0], dtype=np.float32)[:, None], head.shape[1], 1)
    turned = cv2.remap(head, mapx, mapy, cv2.INTER_LINEAR)
    big = cv2.GaussianBlur(cv2.resize(turned, (288, 304), interpolation=cv2.INTER_AREA), (0, 0), 5.0)
    img[200:504, w - 298:w - 10] = big  # her face, turned (x 39..156 of 180) and 1.6 times larger
    return img, Box(325, 280, 450, 405), Box(w - 298 + 62, 264, w - 298 + 250, 464)


@pytest.fixture(scope="module")
def cropper():
    """The shipped default as `cropper-engine crop` runs it without a VLM (keep_faces auto)."""
    from cropper_engine.engine.loop import Cropper

    return Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))


def crops(cropper, path, ratios):
    rows = cropper.crop(CropRequest(path, Task.RATIO, ratios))
    free = cropper.crop(CropRequest(path, Task.FREE))
    return {str(r.ratio): r for r in rows} | {"free": free[0]}


RATIOS = ["1:1", "4:5", "16:9", "9:16", "3:2"]


@needs_mp
def test_mediapipe_finds_the_print_and_the_ranking_drops_it(tmp_path):
    """What the detector sees: the print, larger and more confident than the heads; the ranking
    takes it for no face (on the body below a face) and keeps both heads as the main faces."""
    from cropper_engine.engine.subject import detect_faces

    img, heads, printed = shirt_photo()
    faces = detect_faces(Image.fromarray(img))
    assert len(faces) == 3
    big = faces[0]  # largest first
    assert big.box.iou(printed) > 0.6 and big.score > max(f.score for f in faces[1:])
    assert big.why and "on the body below the face" in big.why and big.main is False
    for head in heads:
        f = max(faces, key=lambda fc: fc.box.iou(head))
        assert f.box.iou(head) > 0.5 and f.main and not f.why
    # the rule before the ranking: all three main, the print first; no 16:9 crop holds all three,
    # so the crop held the print alone (the heads left out "beside the larger face")
    assert main_face_indices_by_size(faces) == [0, 1, 2]
    assert not fits(Box(min(f.box.x1 for f in faces), min(f.box.y1 for f in faces), max(f.box.x2 for f in faces),
                        max(f.box.y2 for f in faces)), 16 / 9, 640, 1000)


@needs_mp
@pytest.mark.parametrize("ratio", [*RATIOS, "free"])
def test_a_face_printed_on_a_shirt_is_not_the_main_face(cropper, tmp_path, ratio):
    """At every ratio the crop holds both real faces (every ratio here can): at 16:9 the crop
    once held the shirts from the chest down and cut both heads off."""
    img, heads, _ = shirt_photo()
    path = tmp_path / "shirt.png"
    Image.fromarray(img).save(path)
    res = crops(cropper, path, RATIOS)[ratio]
    for head in heads:
        assert res.box.contains(head, tol=1), (ratio, res.box, head, res.notes)
    assert not any("main face" in n or "cannot keep" in n for n in res.notes), res.notes
    row = {tuple(f["box"]): f for f in res.extra["faces"]}
    assert sum(1 for f in row.values() if f.get("main")) == 2
    assert sum(1 for f in row.values() if "not_a_face" in f) == 1


@needs_mp
def test_mediapipe_finds_both_and_ranks_the_sharp_face_first():
    from cropper_engine.engine.subject import detect_faces

    img, sharp, blurred = blurred_photo()
    faces = detect_faces(Image.fromarray(img))
    assert len(faces) == 2
    big, small = faces  # largest first
    assert big.box.iou(blurred) > 0.4 and small.box.iou(sharp) > 0.5
    assert big.features["focus"] < 0.4 * small.features["focus"]
    assert small.rank_score > 1.5 * big.rank_score and small.main
    assert main_face_indices(faces)[0] == 1
    assert main_face_indices_by_size(faces)[0] == 0  # the rule before: the larger, blurred face first


@needs_mp
@pytest.mark.parametrize("ratio", [*RATIOS, "free"])
def test_the_sharp_face_beside_a_larger_blurred_one(cropper, tmp_path, ratio):
    """At every ratio the crop holds the sharp face; where it cannot hold the blurred face too
    (1:1, 4:5, 9:16) it leaves it out whole and the note names the face kept and why."""
    img, sharp, blurred = blurred_photo()
    path = tmp_path / "blurred.png"
    Image.fromarray(img).save(path)
    res = crops(cropper, path, RATIOS)[ratio]
    assert res.box.contains(sharp, tol=1), (ratio, res.box, res.notes)
    assert not any("cannot keep" in n for n in res.notes), res.notes
    if ratio in ("1:1", "4:5", "9:16"):
        inter = res.box.intersection(blurred)
        assert inter < 0.1 * blurred.area, (ratio, res.box)
    left_out = [n for n in res.notes if "left out" in n]
    if left_out:  # a minor face: ranked under half the sharp one, out of focus
        assert "minor face" in left_out[0] and "out of focus" in left_out[0], left_out


# --- the ranking on hand-made detections --------------------------------------------------


def face(x1, y1, x2, y2, score=0.9, **features):
    b = Box(x1, y1, x2, y2)
    return Face(b, score, b, features=dict(features))


def kp_frontal(b: Box):
    """Keypoints of a face seen from the front: eyes, nose tip, mouth, ears (BlazeFace's order)."""
    x, y, w, h = b.x1, b.y1, b.width, b.height
    return ((x + .35 * w, y + .4 * h), (x + .65 * w, y + .4 * h), (x + .5 * w, y + .6 * h),
            (x + .5 * w, y + .78 * h), (x + .1 * w, y + .45 * h), (x + .9 * w, y + .45 * h))


def kp_profile(b: Box):
    """A face in profile, looking left: the nose tip beyond the eyes, one ear far behind."""
    x, y, w, h = b.x1, b.y1, b.width, b.height
    return ((x + .35 * w, y + .4 * h), (x + .45 * w, y + .4 * h), (x + .2 * w, y + .6 * h),
            (x + .35 * w, y + .78 * h), (x + .75 * w, y + .45 * h), (x + .8 * w, y + .45 * h))


def test_frontal_ness_from_the_keypoints():
    from cropper_engine.engine.subject.detectors import _frontal, _keypoints_ok

    b = Box(0, 0, 100, 100)
    assert _frontal(kp_frontal(b)) == pytest.approx(1.0)
    assert _frontal(kp_profile(b)) < 0.2
    assert _keypoints_ok(kp_frontal(b), b) and _keypoints_ok(kp_profile(b), b)
    upside_down = tuple((x, 100 - y) for x, y in kp_frontal(b))
    assert _keypoints_ok(upside_down, b)  # any rotation
    scattered = ((10, 10), (90, 12), (50, 95), (48, 20), (5, 50), (95, 50))
    assert not _keypoints_ok(scattered, b)  # the mouth above the nose, by the eyes


def test_a_blurred_profile_ranks_below_a_smaller_sharp_frontal_face():
    """The laughing face and the blurred profile beside it: the profile is larger, but out of
    focus and turned away, so the smaller face ranks first and the profile is not a main face;
    in profile alone (sharp) it would stay one."""
    laughing = Box(100, 200, 180, 280)
    profile = Box(600, 150, 700, 250)
    a = Face(laughing, 0.9, laughing, kp_frontal(laughing), {"focus": 20.0, "frontal": 1.0})
    b = Face(profile, 0.9, profile, kp_profile(profile), {"focus": 4.0, "frontal": 0.1})
    assert main_face_indices([b, a]) == [1]
    assert main_face_indices_by_size([b, a]) == [0, 1]
    b.features["focus"] = 19.0
    assert main_face_indices([b, a])[0] in (0, 1) and len(main_face_indices([b, a])) == 2
    # when one 9:16 crop of a 800x400 photo cannot hold both, the crop keeps the sharp one and says why
    b.features["focus"] = 4.0
    kept = faces_to_keep([b, a], 9 / 16, 800, 400)
    assert [k.main for k in kept] == [False, True]
    box, ok = keep_faces_whole(Box(500, 0, 725, 400), kept, 800, 400, 9 / 16)
    assert ok and box.contains(laughing)


def test_three_faces_at_9_16_keep_the_best_ranked_and_say_why():
    """A 3-face group no 9:16 crop can hold: the crop keeps the best-ranked face, which is not
    the largest (that one is out of focus), and the note names it and why."""
    from cropper_engine.engine.subject import faces_left_out_note

    w, h = 1200.0, 500.0
    boxes = [Box(100, 100, 250, 250), Box(500, 120, 630, 250), Box(900, 120, 1030, 250)]
    faces = [Face(b, s, b, kp_frontal(b), {"focus": f, "frontal": 1.0})
             for b, s, f in zip(boxes, (0.9, 0.9, 0.7), (3.0, 20.0, 18.0), strict=True)]
    order = main_face_indices(faces)
    assert order[0] == 1 and 0 not in order  # the largest is out of focus: not a main face
    kept = faces_to_keep(faces, 9 / 16, w, h)
    assert [k.main for k in kept] == [False, True, False]
    box, ok = keep_faces_whole(Box(800, 0, 1081.25, 500), kept, w, h, 9 / 16)
    assert ok and box.contains(boxes[1])
    note = faces_left_out_note(box, faces, kept, "9:16")
    assert "1 main face ([900, 120, 1030, 250])" in note
    assert "beside the face it keeps ([500, 120, 630, 250], ranked first: more clearly a face)" in note
    assert "1 minor face ([100, 100, 250, 250]; ranked under 50% of the best face: out of focus" in note


def test_a_larger_face_on_the_body_below_a_face_is_not_a_face():
    """A print on a shirt (1.3 times the face above it or more, on its body) is not a face; a
    smaller face there (a child held, the front row of a group) is one, and so is a larger face
    with shoulders of its own below it (someone in front)."""
    heads = [face(100, 100, 200, 200), face(400, 100, 500, 200)]
    printed = face(80, 320, 240, 480)
    assert not_a_face([printed, *heads])[0].startswith("on the body below the face at [100, 100, 200, 200]")
    assert main_face_indices([printed, *heads]) == [1, 2]
    assert rank_scores([printed, *heads])[0] == 0.0
    child = face(110, 300, 190, 380)
    assert not_a_face([*heads, child]) == [None, None, None]
    in_front = face(80, 320, 240, 480, shoulders=3.0)
    assert not_a_face([in_front, *heads]) == [None, None, None]
    beside = face(420, 320, 580, 480)  # under the other head: on its body too
    assert not_a_face([beside, *heads])[0]
    far = face(700, 320, 860, 480)  # nobody above it
    assert not_a_face([far, *heads]) == [None, None, None]


def test_a_large_weak_detection_needs_a_person_and_a_face_layout():
    """In foliage, clouds or fireworks: a large detection under 0.8 confidence with nobody in
    the person segmentation is not a face, nor one whose keypoints are out of place; small
    detections are not checked (the segmentation misses small real faces), nor confident ones."""
    cloud = face(0, 0, 300, 300, 0.6, share=0.5, person=0.0)
    assert not_a_face([cloud]) == ["no person around it"]
    assert main_face_indices([cloud]) == []
    assert not_a_face([face(0, 0, 300, 300, 0.6, share=0.5, person=0.9)]) == [None]
    assert not_a_face([face(0, 0, 300, 300, 0.85, share=0.5, person=0.0)]) == [None]
    assert not_a_face([face(0, 0, 30, 30, 0.6, share=0.05, person=0.0)]) == [None]
    odd = face(0, 0, 300, 300, 0.6, share=0.5, keypoints_ok=False)
    assert not_a_face([odd]) == ["its eyes, nose and mouth are not where a face has them"]


def test_without_features_the_ranking_is_the_size_rule():
    """Hand-made faces (no keypoints, no focus; the Haar fallback's) rank by size and
    confidence: the main faces are those of the rule before."""
    fs = [face(100, 100, 200, 200), face(400, 100, 450, 150), face(700, 50, 730, 80), face(300, 120, 330, 150)]
    assert sorted(main_face_indices(fs)) == main_face_indices_by_size(fs) == [0, 1, 3]


def test_ratio_words_of_the_golden_photos():
    """The ratios above are the README's common ones (Ratio parses each)."""
    assert [Ratio.parse(r).value for r in RATIOS]
