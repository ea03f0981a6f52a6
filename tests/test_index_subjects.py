"""Automatic subject boxes at index build (index/subjects.py): every example of a dataset without
masks gets a subject box and one per crop, from the automatic subject of `--subject auto`, with
the source recorded in the manifest; the subject task's G then orders each example's crops by
the distance of their own subject centres to the query's.

The synthetic images are a flat background with bright discs: the salient region. Most tests
run without face and person detectors (as on a machine without MediaPipe), so the source is
always "saliency" and nothing depends on MediaPipe being installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cropper_engine.cli import main
from cropper_engine.data.example import Example
from cropper_engine.engine import subject as subj
from cropper_engine.errors import InputError
from cropper_engine.index.select import crop_subject_boxes, select_indices
from cropper_engine.index.store import ExampleIndex
from cropper_engine.index.subjects import (
    CROP_SUBJECT_MIN_SHARE,
    SOURCES,
    auto_subject,
    detector_info,
    has_subject_box,
    subjects_summary,
    with_auto_subject,
)
from cropper_engine.types import Box, Task

YELLOW = (250, 240, 60)


class FakeEmbedder:
    """Mean colours of a 2 x 2 grid through a fixed projection, L2-normalised."""

    id = "fake-subjects-v1"
    dim = 8

    def __init__(self) -> None:
        self.proj = np.random.default_rng(0).standard_normal((12, self.dim)).astype(np.float32)

    def embed(self, images: list[Any]) -> np.ndarray:
        a = np.asarray([np.asarray(im.convert("RGB").resize((2, 2)), np.float32).reshape(-1) / 255 - 0.5
                        for im in images], np.float32) @ self.proj
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "dim": self.dim}


def discs(w: int, h: int, spots: list[tuple[int, int, int, tuple[int, int, int]]]) -> Image.Image:
    """A flat green-grey image with filled discs (cx, cy, r, colour)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = (40, 60, 50)
    for cx, cy, r, col in spots:
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = col
    return Image.fromarray(arr)


@pytest.fixture
def no_detectors():
    """As on a machine without MediaPipe (and without OpenCV's Haar cascades): saliency only."""
    subj.set_detectors(faces=None, persons=None)
    yield
    subj.reset_detectors()


def center(box: Box, w: float, h: float) -> tuple[float, float]:
    cx, cy = box.center
    return cx / w, cy / h


# --- one example ------------------------------------------------------------------------


def test_each_crop_gets_the_subject_it_frames(no_detectors):
    img = discs(240, 160, [(60, 80, 22, YELLOW), (190, 70, 18, YELLOW)])
    ex = Example("two", "two.png", 240, 160, [Box(0, 0, 120, 160), Box(120, 0, 240, 160), Box(0, 0, 240, 160)])
    got = auto_subject(ex, img)
    assert got.source == "saliency" and got.detectors == {}
    # the example's subject holds both discs; each half-crop's subject is the disc it frames
    assert got.box.contains(Box(38, 58, 82, 102), tol=2) and got.box.contains(Box(172, 52, 208, 88), tol=2)
    left, right, whole = got.crop_boxes
    assert left is not None and right is not None and whole is not None
    assert abs(left.center[0] - 60) <= 2 and abs(left.center[1] - 80) <= 2
    assert abs(right.center[0] - 190) <= 2 and abs(right.center[1] - 70) <= 2
    assert whole == got.box
    assert got.crop_from == ["subject", "subject", "subject"]
    # deterministic, and the same boxes (in the example's pixels) from a downscaled decode
    assert auto_subject(ex, img) == got
    half = auto_subject(ex, img.resize((120, 80)))
    for a, b in zip(half.crop_boxes, got.crop_boxes, strict=True):
        assert a is not None and b is not None
        assert max(abs(u - v) for u, v in zip(a.as_list(), b.as_list(), strict=True)) <= 3


def test_a_crop_that_misses_the_subject_gets_its_own_salient_region(no_detectors):
    # a large white disc is the image's subject; a small red one, too small to count there, is
    # the only thing the top-right crop frames
    img = discs(240, 160, [(60, 80, 30, (255, 255, 255)), (200, 40, 8, (200, 60, 60))])
    ex = Example("miss", "miss.png", 240, 160, [Box(140, 0, 240, 100), Box(0, 0, 240, 160)])
    got = auto_subject(ex, img)
    assert got.box.contains(Box(31, 51, 89, 109), tol=2) and got.box.x2 < 140
    assert got.crop_from == ["crop-saliency", "subject"]
    corner = got.crop_boxes[0]
    assert corner is not None and Box(140, 0, 240, 100).contains(corner)
    assert abs(corner.center[0] - 200) <= 3 and abs(corner.center[1] - 40) <= 3
    assert 0 < CROP_SUBJECT_MIN_SHARE < 0.5


def test_with_auto_subject_copies_and_leaves_boxed_examples_alone(no_detectors):
    img = discs(200, 100, [(150, 50, 20, YELLOW)])
    ex = Example("x", "x.png", 200, 100, [Box(0, 0, 100, 100), Box(100, 0, 200, 100)])
    assert not has_subject_box(ex)
    done = with_auto_subject(ex, img)
    assert done is not ex and ex.mask_box is None and ex.extra == {}
    assert done.extra["mask_box_from"] == "auto:saliency"
    assert len(done.extra["mask_boxes"]) == 2 and has_subject_box(done)
    assert crop_subject_boxes(done)[1] is not None
    boxed = Example("y", "y.png", 200, 100, [Box(0, 0, 100, 100)], mask_box=Box(0, 0, 10, 10))
    assert with_auto_subject(boxed, img) is boxed
    per_crop = Example("z", "z.png", 200, 100, [Box(0, 0, 100, 100)], extra={"mask_boxes": [[1, 2, 3, 4]]})
    assert has_subject_box(per_crop) and with_auto_subject(per_crop, img) is per_crop


# --- G: the crops' order follows the query's subject ------------------------------------


def test_g_orders_crops_by_their_own_subject_centres():
    ex = Example("g", "g.png", 200, 100, [Box(0, 0, 100, 100), Box(50, 0, 150, 100), Box(100, 0, 200, 100)],
                 scores=[4.0, 3.0, 2.0], mask_box=Box(10, 10, 190, 90),
                 extra={"mask_boxes": [[20, 30, 60, 70], [80, 30, 120, 70], [150, 30, 190, 70]]})
    # left subject centre (0.2, 0.5), middle (0.5, 0.5), right (0.85, 0.5)
    assert select_indices(ex, Task.SUBJECT, 3, mask_center_unit=(0.1, 0.5)) == [0, 1, 2]
    assert select_indices(ex, Task.SUBJECT, 3, mask_center_unit=(0.5, 0.5)) == [1, 0, 2]
    assert select_indices(ex, Task.SUBJECT, 3, mask_center_unit=(0.6, 0.5)) == [1, 2, 0]
    assert select_indices(ex, Task.SUBJECT, 3, mask_center_unit=(0.9, 0.5)) == [2, 1, 0]
    assert select_indices(ex, Task.SUBJECT, 1, mask_center_unit=(0.9, 0.5)) == [2]
    # one box for all the crops (the old index): the order cannot follow the query, MOS decides
    shared = Example("s", "s.png", 200, 100, ex.crops, scores=ex.scores, mask_box=ex.mask_box)
    assert select_indices(shared, Task.SUBJECT, 3, mask_center_unit=(0.9, 0.5)) == [0, 1, 2]


def test_g_follows_the_query_on_an_example_with_automatic_boxes(no_detectors):
    img = discs(240, 160, [(60, 80, 22, YELLOW), (190, 70, 18, YELLOW)])
    ex = with_auto_subject(Example("two", "two.png", 240, 160, [Box(0, 0, 120, 160), Box(120, 0, 240, 160)],
                                   scores=[4.0, 3.0]), img)
    assert select_indices(ex, Task.SUBJECT, 2, mask_center_unit=(0.25, 0.5)) == [0, 1]
    assert select_indices(ex, Task.SUBJECT, 2, mask_center_unit=(0.8, 0.45)) == [1, 0]


# --- index build ------------------------------------------------------------------------


def write_set(d: Path, n: int = 6) -> list[Example]:
    """A dataset without masks: one disc per image, at a different place each time, and crops
    of the left half, the right half and the whole image."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = 240, 160
        cx = 40 + 32 * i
        path = d / f"disc{i}.png"
        discs(w, h, [(cx, 60 + 5 * i, 18, YELLOW)]).save(path)
        out.append(Example(f"disc{i}", str(path), w, h,
                           [Box(0, 0, 120, 160), Box(120, 0, 240, 160), Box(0, 0, 240, 160)], [3.0, 2.0, 4.0]))
    return out


def test_index_build_gives_every_example_subject_boxes(tmp_path, no_detectors):
    exs = write_set(tmp_path / "set")
    report = ExampleIndex.build(exs, FakeEmbedder(), tmp_path / "idx")
    assert report.subjects["counts"] == {"auto:saliency": len(exs)}
    idx = ExampleIndex.load(tmp_path / "idx")
    rec = idx.manifest["subjects"]
    assert rec["mode"] == "auto" and rec["counts"] == {"auto:saliency": len(exs)}
    assert rec["detectors"]["faces"] is None and rec["detectors"]["persons"] is None
    assert "salient region" in rec["detectors"]["note"] and rec["detectors"]["opencv"]
    assert sum(rec["crop_boxes"].values()) == 3 * len(exs)
    for i, ex in enumerate(idx):
        assert ex.mask_box is not None and ex.extra["mask_box_from"] == "auto:saliency"
        boxes = crop_subject_boxes(ex)
        assert len(ex.extra["mask_boxes"]) == len(ex.crops) == 3 and all(b is not None for b in boxes)
        cx, cy = 40 + 32 * i, 60 + 5 * i
        assert ex.mask_box.contains(Box(cx - 17, cy - 17, cx + 17, cy + 17), tol=2)
        assert abs(boxes[2].center[0] - cx) <= 2  # the whole-image crop frames the disc
        # the half that holds the disc frames it; the other half its own (flat) salient region
        near = 0 if cx < 120 else 1
        assert abs(boxes[near].center[0] - cx) <= 3
    # G on the stored boxes: the crop whose subject is nearest the query's comes first
    first = idx.example(0)  # the disc at x = 40: the left half and the whole image frame it
    assert select_indices(first, Task.SUBJECT, 3, mask_center_unit=(0.17, 0.37)) == [2, 0, 1]  # tie: MOS
    assert select_indices(first, Task.SUBJECT, 3, mask_center_unit=(0.9, 0.5))[0] == 1


def test_examples_with_masks_keep_theirs_and_none_turns_it_off(tmp_path, no_detectors):
    exs = write_set(tmp_path / "set", 4)
    m = np.zeros((160, 240), np.uint8)
    m[10:30, 20:60] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    exs[0].mask_path = str(tmp_path / "m.png")
    exs[1].mask_box = Box(1, 2, 30, 40)
    exs[2].extra = {"mask_boxes": [[0, 0, 5, 5], None, [0, 0, 9, 9]]}
    ExampleIndex.build(exs, FakeEmbedder(), tmp_path / "idx")
    idx = ExampleIndex.load(tmp_path / "idx")
    assert idx.manifest["subjects"]["counts"] == {"auto:saliency": 1, "dataset": 2, "mask": 1}
    rows = list(idx)
    assert rows[0].mask_box == Box(20, 10, 60, 30) and "mask_boxes" not in rows[0].extra
    assert rows[1].mask_box == Box(1, 2, 30, 40) and "mask_box_from" not in rows[1].extra
    assert rows[2].mask_box is None and rows[2].extra["mask_boxes"][1] is None
    assert rows[3].extra["mask_box_from"] == "auto:saliency"
    assert "1 automatic (saliency 1), 1 from mask files, 2 from the dataset" in subjects_summary(idx.manifest)

    off = ExampleIndex.build(write_set(tmp_path / "set2", 3), FakeEmbedder(), tmp_path / "off", subjects="none")
    assert off.subjects == {"mode": "none", "counts": {"none": 3}}
    assert all(ex.mask_box is None and not ex.extra for ex in ExampleIndex.load(tmp_path / "off"))
    with pytest.raises(InputError, match="subjects"):
        ExampleIndex.build(exs, FakeEmbedder(), tmp_path / "bad", subjects="faces")


def test_add_counts_the_new_rows_and_an_old_index_is_counted_from_its_rows(tmp_path, no_detectors):
    exs = write_set(tmp_path / "set", 5)
    ExampleIndex.build(exs[:3], FakeEmbedder(), tmp_path / "idx", subjects="none")
    idx = ExampleIndex.load(tmp_path / "idx")
    # an index written before the manifest recorded subject boxes
    mpath = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["subjects"]
    mpath.write_text(json.dumps(manifest))
    idx = ExampleIndex.load(tmp_path / "idx")
    assert subjects_summary(idx.manifest).startswith("not recorded")
    report = idx.add(exs[3:], FakeEmbedder())  # the index has no mode: auto
    assert report.subjects["counts"] == {"auto:saliency": 2}
    rec = ExampleIndex.load(tmp_path / "idx").manifest["subjects"]
    assert rec["counts"] == {"auto:saliency": 2, "none": 3}
    assert idx.manifest["additions"][-1]["subjects"]["counts"] == {"auto:saliency": 2}


def test_cli_build_and_info_show_the_subject_boxes(tmp_path, no_detectors):
    exs = write_set(tmp_path / "set", 3)
    with (tmp_path / "set.jsonl").open("w") as fh:
        for ex in exs:
            fh.write(json.dumps({"image": ex.image_path, "crops": [b.as_list() for b in ex.crops]}) + "\n")

    def run(*args: Any) -> str:
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    out = run("index", "build", "--dataset", "jsonl", "--annotations", tmp_path / "set.jsonl",
              "--out", tmp_path / "idx", "--embedder", "classical")
    assert "automatic subject boxes: 3 (saliency 3)" in out
    info = run("index", "info", tmp_path / "idx")
    line = next(ln for ln in info.splitlines() if ln.strip().startswith("subjects:"))
    assert "3 automatic (saliency 3)" in line and "faces none, persons none" in line
    as_json = json.loads(run("index", "info", tmp_path / "idx", "--json"))
    assert as_json["subjects"]["counts"] == {"auto:saliency": 3}
    run("index", "build", "--dataset", "jsonl", "--annotations", tmp_path / "set.jsonl",
        "--out", tmp_path / "off", "--embedder", "classical", "--subjects", "none")
    assert "3 without" in run("index", "info", tmp_path / "off")


def test_with_the_detectors_installed_here(photos):
    """On the sample photos with whatever detectors this machine has: every example gets boxes
    and a source that the recorded detectors allow (astronaut has a face, if MediaPipe is here)."""
    info = detector_info()
    for p in photos:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        ex = Example(p.stem, str(p), w, h, [Box(0, 0, w / 2, h), Box(w / 2, 0, w, h)])
        got = auto_subject(ex, img)
        assert got.source in SOURCES and all(b is not None for b in got.crop_boxes)
        if got.source == "faces":
            assert info["faces"] is not None
        if got.source == "persons":
            assert info["persons"] is not None
        if p.stem == "astronaut" and info["faces"] == "mediapipe":
            assert got.source == "faces"


def test_without_mediapipe_installed(photos, tmp_path):
    """In a process where MediaPipe cannot be imported: the build still gives every example a
    subject box, from the salient region (or OpenCV's Haar faces where that build ships them),
    and the manifest says no person detector was there."""
    import subprocess
    import sys

    code = f"""
import json, sys
sys.modules["mediapipe"] = None  # import mediapipe -> ImportError
from PIL import Image
from cropper_engine.data.example import Example
from cropper_engine.index.store import ExampleIndex
from cropper_engine.types import Box
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_index_subjects import FakeEmbedder
exs = []
for p in {[str(p) for p in photos]!r}:
    w, h = Image.open(p).size
    exs.append(Example(p, p, w, h, [Box(0, 0, w / 2, h), Box(w / 2, 0, w, h)]))
rep = ExampleIndex.build(exs, FakeEmbedder(), {str(tmp_path / "idx")!r})
idx = ExampleIndex.load({str(tmp_path / "idx")!r})
print(json.dumps({{"subjects": idx.manifest["subjects"],
                   "rows": [[ex.extra["mask_box_from"], len(ex.extra["mask_boxes"])] for ex in idx]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    det = got["subjects"]["detectors"]
    assert det["persons"] is None and det["faces"] in (None, "opencv-haar") and "note" in det
    allowed = {"auto:saliency"} | ({"auto:faces"} if det["faces"] else set())
    assert all(src in allowed and n == 2 for src, n in got["rows"])
    assert sum(got["subjects"]["counts"].values()) == len(photos)


def test_ratio_near_ties_are_broken_by_mos():
    """Crops whose ratios read the same in the prompt (2 decimals) are ordered by MOS, not by a
    difference in the third decimal the model never sees."""
    from cropper_engine.data.example import Example
    from cropper_engine.index.select import select_indices
    from cropper_engine.types import Box, Ratio, Task

    crops = [Box(0, 0, 1333, 1000), Box(0, 0, 1334, 1000), Box(0, 0, 1500, 1000)]  # 1.333, 1.334, 1.5
    ex = Example("e", "e.jpg", 2000, 1000, crops, [3.0, 4.5, 5.0])
    assert select_indices(ex, Task.RATIO, 3, ratio=Ratio(4, 3)) == [1, 0, 2]
