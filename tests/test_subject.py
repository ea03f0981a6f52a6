"""Subjects without a hand-made mask (engine/subject/): specs, detectors on a real photo,
faces kept whole by every pipeline, graceful fallbacks, the CLI end to end and the report.

The photo with a face is scikit-image's `astronaut` (Eileen Collins, NASA: public domain),
written by the `photos` fixture; `coffee` (CC0) and `rocket` (NASA, public domain) have nobody.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cropper_engine.cli import main
from cropper_engine.config import load_config
from cropper_engine.engine import subject as subj
from cropper_engine.engine.subject import SubjectSpec, cuts, keep_faces_whole, resolve_subject
from cropper_engine.errors import BackendUnavailableError, CropperError, ImageError, InputError
from cropper_engine.models.base import Generation
from cropper_engine.types import Box, CropRequest, Task

RATIOS = ["1:1", "16:9", "9:16", "4:1"]
# Her face in the 512 x 512 astronaut photo, brows to chin, as measured on the photo (inside the
# box any detector finds): the crops are checked against it, not against the engine's report.
HER_FACE = Box(180, 75, 270, 165)


def room_for(inner: Box, ratio: float, w: int = 512, h: int = 512) -> bool:
    """Whether the largest crop of `ratio` in a w x h image is wide and tall enough for `inner`
    (the test's own geometry, not the engine's `fits`)."""
    cw = min(w, h * ratio)
    return inner.width <= cw and inner.height <= cw / ratio


def photo(photos, name):
    return next(p for p in photos if p.stem == name)



needs_mp = pytest.mark.usefixtures("mediapipe_installed")  # skips here without it, fails in CI


@pytest.fixture(autouse=True)
def _fresh_detectors():
    """Each test sees the built-in detectors (a test may replace them)."""
    yield
    subj.reset_detectors()


@pytest.fixture(scope="module")
def cropper():
    from cropper_engine.engine.loop import Cropper

    return Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


# --- specs ------------------------------------------------------------------------------


def test_spec_words_points_boxes_and_paths(tmp_path):
    assert SubjectSpec.parse("auto").kind == "auto"
    assert SubjectSpec.parse(" Faces ").kind == "face"
    assert SubjectSpec.parse("people").kind == "person"
    assert SubjectSpec.parse("saliency").kind == "saliency"
    p = SubjectSpec.parse("100,200")
    assert p.kind == "point" and p.values == (100.0, 200.0)
    assert SubjectSpec.parse("10.5, 20").values == (10.5, 20.0)
    b = SubjectSpec.parse("10,10,200,150")
    assert b.kind == "box" and b.values == (10, 10, 200, 150)
    assert SubjectSpec.parse((3, 4)).kind == "point"
    m = SubjectSpec.parse(str(tmp_path / "mask.png"))
    assert m.kind == "mask" and m.path.endswith("mask.png")
    assert SubjectSpec.parse(np.ones((4, 4), bool)).kind == "mask"


@pytest.mark.parametrize("text, words", [
    ("10,10,5,20", ["negative width", "X2 > X1"]),
    ("10,30,50,20", ["negative height", "Y2 > Y1"]),
    ("10,10,10,20", ["no width"]),
    ("1,2,3", ["3 numbers", "X,Y", "X1,Y1,X2,Y2"]),
    ("facez", ["unknown subject", "auto, face, person, saliency"]),
    ("", ["empty subject"]),
])
def test_bad_specs_name_the_valid_forms(text, words):
    with pytest.raises(InputError) as e:
        SubjectSpec.parse(text)
    for w in words:
        assert w in str(e.value)


def test_point_outside_and_box_outside_the_image(photos):
    img = Image.open(photo(photos, "coffee"))  # 600 x 400
    with pytest.raises(InputError, match="focal point 5000,10 lies outside the 600x400 image"):
        resolve_subject("5000,10", img)
    with pytest.raises(InputError, match="outside"):
        resolve_subject("-5,10", img)
    with pytest.raises(InputError, match="box 700,10,800,50 lies outside"):
        resolve_subject("700,10,800,50", img)
    part = resolve_subject("500,300,900,900", img)  # partly outside: clipped, with a note
    assert part.kind == "box" and part.box.as_int() == [500, 300, 600, 400]
    assert any("clipped" in n for n in part.notes)


def test_masks_of_the_wrong_size_or_empty_are_refused(photos, tmp_path):
    img = Image.open(photo(photos, "coffee"))
    wrong = tmp_path / "wrong.png"
    Image.new("L", (100, 80), 255).save(wrong)
    with pytest.raises(ImageError, match="the mask is 100x80 but the image is 600x400"):
        resolve_subject(str(wrong), img)
    empty = tmp_path / "empty.png"
    Image.new("L", img.size, 0).save(empty)
    with pytest.raises(ImageError, match="empty"):
        resolve_subject(str(empty), img)
    with pytest.raises(ImageError, match="no such file"):
        resolve_subject(str(tmp_path / "missing.png"), img)


def test_point_and_box_subjects(photos):
    img = Image.open(photo(photos, "coffee"))
    p = resolve_subject("100,200", img)
    side = subj.FOCAL_FRACTION * 400  # a square of 10 % of the shorter side
    assert p.kind == "point" and p.focal_points == [(100, 200)]
    assert p.box.as_int() == [round(100 - side / 2), round(200 - side / 2), round(100 + side / 2),
                              round(200 + side / 2)]
    assert p.mask.shape == (400, 600) and p.mask.sum() == pytest.approx(side * side, rel=0.05)
    b = resolve_subject("10,10,200,150", img)
    assert b.kind == "box" and b.box.as_int() == [10, 10, 200, 150] and b.outline
    # nothing is detected for a point or a box unless asked
    assert not b.detectors and not p.faces


def test_request_validation():
    with pytest.raises(InputError, match="not both"):
        CropRequest("x.jpg", Task.SUBJECT, mask=np.ones((2, 2), bool), subject="auto")
    with pytest.raises(InputError, match="free-form"):
        CropRequest("x.jpg", Task.FREE, subject="auto")
    with pytest.raises(InputError, match="subject task needs a subject"):
        CropRequest("x.jpg", Task.SUBJECT)
    with pytest.raises(InputError, match="negative width"):
        CropRequest("x.jpg", Task.SUBJECT, subject="10,10,5,20")
    r = CropRequest("x.jpg", Task.RATIO, ["1:1"], subject="auto")
    assert r.subject.kind == "auto" and r.keep_faces is None


# --- keeping faces whole (geometry) -------------------------------------------------------


def test_keep_faces_grows_or_shrinks_whichever_is_closer():
    face = Box(100, 100, 150, 150)
    # the crop's edge grazes the face: growing by 10 px is closer than dropping 40 px
    grown, ok = keep_faces_whole(Box(0, 0, 140, 300), [face], 400, 300, None)
    assert ok and grown.contains(face) and grown.as_list() == [0, 0, 150, 300]
    # the crop barely enters the face: leaving it out is closer
    shrunk, ok = keep_faces_whole(Box(145, 0, 400, 300), [face], 400, 300, None)
    assert ok and not cuts(shrunk, face) and shrunk.x1 == 150
    # with a ratio, the repair keeps it
    fixed, ok = keep_faces_whole(Box(0, 50, 140, 190), [face], 400, 300, 1.0)
    assert ok and not cuts(fixed, face) and fixed.width == pytest.approx(fixed.height)


def test_keep_faces_impossible_keeps_the_largest():
    big, small = Box(100, 50, 200, 250), Box(300, 100, 330, 130)
    # a 4:1 crop of a 400x300 image is at most 100 px tall: the 200 px face cannot be kept, the small one can
    box, ok = keep_faces_whole(Box(0, 100, 400, 200), [big, small], 400, 300, 4.0)
    assert ok and not cuts(box, big) and not cuts(box, small)  # it can leave both out
    # but not while it must hold the big face (the subject)
    box, ok = keep_faces_whole(Box(0, 100, 400, 200), [big, small], 400, 300, 4.0, required=big)
    assert not ok
    note = subj.face_cut_note(box, [subj.Face(big, 0.9, big), subj.Face(small, 0.9, small)], "4:1")
    assert note and "cannot keep the best-ranked face ([100, 50, 200, 250]) whole" in note


def _face(x1, y1, x2, y2):
    b = Box(x1, y1, x2, y2)
    return subj.Face(b, 0.9, b)


def test_main_faces_are_the_largest_and_those_half_its_size_or_between_them():
    big, half, small, between = (_face(100, 100, 200, 200), _face(400, 100, 450, 150), _face(700, 50, 730, 80),
                                 _face(300, 120, 330, 150))
    assert subj.main_face_indices([big, half, small]) == [0, 1]  # 50 px of 100: main; 30 px: not
    assert subj.main_face_indices([big, half, between, small]) == [0, 1, 2]  # small but between the main ones
    assert subj.main_face_indices([]) == []


def test_main_faces_are_inside_every_crop_that_can_hold_them():
    """A crop proposed away from the faces is grown (at its ratio) to hold both main faces; a
    small face at the edge is not pulled in."""
    w, h = 1000.0, 600.0
    faces = [_face(100, 100, 200, 200), _face(400, 100, 460, 160), _face(940, 500, 970, 530)]
    kept = subj.faces_to_keep(faces, 16 / 9, w, h)
    assert [k.main for k in kept] == [True, True, False]
    box, ok = keep_faces_whole(Box(500, 250, 900, 475), kept, w, h, 16 / 9)
    assert ok and box.contains(faces[0].box) and box.contains(faces[1].box)
    assert box.aspect == pytest.approx(16 / 9, rel=1e-3)
    assert not cuts(box, faces[2].box)
    note = subj.faces_left_out_note(box, faces, kept, "16:9")
    assert note and "1 minor face" in note and "smaller" in note and "near the image's edge" in note
    assert "main" not in note
    # a crop already holding them is left alone
    inside = Box(50, 50, 550, 331.25)
    assert keep_faces_whole(inside, kept, w, h, 16 / 9)[0] == inside


def test_main_faces_that_do_not_fit_one_crop_of_the_ratio():
    """At 9:16 two main faces far apart cannot share a crop: the largest stays main, the other is
    only kept whole (never cut) and the note says the ratio could not hold it."""
    w, h = 1000.0, 600.0
    faces = [_face(100, 100, 200, 200), _face(800, 100, 880, 180)]
    kept = subj.faces_to_keep(faces, 9 / 16, w, h)
    assert [k.main for k in kept] == [True, False]
    box, ok = keep_faces_whole(Box(600, 0, 937.5, 600), kept, w, h, 9 / 16)
    assert ok and box.contains(faces[0].box) and not cuts(box, faces[1].box)
    note = subj.faces_left_out_note(box, faces, kept, "9:16")
    assert note and "1 main face" in note
    assert "cannot hold it beside the face it keeps ([100, 100, 200, 200], ranked first: larger)" in note


def test_main_persons_make_the_subject_when_all_do_not_fit():
    w, h = 1200.0, 600.0
    persons = [Box(100, 50, 400, 600), Box(800, 100, 1000, 600), Box(1150, 400, 1190, 500)]
    sub = subj.Subject("person", "person", None, Box(100, 50, 1190, 600), persons=persons)
    box, note = subj.job_subject_box(sub, 1.0, w, h)  # a square crop is at most 600 px wide
    assert box == persons[0] and note and "the largest person" in note
    box, note = subj.job_subject_box(sub, 16 / 9, w, h)  # 1067 px wide: the two large persons
    assert box.contains(persons[0]) and box.contains(persons[1]) and "2 largest persons" in note
    assert subj.job_subject_box(sub, None, w, h) == (sub.box, None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 380), st.floats(0, 280), st.floats(8, 60)), min_size=1, max_size=4),
       st.tuples(st.floats(0, 399), st.floats(0, 299), st.floats(20, 400), st.floats(20, 300)),
       st.sampled_from([None, 1.0, 16 / 9, 9 / 16, 4.0]))
def test_keep_faces_property(faces, crop, ratio):
    """Whatever the crop and the faces: the result stays in the image, keeps its ratio, and
    when it reports success it cuts no face."""
    w, h = 400.0, 300.0
    fboxes = [Box(x, y, min(w, x + s), min(h, y + s)) for x, y, s in faces]
    x, y, cw, ch = crop
    box = Box(x, y, min(w, x + cw), min(h, y + ch))
    from cropper_engine.engine.geometry import fit_ratio

    if ratio:
        box = fit_ratio(box, ratio, w, h)
    out, ok = keep_faces_whole(box, fboxes, w, h, ratio, None, 2.0, 2.0)
    assert out.is_valid() and out.x1 >= -1e-6 and out.y1 >= -1e-6 and out.x2 <= w + 1e-6 and out.y2 <= h + 1e-6
    if ratio:
        assert out.aspect == pytest.approx(ratio, rel=1e-3)
    if ok:
        assert not any(cuts(out, f) for f in fboxes)


# --- detectors on a real photo ------------------------------------------------------------


@needs_mp
def test_the_astronauts_face_is_found(photos):
    img = Image.open(photo(photos, "astronaut"))  # 512 x 512
    faces = subj.detect_faces(img)
    assert len(faces) == 1
    f = faces[0]
    cx, cy = f.box.center
    # her face: between the hair and the collar, left of the centre
    assert 190 < cx < 260 and 90 < cy < 150 and 80 < f.box.width < 140 and f.score > 0.8
    assert f.keep.contains(f.box) and f.keep.y1 < f.box.y1 - 10  # the margin reaches up into the hair
    persons, mask = subj.detect_persons(img)
    assert persons and persons[0].contains(f.box, tol=2) and mask is not None


@needs_mp
@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_nobody_in_coffee_or_rocket_so_auto_uses_saliency(photos, name):
    img = Image.open(photo(photos, name))
    assert subj.detect_faces(img) == []
    assert subj.detect_persons(img)[0] == []
    s = resolve_subject("auto", img)
    assert s.kind == "saliency" and s.requested == "auto"
    assert s.mask.any() and s.box.area < 0.9 * img.width * img.height
    assert any("the subject is the salient region" in n for n in s.notes)
    assert s.to_extra()["subject"] == "saliency" and s.to_extra()["subject_requested"] == "auto"


def test_salient_region_of_the_coffee_cup(photos):
    img = Image.open(photo(photos, "coffee"))  # the cup and saucer sit left of centre
    s = resolve_subject("saliency", img)
    cx, cy = s.box.center
    assert 150 < cx < 400 and 120 < cy < 280 and s.box.area < 0.8 * 600 * 400


@needs_mp
def test_auto_picks_the_face_and_keeps_it_whole_at_every_ratio(photos, cropper):
    res = cropper.crop(CropRequest(photo(photos, "astronaut"), Task.RATIO, RATIOS, subject="auto"))
    assert [str(r.ratio) for r in res] == RATIOS
    for r in res:
        row = r.to_json()
        assert row["subject"] == "face" and row["subject_requested"] == "auto" and row["keep_faces"] is True
        assert Box(*row["faces"][0]["box"]).contains(HER_FACE)  # the detector found her face
        assert room_for(HER_FACE, r.ratio.value)  # a crop of each ratio can hold it ...
        boxes = [Box(*c["box"]) for c in row["candidates"]] + [r.box]
        cut = [b for b in boxes if cuts(b, HER_FACE)]
        assert not cut, (row["ratio"], cut)  # ... so none cuts it, whatever the notes say
        assert r.box.contains(HER_FACE, tol=1), (row["ratio"], r.box)  # auto: the face is the subject
        assert r.box.aspect == pytest.approx(r.ratio.value, rel=0.02)
        assert row["subject_box"] and row["subject_ms"]["faces"] >= 0  # reported (its speed: bench subject)


@needs_mp
def test_keep_faces_without_a_subject_and_off_on_request(photos, cropper):
    img = photo(photos, "astronaut")
    plain = cropper.crop(CropRequest(img, Task.RATIO, ["4:1"], keep_faces=False))[0]
    assert "faces" not in plain.extra and "subject" not in plain.extra  # no detector ran
    kept = cropper.crop(CropRequest(img, Task.RATIO, ["4:1", "9:16"], keep_faces=True))
    for r in kept:
        assert Box(*r.extra["faces"][0]["box"]).contains(HER_FACE)
        assert r.extra["keep_faces"] is True and "subject" not in r.extra
        assert room_for(HER_FACE, r.ratio.value)  # 4:1 is 512 x 128: her face fits
        assert not [c.box for c in r.candidates if cuts(c.box, HER_FACE)], str(r.ratio)
        assert not cuts(r.box, HER_FACE), (str(r.ratio), r.box)
    off = cropper.crop(CropRequest(img, Task.SUBJECT, subject="auto", keep_faces=False))[0]
    assert off.extra["keep_faces"] is False and off.extra["subject"] == "face"


class ScriptedVLM:
    """Proposes boxes that cut through the astronaut's face (1..1000 coordinates), or nothing."""

    id = "scripted"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, conversations, params):
        return [Generation(list(self.texts) * max(1, params.n // len(self.texts)), 10, 5) for _ in conversations]


@needs_mp
@pytest.mark.parametrize("texts, pipeline", [
    (["(4, 420, 1, 1000, 260)", "(4, 1, 200, 380, 1000)", "(4, 300, 250, 700, 1000)"], "vlm"),
    (["I cannot help with that."], "vlm-fallback"),
])
def test_faces_kept_whole_by_the_vlm_and_fallback_pipelines(photos, texts, pipeline):
    from cropper_engine.engine.loop import Cropper

    cfg = load_config(env={}, overrides={"vlm.candidates": 3, "vlm.rounds": 1})
    c = Cropper.from_config(cfg, vlm=ScriptedVLM(texts))
    res = c.crop(CropRequest(photo(photos, "astronaut"), Task.RATIO, ["1:1", "16:9"], keep_faces=True))
    for r in res:
        assert r.pipeline == pipeline
        face = Box(*r.extra["faces"][0]["box"])
        assert r.candidates and all(not cuts(cand.box, face) for cand in r.candidates)


def test_without_detectors_auto_falls_back_and_says_so(photos, cropper):
    subj.set_detectors(faces=None, persons=None)
    r = cropper.crop(CropRequest(photo(photos, "astronaut"), Task.SUBJECT, subject="auto"))[0]
    assert r.extra["subject"] == "saliency" and r.extra["subject_requested"] == "auto"
    assert any("no face detector here" in n for n in r.notes)
    assert any("no person detector here" in n for n in r.notes)
    with pytest.raises(BackendUnavailableError, match=r"cropper-engine\[subject\]"):
        cropper.crop(CropRequest(photo(photos, "astronaut"), Task.SUBJECT, subject="face"))
    with pytest.raises(BackendUnavailableError):
        subj.require_detectors(SubjectSpec.parse("person"))
    subj.require_detectors(SubjectSpec.parse("auto"))  # auto never needs one


def test_a_face_detector_behind_the_protocol(photos, cropper):
    """Any object with `name` and `detect(rgb) -> [(Box, score)]` serves as the face detector;
    its boxes are in the pixels of the downscaled copy it is given."""

    class Fixed:
        name = "fixed"

        def __init__(self):
            self.shapes = []

        def detect(self, rgb):
            self.shapes.append(rgb.shape)
            h, w = rgb.shape[:2]
            return [(Box(0.4 * w, 0.3 * h, 0.6 * w, 0.5 * h), 0.99)]

    det = Fixed()
    subj.set_detectors(faces=det, persons=None)
    r = cropper.crop(CropRequest(photo(photos, "coffee"), Task.RATIO, ["4:1"], subject="face"))[0]
    assert max(det.shapes[0][:2]) == subj.DETECT_SIDE  # 600 x 400 -> 512 x 341
    face = Box(*r.extra["faces"][0]["box"])
    assert face.as_int() == pytest.approx([240, 120, 360, 200], abs=2)
    assert r.extra["subject"] == "face" and r.extra["detectors"] == {"faces": "fixed"}
    assert r.box.contains(face, tol=1)


def test_haar_fallback_where_opencv_ships_its_cascades(photos):
    path = subj.HaarFaces.find()
    if path is None:
        pytest.skip("this OpenCV build ships no Haar cascade files (5.x wheels do not)")
    det = subj.HaarFaces(path)
    faces = subj.detect_faces(Image.open(photo(photos, "astronaut")), det)
    assert faces and 150 < faces[0].box.center[0] < 300


def test_a_bad_request_fails_alone(photos, cropper, tmp_path):
    wrong = tmp_path / "wrong.png"
    Image.new("L", (10, 10), 255).save(wrong)
    outs = cropper.crop_batch([
        CropRequest(photo(photos, "coffee"), Task.SUBJECT, subject="5000,10"),
        CropRequest(photo(photos, "coffee"), Task.SUBJECT, subject=str(wrong)),
        CropRequest(photo(photos, "coffee"), Task.SUBJECT, subject="100,200"),
    ])
    assert isinstance(outs[0], InputError) and "outside" in str(outs[0])
    assert isinstance(outs[1], ImageError) and "mask is 10x10" in str(outs[1])
    assert not isinstance(outs[2], CropperError) and outs[2][0].extra["subject"] == "point"
    r = outs[2][0]
    assert r.extra["focal_points"] == [[100.0, 200.0]] and r.box.contains(Box(*r.extra["subject_box"]), tol=1)


# --- the command line ---------------------------------------------------------------------


@needs_mp
def test_cli_subject_auto_with_ratios_and_report(photos, tmp_path):
    out = tmp_path / "out"
    res = run("crop", photo(photos, "astronaut"), photo(photos, "coffee"), "--subject", "auto",
              "--ratio", "1:1,4:1", "--out", out, "--report")
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    by = {(r["image"].rsplit("/", 1)[-1], r["ratio"]): r for r in rows}
    assert by[("astronaut.jpg", "1:1")]["subject"] == "face" and by[("coffee.jpg", "1:1")]["subject"] == "saliency"
    assert by[("astronaut.jpg", "4:1")]["faces"] and by[("coffee.jpg", "1:1")]["subject_outline"]
    html = (out / "report" / "index.html").read_text()
    assert "<polygon" in html and "subject <b>face</b>" in html and "subject <b>saliency</b>" in html
    assert 'stroke="#facc15"' in html  # the face drawn
    assert "Traceback" not in res.output


def test_cli_point_box_and_mask(photos, tmp_path):
    img = photo(photos, "coffee")
    res = run("crop", img, "--subject", "100,200", "--json")
    row = json.loads(next(x for x in res.output.splitlines() if x.startswith("{")))
    assert row["task"] == "subject" and row["subject"] == "point" and row["focal_points"] == [[100.0, 200.0]]
    res = run("crop", img, "--subject", "10,10,200,150", "--ratio", "16:9", "--json")
    row = json.loads(next(x for x in res.output.splitlines() if x.startswith("{")))
    assert row["task"] == "ratio" and row["subject"] == "box" and row["subject_box"] == [10, 10, 200, 150]
    assert Box(*row["box"]).contains(Box(10, 10, 200, 150), tol=1)
    mask = np.zeros((400, 600), np.uint8)
    mask[250:350, 400:550] = 255
    mpath = tmp_path / "mask.png"
    Image.fromarray(mask).save(mpath)
    out = tmp_path / "o"
    run("crop", img, "--subject", mpath, "--out", out, "--report")
    row = json.loads((out / "results.jsonl").read_text())
    assert row["subject"] == "mask" and row["subject_box"] == [400, 250, 550, 350]
    assert Box(*row["box"]).contains(Box(400, 250, 550, 350), tol=1)
    html = (out / "report" / "index.html").read_text()
    assert "<polygon" in html and "subject <b>mask</b>" in html
    # a focal point is drawn as a dot
    out2 = tmp_path / "o2"
    run("crop", img, "--subject", "100,200", "--out", out2, "--report")
    assert "<circle" in (out2 / "report" / "index.html").read_text()


@pytest.mark.parametrize("make_args, words", [
    (lambda img, d: ["--subject", "5000,10"], ["focal point 5000,10 lies outside the 600x400 image"]),
    (lambda img, d: ["--subject", "10,10,5,20"], ["negative width"]),
    (lambda img, d: ["--subject", "1,2,3"], ["3 numbers"]),
    (lambda img, d: ["--subject", "everything"], ["unknown subject", "auto, face, person, saliency"]),
    (lambda img, d: ["--subject", d / "wrong.png"], ["is 100x80", "600x400"]),
    (lambda img, d: ["--subject", d / "empty.png"], ["empty"]),
    (lambda img, d: ["--subject", "auto", "--mask", d / "empty.png"], ["give one"]),
    (lambda img, d: ["--subject", "auto", "--task", "free"], ["not to --task free"]),
])
def test_cli_bad_subjects_exit_with_a_clear_message(photos, tmp_path, make_args, words):
    Image.new("L", (100, 80), 255).save(tmp_path / "wrong.png")
    Image.new("L", (600, 400), 0).save(tmp_path / "empty.png")
    img = photo(photos, "coffee")
    res = run("crop", img, *make_args(img, tmp_path), ok=False)
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a ClickException, not a crash
    for w in words:
        assert w in res.output, res.output


def test_cli_subject_in_a_manifest(photos, tmp_path):
    lines = [{"image": str(photo(photos, "coffee")), "subject": "100,200"},
             {"image": str(photo(photos, "rocket")), "subject": "saliency", "ratio": "1:1"},
             {"image": str(photo(photos, "coffee")), "subject": "10,10,5,20"}]
    man = tmp_path / "list.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    res = run("crop", man, "--out", out, ok=False)
    assert res.exit_code == 1 and "negative width" in res.output  # the bad line alone fails
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["subject"]) for r in rows] == [("subject", "point"), ("ratio", "saliency")]


def test_cli_face_without_a_detector_fails_at_once(photos, monkeypatch):
    subj.set_detectors(faces=None, persons=None)
    res = run("crop", photo(photos, "coffee"), "--subject", "face", ok=False)
    assert res.exit_code != 0 and "cropper-engine[subject]" in res.output and "Traceback" not in res.output
    res = run("crop", photo(photos, "coffee"), "--subject", "auto", "--json")  # auto still works
    row = json.loads(next(x for x in res.output.splitlines() if x.startswith("{")))
    assert row["subject"] == "saliency"


@needs_mp
def test_eval_with_automatic_subjects(photos, tmp_path):
    img = photo(photos, "astronaut")
    ann = tmp_path / "set.jsonl"
    ann.write_text(json.dumps({"image": str(img), "crops": [[100, 20, 400, 330]]}) + "\n"
                   + json.dumps({"image": str(photo(photos, "coffee")), "crops": [[60, 10, 480, 390]]}) + "\n")
    res = run("eval", "--dataset", "jsonl", "--annotations", ann, "--method", "cropper", "--vlm", "none",
              "--subject", "auto", "--json", "--rows", tmp_path / "rows.jsonl")
    s = json.loads(res.output.strip().splitlines()[-1])
    assert s["n"] == 2 and s["subjects"] == {"face": 1, "saliency": 1}
    assert "subjects: face 1, saliency 1" in res.output
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["subject"] for r in rows} == {"face", "saliency"}
    bad = run("eval", "--dataset", "jsonl", "--annotations", ann, "--method", "center", "--subject", "auto",
              ok=False)
    assert bad.exit_code != 0 and "--method cropper" in bad.output


def test_keep_faces_off_runs_no_detector(photos):
    """With loop.keep_faces off and no --subject, cropping never imports MediaPipe (nor builds a detector)."""
    code = ("import os, sys; os.environ['CROPPER_LOOP_KEEP_FACES'] = 'off'; from cropper_engine.cli import main; "
            f"main(['crop', {str(photo(photos, 'astronaut'))!r}, '--ratio', '1:1'], standalone_mode=False); "
            "from cropper_engine.engine.subject import detectors as s; "
            "print('MP', 'mediapipe' in sys.modules, s._face_detector is s._UNSET)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MP False True" in out.stdout


@needs_mp
def test_the_default_crop_keeps_faces_whole(photos):
    """By default (loop.keep_faces auto, a detector installed) no crop cuts the astronaut's face."""
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.types import CropRequest, Task

    cropper = Cropper.from_config(load_config(env={}))
    for ratio in ("16:9", "1:1", "3:2"):
        res = cropper.crop(CropRequest(photo(photos, "astronaut"), Task.RATIO, [ratio]))[0]
        faces = res.extra.get("faces") or []
        assert faces, res.extra
        assert res.extra["keep_faces"] is True
        assert Box(*faces[0]["box"]).contains(HER_FACE), faces
        # every ratio here can hold her face: the crop holds it (leaving it out is no answer)
        assert res.box.contains(HER_FACE, tol=1), (ratio, res.box, faces)


def test_a_users_mask_survives_keep_faces(photos, tmp_path):
    """A subject task with the user's own mask keeps that mask when faces are kept whole too
    (keep-faces runs the face detector, but the subject stays the user's)."""
    img = photo(photos, "astronaut")
    w, h = Image.open(img).size
    mask = np.zeros((h, w), bool)
    mask[300:420, 200:330] = True

    class Fixed:
        name = "fixed"

        def detect(self, rgb):
            return [(Box(180, 40, 260, 140), 0.99)]

    subj.set_detectors(faces=Fixed(), persons=None)
    from cropper_engine.engine.loop import Cropper

    c = Cropper.from_config(load_config(env={"CROPPER_LOOP_KEEP_FACES": "on"}, overrides={"vlm.model": "none"}))
    r = c.crop(CropRequest(img, Task.SUBJECT, mask=mask))[0]
    assert r.extra["keep_faces"] is True and r.extra["faces"]
    assert r.box.contains(Box(200, 300, 330, 420), tol=1), (r.box, r.extra)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 380), st.floats(0, 280), st.floats(8, 60)), min_size=1, max_size=4),
       st.tuples(st.floats(0, 399), st.floats(0, 299), st.floats(20, 400), st.floats(20, 300)),
       st.sampled_from([None, 1.0, 4 / 5, 16 / 9, 9 / 16]))
def test_main_faces_property(faces, crop, ratio):
    """Whatever the crop: every face `faces_to_keep` marks main is inside the repaired crop, the
    best-ranked face is always main when a crop of the ratio can hold it, and a detection not
    taken for a face (a larger one on the body below another: faces.not_a_face) never is."""
    from cropper_engine.engine.geometry import fit_ratio

    w, h = 400.0, 300.0
    found = sorted((_face(x, y, min(w, x + s), min(h, y + s)) for x, y, s in faces), key=lambda f: -f.area)
    kept = subj.faces_to_keep(found, ratio, w, h)
    x, y, cw, ch = crop
    box = Box(x, y, min(w, x + cw), min(h, y + ch))
    if ratio:
        box = fit_ratio(box, ratio, w, h)
    out, _ = keep_faces_whole(box, kept, w, h, ratio, None, 2.0, 2.0)
    from cropper_engine.engine.subject.faces import not_a_face

    best = subj.main_face_indices(found)[0]
    assert kept[best].main == subj.fits(kept[best], ratio, w, h)
    assert not any(k.main for k, why in zip(kept, not_a_face(found), strict=True) if why)
    for k in kept:
        if k.main:
            assert out.contains(k, tol=0.5), (k, out)
    if ratio:
        assert out.aspect == pytest.approx(ratio, rel=1e-3)


def test_a_second_main_face_that_does_not_fit_is_left_out_not_cut():
    """At 9:16 two faces side by side (an FCDB photo's) do not share a crop: the crop keeps the
    larger one with its margin and leaves the other out whole; the shrunk crop is placed to hold
    the larger face, not merely centred where the proposal was (which cut the other face)."""
    w, h = 800.0, 534.0
    faces = [subj.Face(b, 0.9, subj._grow_face(b, w, h)) for b in (Box(488, 111, 627, 250), Box(308, 143, 412, 248))]
    kept = subj.faces_to_keep(faces, 9 / 16, w, h)
    assert [k.main for k in kept] == [True, False]
    box, ok = keep_faces_whole(Box(354, 20, 642, 532), kept, w, h, 9 / 16, None, 80, 53.4)
    assert ok and box.contains(kept[0], tol=0.5) and not cuts(box, faces[1].box)
    assert box.aspect == pytest.approx(9 / 16, rel=1e-3)


def test_main_faces_drop_their_margins_to_share_a_crop():
    """Two faces whose margins make them too wide for one 4:5 crop, but not the faces as detected
    (an FCDB photo's): both stay main, kept as detected, and the crop holds both."""
    w, h = 800.0, 534.0
    faces = [subj.Face(b, 0.9, subj._grow_face(b, w, h)) for b in (Box(564, 206, 644, 286), Box(227, 221, 294, 289))]
    kept = subj.faces_to_keep(faces, 4 / 5, w, h)
    assert [k.main for k in kept] == [True, True]
    box, ok = keep_faces_whole(Box(304, 48, 656, 488), kept, w, h, 4 / 5, None, 80, 53.4)
    assert ok and all(box.contains(f.box, tol=0.5) for f in faces)


def test_a_face_that_only_fits_without_its_margin_beside_a_left_out_one():
    """At 9:16 the larger face's margin reaches past the smaller face beside it (an FCDB photo's):
    no crop holds the margin and leaves the other face out whole, so the crop keeps the larger
    face as detected and leaves the other out, instead of cutting it."""
    w, h = 800.0, 530.0
    faces = [subj.Face(b, 0.9, subj._grow_face(b, w, h)) for b in (Box(317, 135, 515, 333), Box(201, 209, 304, 312))]
    kept = subj.faces_to_keep(faces, 9 / 16, w, h)
    box, ok = keep_faces_whole(Box(270, 2, 558, 514), kept, w, h, 9 / 16, None, 80, 53)
    assert ok and box.contains(faces[0].box, tol=0.5) and not cuts(box, faces[1].box)


def test_a_face_detector_fault_fails_its_own_request_only(photos):
    """A detector that raises something other than a CropperError (a broken graph, a bug) on one
    image: that request gets a named error in its slot, the other images of the batch are cropped."""

    class Flaky:
        name = "flaky"

        def detect(self, rgb):
            if rgb.shape[0] > rgb.shape[1]:  # the portrait image only
                raise RuntimeError("graph has errors")
            return []

    subj.set_detectors(faces=Flaky(), persons=None)
    from cropper_engine.engine.loop import Cropper

    c = Cropper.from_config(load_config(env={"CROPPER_LOOP_KEEP_FACES": "on"}, overrides={"vlm.model": "none"}))
    imgs = [Image.new("RGB", (300, 200), (90, 120, 150)), Image.new("RGB", (200, 300), (150, 120, 90)),
            Image.new("RGB", (320, 240), (60, 60, 60))]
    outs = c.crop_batch([CropRequest(im, Task.FREE) for im in imgs])
    assert isinstance(outs[1], CropperError) and "face detection failed" in str(outs[1])
    assert all(isinstance(o, list) and o[0].box.is_valid() for o in (outs[0], outs[2]))
