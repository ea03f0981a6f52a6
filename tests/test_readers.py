"""Dataset readers: every format from tiny fixtures, bad records and boxes, the real FCDB split."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from needs import need_path
from PIL import Image

from cropper_engine.data.readers import KINDS, Dataset, read_dataset
from cropper_engine.errors import AnnotationError, InputError
from cropper_engine.types import Box

FCDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fcdb"  # ../shared/data beside the checkout


def make_jpeg(path: Path, w: int, h: int, orientation: int | None = None) -> Path:
    """A tiny JPEG of stored size w x h (with an EXIF orientation tag if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), (120, 60, 30))
    if orientation is None:
        im.save(path, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, "JPEG", exif=exif.tobytes())
    return path


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def has(messages: list[str], *parts: str) -> bool:
    return any(all(p in m for p in parts) for m in messages)


# --- entry point ----------------------------------------------------------------------------


def test_unknown_kind_lists_valid_kinds(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        read_dataset("coco", tmp_path / "x.json")
    for k in KINDS:
        assert k in str(e.value)


def test_missing_annotations_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for kind in KINDS:
        with pytest.raises(AnnotationError, match=r"nope\.jsonl"):
            read_dataset(kind, missing)


def test_bad_limit(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "a.jsonl", [])
    with pytest.raises(InputError):
        read_dataset("jsonl", f, limit=-1)


# --- FCDB -----------------------------------------------------------------------------------


def test_fcdb_official_json(tmp_path: Path) -> None:
    make_jpeg(tmp_path / "images" / "111_a_c.jpg", 80, 60)
    make_jpeg(tmp_path / "images" / "222_b_c.jpg", 50, 100)
    make_jpeg(tmp_path / "images" / "333_c_c.jpg", 40, 40)
    records = [
        {"url": "https://farm1.staticflickr.com/1/111_a_c.jpg", "flickr_photo_id": 111,
         "crop": [10, 5, 40, 30]},
        {"url": "https://farm1.staticflickr.com/1/222_b_c.jpg", "flickr_photo_id": 222,
         "crop": [0, 0, 50, 100]},
        {"url": "https://x/333_c_c.jpg", "flickr_photo_id": 333, "crop": [10, 10, 0, 5]},  # w = 0
        {"url": "https://x/444_d_c.jpg", "flickr_photo_id": 444, "crop": [0, 0, 5, 5]},  # no image
        {"flickr_photo_id": 555, "crop": [0, 0, 5, 5]},  # no url
        {"url": "https://x/111_a_c.jpg", "flickr_photo_id": 111, "crop": [0, 0, 80, 60]},  # again
    ]
    f = tmp_path / "cropping_training_set.json"
    f.write_text(json.dumps(records))
    ds = read_dataset("fcdb", f)
    assert isinstance(ds, Dataset) and ds.kind == "fcdb"
    assert [e.id for e in ds] == ["111_a_c.jpg", "222_b_c.jpg"]
    a = ds.examples[0]
    # xywh [10, 5, 40, 30] -> xyxy (10, 5, 50, 35); the repeated image adds a second crop
    assert a.crops == [Box(10, 5, 50, 35), Box(0, 0, 80, 60)]
    assert (a.width, a.height) == (80, 60)
    assert a.extra["flickr_photo_id"] == 111
    assert os.path.isabs(a.image_path) and a.image_path == str(tmp_path / "images" / "111_a_c.jpg")
    assert has(ds.skipped, "333_c_c.jpg", "[10, 10, 0, 5]", "degenerate")
    assert has(ds.skipped, "444_d_c.jpg", "not found")
    assert has(ds.skipped, "record 5")
    assert ds.n_skipped == 3


def test_fcdb_jsonl_and_bad_lines(tmp_path: Path) -> None:
    img = tmp_path / "images"
    for i in range(8):
        make_jpeg(img / f"p{i}.jpg", 100, 50)
    lines: list[object] = [
        {"image": "p0.jpg", "width": 100, "height": 50, "crop": [10, 5, 90, 45]},
        "{not json",
        {"image": "p1.jpg", "width": 100, "height": 50},  # no crop
        {"image": "p2.jpg", "width": 100, "height": 50, "crop": ["a", 0, 10, 10]},  # non-numeric
        {"image": "p3.jpg", "width": 100, "height": 50, "crop": [10, 10, 5, 40]},  # x2 <= x1
        {"image": "p4.jpg", "width": 120, "height": 50, "crop": [0, 0, 10, 10]},  # wrong size
        {"image": "p5.jpg", "width": 100, "height": 50, "crop": [-1, 0, 101, 51]},  # clamped silently
        {"image": "p6.jpg", "width": 100, "height": 50, "crop": [0, 0, 100, 70]},  # clamped, noted
        {"image": "p7.jpg", "width": 100, "height": 50, "crop": [60, 0, 200, 50]},  # mostly outside
        "",
        '{"image": "p0.jpg", "crop": [NaN, 0, 10, 10]}',  # non-finite (Python's json reads NaN)
        "[1, 2, 3]",
    ]
    f = write_lines(tmp_path / "train.jsonl", lines)
    ds = read_dataset("fcdb", f)
    assert [e.id for e in ds] == ["p0.jpg", "p5.jpg", "p6.jpg"]
    assert ds.examples[0].crops == [Box(10, 5, 90, 45)]
    assert ds.examples[1].crops == [Box(0, 0, 100, 50)]
    assert ds.examples[2].crops == [Box(0, 0, 100, 50)]
    assert has(ds.notes, "p6.jpg", "overshoots", "clamped")
    assert not has(ds.notes, "p5.jpg")
    assert has(ds.skipped, "train.jsonl:2", "not valid JSON")
    assert has(ds.skipped, "train.jsonl:3", "no crop")
    assert has(ds.skipped, "p2.jpg", "not 4 numbers")
    assert has(ds.skipped, "p3.jpg", "[10, 10, 5, 40]", "degenerate (x2 <= x1)")
    assert has(ds.skipped, "p4.jpg", "annotation says 120x50 but image is 100x50")
    assert has(ds.skipped, "p7.jpg", "mostly outside")
    assert has(ds.skipped, "non-finite")
    assert has(ds.skipped, "train.jsonl:12", "expected a JSON object")
    # records skipped: bad json, no crop, p2, p3, p4, p7, NaN, [1,2,3] = 8
    assert ds.n_skipped == 8


def test_fcdb_jsonl_missing_images(tmp_path: Path) -> None:
    make_jpeg(tmp_path / "imgs" / "here.jpg", 30, 20)
    f = write_lines(tmp_path / "val.jsonl", [
        {"image": "here.jpg", "width": 30, "height": 20, "crop": [0, 0, 30, 20]},
        {"image": "gone.jpg", "width": 64, "height": 48, "crop": [0, 0, 32, 24]},
    ])
    ds = read_dataset("fcdb", f, tmp_path / "imgs")
    assert [e.id for e in ds] == ["here.jpg"]
    assert has(ds.skipped, "gone.jpg", "not found")
    ds = read_dataset("fcdb", f, tmp_path / "imgs", require_images=False)
    assert [e.id for e in ds] == ["here.jpg", "gone.jpg"]
    assert (ds.examples[1].width, ds.examples[1].height) == (64, 48)
    assert ds.examples[1].image_path == str(tmp_path / "imgs" / "gone.jpg")
    with pytest.raises(InputError, match="image folder"):
        read_dataset("fcdb", f, tmp_path / "no-such-dir")


def test_exif_rotated_sizes(tmp_path: Path) -> None:
    # stored 40x20, orientation 6 (rotate 90): upright 20x40
    make_jpeg(tmp_path / "images" / "rot.jpg", 40, 20, orientation=6)
    make_jpeg(tmp_path / "images" / "rot2.jpg", 40, 20, orientation=6)
    f = write_lines(tmp_path / "a.jsonl", [
        {"image": "rot.jpg", "width": 20, "height": 40, "crop": [0, 10, 20, 40]},
        {"image": "rot2.jpg", "width": 40, "height": 20, "crop": [0, 0, 40, 20]},  # stored size
    ])
    ds = read_dataset("fcdb", f)
    assert [(e.id, e.width, e.height) for e in ds] == [("rot.jpg", 20, 40)]
    assert has(ds.skipped, "rot2.jpg", "annotation says 40x20 but image is 20x40")
    # our own JSONL without sizes: read from the header, upright
    g = write_lines(tmp_path / "b.jsonl", [{"image": "rot.jpg", "crops": [[0, 0, 20, 40]]}])
    ex = read_dataset("jsonl", g).examples[0]
    assert (ex.width, ex.height) == (20, 40)


def test_limit_and_real_fcdb() -> None:
    need_path(FCDB / "val.jsonl", "FCDB (../shared/data/fcdb)")
    ds = read_dataset("fcdb", FCDB / "val.jsonl")
    assert len(ds) == 200 and not ds.skipped
    assert len({e.id for e in ds}) == 200
    for ex in ds:
        assert len(ex.crops) == 1 and Box.full(ex.width, ex.height).contains(ex.crops[0])
    few = read_dataset("fcdb", FCDB / "val.jsonl", limit=5)
    assert [e.id for e in few] == [e.id for e in ds.examples[:5]]
    assert len(read_dataset("fcdb", FCDB / "val.jsonl", limit=0)) == 0


def test_real_fcdb_train_is_fast() -> None:
    need_path(FCDB / "train.jsonl", "FCDB (../shared/data/fcdb)")
    t = time.perf_counter()
    ds = read_dataset("fcdb", FCDB / "train.jsonl")
    assert time.perf_counter() - t < 2.0
    assert len(ds) == 1138
    # one known annotation overshoots its 1024x768 image by 158 px (y2 = 926): kept, clamped
    assert has(ds.notes, "4075624359_cfd76ef15a_b.jpg", "clamped")


# --- GAICD ----------------------------------------------------------------------------------


def _gaicd_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "gaicd"
    make_jpeg(root / "images" / "1.jpg", 100, 80)
    make_jpeg(root / "images" / "2.jpg", 60, 60)
    data = {
        "1.jpg": {"bbox": [[0, 0, 100, 80], [10, 10, 90, 70], [5, 5, 5, 50]], "score": [4.5, 3.0, 2.0]},
        "2.jpg": {"bbox": [[0, 0, 60, 60]], "score": [3.3]},
        "3.jpg": {"bbox": [[0, 0, 50, 40], [10, 20, 95, 61]], "score": [4.0, 1.5]},  # no image
        "4.jpg": {"bbox": [[0, 0, 5, 5]], "score": [1, 2]},  # mismatch
    }
    (root / "image_crop.json").write_text(json.dumps(data))
    (root / "original_data_split.json").write_text(json.dumps({"train": ["1.jpg", "4.jpg"],
                                                               "test": ["2.jpg", "3.jpg"]}))
    return root


def test_gaicd_json(tmp_path: Path) -> None:
    root = _gaicd_fixture(tmp_path)
    ds = read_dataset("gaicd", root / "image_crop.json")
    assert [e.id for e in ds] == ["1.jpg", "2.jpg"]
    one = ds.examples[0]
    assert one.crops == [Box(0, 0, 100, 80), Box(10, 10, 90, 70)]  # degenerate third dropped
    assert one.scores == [4.5, 3.0]  # its score goes with it
    assert has(ds.skipped, "1.jpg", "[5, 5, 5, 50]", "degenerate")
    assert has(ds.skipped, "3.jpg", "not found")
    assert has(ds.skipped, "4.jpg", "1 boxes but")
    # the folder works too, and so do splits
    assert [e.id for e in read_dataset("gaicd", root)] == ["1.jpg", "2.jpg"]
    assert [e.id for e in read_dataset("gaicd", root, split="test")] == ["2.jpg"]
    with pytest.raises(InputError, match="train, test"):
        read_dataset("gaicd", root, split="val")


def test_gaicd_without_images(tmp_path: Path) -> None:
    root = _gaicd_fixture(tmp_path)
    ds = read_dataset("gaicd", root, split="test", require_images=False)
    assert [e.id for e in ds] == ["2.jpg", "3.jpg"]
    three = ds.examples[1]
    # size inferred as the largest x2 / y2 of its crops: 95 x 61
    assert (three.width, three.height) == (95, 61)
    assert three.extra == {"size_inferred": True}
    assert three.image_path == str(root / "images" / "3.jpg")
    assert ds.examples[0].extra == {}  # the image exists: its header size
    assert (ds.examples[0].width, ds.examples[0].height) == (60, 60)


def test_gaicd_split_file_missing(tmp_path: Path) -> None:
    f = tmp_path / "image_crop.json"
    f.write_text(json.dumps({"1.jpg": {"bbox": [[0, 0, 5, 5]], "score": [1]}}))
    with pytest.raises(AnnotationError, match="split"):
        read_dataset("gaicd", f, split="test")


def test_gaicd_txt(tmp_path: Path) -> None:
    make_jpeg(tmp_path / "images" / "10.jpg", 100, 50)
    make_jpeg(tmp_path / "images" / "11.png", 40, 30)
    ann = tmp_path / "annotations"
    ann.mkdir()
    # y1 x1 y2 x2 MOS
    (ann / "10.txt").write_text("5 10 45 90 4.2\n0 0 50 100 3.1\nbad line\n\n")
    (ann / "11.txt").write_text("0 0 30 40 2.5\n")
    (ann / "12.txt").write_text("0 0 10 10 2.5\n")  # no image
    ds = read_dataset("gaicd", ann)
    assert [e.id for e in ds] == ["10.jpg", "11.png"]
    ten = ds.examples[0]
    assert ten.crops == [Box(10, 5, 90, 45), Box(0, 0, 100, 50)]
    assert ten.scores == [4.2, 3.1]
    assert has(ds.skipped, "10.txt:3", "y1 x1 y2 x2 MOS")
    assert has(ds.skipped, "12.jpg", "not found")
    ds = read_dataset("gaicd", ann, require_images=False, limit=2)
    assert [e.id for e in ds] == ["10.jpg", "11.png"]
    ds = read_dataset("gaicd", ann, require_images=False)
    assert (ds.examples[2].width, ds.examples[2].height) == (10, 10)


def test_gaicd_bad_json(tmp_path: Path) -> None:
    f = tmp_path / "image_crop.json"
    f.write_text("{broken")
    with pytest.raises(AnnotationError, match=r"image_crop\.json"):
        read_dataset("gaicd", f)


# --- SACD -----------------------------------------------------------------------------------


def _sacd_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "sacd"
    (root / "masks").mkdir(parents=True)
    for name, (w, h) in {"a": (100, 80), "b": (64, 64), "c": (50, 40), "d": (50, 40)}.items():
        make_jpeg(root / "images" / f"{name}.jpg", w, h)
        if name != "d":  # d.jpg has no mask
            Image.new("L", (w, h), 255).save(root / "masks" / f"{name}.png")
    ann = root / "annotations"
    ann.mkdir()
    # one image per file, named after the file
    (ann / "a.json").write_text(json.dumps(
        {"mask_box": [20, 10, 30, 40], "best_box": [10, 5, 90, 75], "crop_box": [0, 0, 80, 80]}))
    # one image per file, named by a key; best_box == crop_box -> one crop
    (ann / "other.json").write_text(json.dumps(
        {"image_name": "b.jpg", "mask_box": [0, 0, 10, 10], "best_box": [0, 0, 64, 64],
         "crop_box": [0, 0, 64, 64]}))
    # a list of records
    (ann / "more.json").write_text(json.dumps([
        {"image": "c.jpg", "mask_box": [1, 1, 5, 5], "best_box": [0, 0, 50, 40],
         "crop_box": [[0, 0, 25, 40], [30, 30, 20, 20]]},  # second crop_box degenerate
        {"image": "d.jpg", "mask_box": [1, 1, 5, 5], "best_box": [0, 0, 50, 40]},  # no mask file
        {"image": "e.jpg", "best_box": [0, 0, 5, 5]},  # no image
        {"image": "c2.jpg"},  # no boxes
    ]))
    (ann / "broken.json").write_text("[{")
    return root


def test_sacd(tmp_path: Path) -> None:
    root = _sacd_fixture(tmp_path)
    ds = read_dataset("sacd", root)
    assert sorted(e.id for e in ds) == ["a.jpg", "b.jpg", "c.jpg"]
    by = {e.id: e for e in ds}
    a = by["a.jpg"]
    assert a.crops == [Box(10, 5, 90, 75), Box(0, 0, 80, 80)]  # best first
    assert a.mask_box == Box(20, 10, 50, 50)  # xywh -> xyxy
    assert a.mask_path == str(root / "masks" / "a.png")
    assert a.image_path == str(root / "images" / "a.jpg")
    assert (a.width, a.height) == (100, 80)
    assert by["b.jpg"].crops == [Box(0, 0, 64, 64)]
    assert by["c.jpg"].crops == [Box(0, 0, 50, 40), Box(0, 0, 25, 40)]
    assert has(ds.skipped, "c.jpg", "[30, 30, 20, 20]", "degenerate")
    assert has(ds.skipped, "d.jpg", "mask", "not found")
    assert has(ds.skipped, "e.jpg", "not found")
    assert has(ds.skipped, "c2.jpg", "no best_box or crop_box")
    assert has(ds.skipped, "broken.json", "not valid JSON")
    # the annotations folder or one file work too
    assert sorted(e.id for e in read_dataset("sacd", root / "annotations")) == ["a.jpg", "b.jpg", "c.jpg"]
    one = read_dataset("sacd", root / "annotations" / "a.json")
    assert [e.id for e in one] == ["a.jpg"] and one.examples[0].mask_path == a.mask_path
    # without images required, d.jpg stays (no mask)
    loose = read_dataset("sacd", root, require_images=False)
    d = next(e for e in loose if e.id == "d.jpg")
    assert d.mask_path is None and d.mask_box == Box(1, 1, 6, 6)


# --- our own JSONL --------------------------------------------------------------------------


def test_own_jsonl(tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    make_jpeg(pics / "sub" / "x.jpg", 100, 60)
    make_jpeg(pics / "y.jpg", 30, 30)
    absolute = make_jpeg(tmp_path / "elsewhere" / "z.jpg", 20, 10)
    Image.new("L", (100, 60), 255).save(pics / "xmask.png")
    f = write_lines(tmp_path / "set.jsonl", [
        {"image": "sub/x.jpg", "crops": [[0, 0, 50, 60], [10, 10, 90, 50]], "scores": [4.0, 3.5],
         "mask": "xmask.png"},
        {"image": "y.jpg", "crops": [[0, 0, 30, 30]], "width": 30, "height": 30, "id": "why"},
        {"image": str(absolute), "crops": [[0, 0, 20, 10]]},
        {"image": "y.jpg", "crops": [[0, 0, 30, 30]], "scores": [1, 2]},  # score count mismatch
        {"image": "y.jpg", "crops": [0, 0, 30, 30]},  # flat list
        {"image": "y.jpg", "crops": [[0, 0, 30, 30]], "id": "why"},  # duplicate id
        {"image": "sub/x.jpg", "crops": [[0, 0, 10, 10]], "id": "m", "mask": "nomask.png"},
        {"crops": [[0, 0, 30, 30]]},  # no image
    ])
    ds = read_dataset("jsonl", f, pics)
    assert [e.id for e in ds] == ["sub/x.jpg", "why", "z.jpg"]
    x = ds.examples[0]
    assert x.crops == [Box(0, 0, 50, 60), Box(10, 10, 90, 50)] and x.scores == [4.0, 3.5]
    assert x.mask_path == str(pics / "xmask.png")
    assert x.image_path == str(pics / "sub" / "x.jpg") and (x.width, x.height) == (100, 60)
    assert ds.examples[1].scores is None
    assert ds.examples[2].image_path == str(absolute)
    assert has(ds.skipped, "one MOS per crop")
    assert has(ds.skipped, "non-empty list")
    assert has(ds.skipped, "why", "duplicate id")
    assert has(ds.skipped, "nomask.png", "not found")
    assert has(ds.skipped, "set.jsonl:8", "no \"image\"")
    assert ds.n_skipped == 5
    # the limit counts examples
    assert [e.id for e in read_dataset("jsonl", f, pics, limit=2)] == ["sub/x.jpg", "why"]


def test_own_jsonl_split(tmp_path: Path) -> None:
    make_jpeg(tmp_path / "images" / "a.jpg", 10, 10)
    make_jpeg(tmp_path / "images" / "b.jpg", 10, 10)
    f = write_lines(tmp_path / "d.jsonl", [{"image": "a.jpg", "crops": [[0, 0, 5, 5]]},
                                           {"image": "b.jpg", "crops": [[0, 0, 5, 5]]}])
    (tmp_path / "split.json").write_text(json.dumps({"test": ["b"]}))
    assert [e.id for e in read_dataset("jsonl", f, split="test")] == ["b.jpg"]
