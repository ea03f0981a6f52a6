"""Camera-size photos (issue 24): a large JPEG's box is found on a reduced decode (JPEG draft),
the full image decoded only to cut a crop, once per image; HEIC and AVIF photos everywhere
(files, folders, manifests, the library, the server, `index build`), upright, their ICC profile
kept, their crops JPEG unless --format says otherwise."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms, ImageOps

from cropper_engine.cli import main
from cropper_engine.config import load_config
from cropper_engine.engine.loop import DRAFT_SIDE, Cropper
from cropper_engine.imageio import LoadedImage
from cropper_engine.types import Box, CropRequest, Task

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in res.output, res.output
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def cropper():
    return Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical"}))


@pytest.fixture(scope="module")
def big(photos, tmp_path_factory):
    """A sample photo enlarged to 3600 px (a JPEG decoded at 1/4 for the box), and the same turned
    on its side in the file with EXIF orientation 6 (shown upright), both with an sRGB profile."""
    d = tmp_path_factory.mktemp("big")
    im = Image.open(photos[0]).convert("RGB")
    im = im.resize((3600, round(3600 * im.height / im.width)), Image.Resampling.BICUBIC)
    plain = d / "plain.jpg"
    im.save(plain, quality=90, icc_profile=SRGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # the pixels stored turned 90 degrees counter-clockwise: shown upright
    turned = d / "turned.jpg"
    im.transpose(Image.Transpose.ROTATE_90).save(turned, quality=90, exif=exif, icc_profile=SRGB)
    return {"plain": plain, "turned": turned, "size": im.size}


def full_pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_draft_side_holds_every_reader_of_the_reduced_decode():
    from cropper_engine.engine.analysis import WORK_SIDE
    from cropper_engine.engine.subject.detectors import DETECT_SIDE, SALIENCY_SIDE
    from cropper_engine.models.classical import WORK_SIZE

    assert max(DETECT_SIDE, SALIENCY_SIDE, WORK_SIDE, WORK_SIZE) <= DRAFT_SIDE


def test_the_box_of_a_large_jpeg_is_found_on_a_reduced_decode(cropper, big):
    """The engine decodes the JPEG at 1/4 (900 px), never whole, and gives the box in the full
    image's pixels, upright whatever the orientation stored, and nearly the crop a full decode
    gives: within 2 px at the analysis's 160 px (the maps and the descriptor are made from other
    pixels: the bench measures the spread, `python -m bench default --camera`)."""
    for key in ("plain", "turned"):
        res = cropper.crop_batch([CropRequest(str(big[key]), Task.RATIO, ["4:5"], keep_faces=False)])[0][0]
        loaded = res.loaded
        assert loaded.reduced and loaded.size == big["size"] and max(loaded.working.size) == 900
        assert loaded.full_decodes == 0 and (res.width, res.height) == big["size"]
        x1, y1, x2, y2 = res.box.as_int()
        assert 0 <= x1 < x2 <= res.width and 0 <= y1 < y2 <= res.height
        assert abs((x2 - x1) / (y2 - y1) - 0.8) < 1 / (y2 - y1)
        ref = cropper.crop_batch([CropRequest(LoadedImage(Image.fromarray(full_pixels(big[key])), "ref"),
                                              Task.RATIO, ["4:5"], keep_faces=False)])[0][0]
        px = max(big["size"]) / 160
        assert max(abs(a - b) for a, b in zip(res.box.as_int(), ref.box.as_int(), strict=True)) <= 2 * px, key


def test_faces_found_on_the_reduced_decode_are_in_full_pixels(cropper, big):
    from cropper_engine.engine import subject as subj

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
    try:
        res = cropper.crop_batch([CropRequest(str(big["turned"]), Task.RATIO, ["1:1"], keep_faces=True)])[0][0]
    finally:
        subj.reset_detectors()
    assert res.loaded.reduced and max(det.shapes[0][:2]) == subj.DETECT_SIDE
    w, h = big["size"]
    face = res.extra["faces"][0]["box"]
    assert face == pytest.approx([0.4 * w, 0.3 * h, 0.6 * w, 0.5 * h], abs=3)
    assert res.box.contains(Box(*face), tol=1)


def test_a_subject_spec_or_a_vlm_reads_the_full_image(cropper, big):
    assert cropper.draft_side() == DRAFT_SIDE and cropper.draft_side("auto") is None
    res = cropper.crop_batch([CropRequest(str(big["plain"]), Task.RATIO, ["1:1"], subject="10,10")])[0][0]
    assert not res.loaded.reduced


def test_the_batch_decodes_the_full_image_once_for_all_its_crops(big, tmp_path, monkeypatch):
    """Three ratios of a large JPEG: one full decode (after the box was found on a reduced one),
    the crops cut from it pixel for pixel, the ICC profile kept, upright."""
    calls = []
    real = LoadedImage._decode_full
    monkeypatch.setattr(LoadedImage, "_decode_full", lambda self: (calls.append(self.path), real(self))[1])
    out = tmp_path / "out"
    run("crop", big["turned"], "--ratio", "1:1,4:5,16:9", "--out", out, "--no-keep-faces")
    assert calls == [str(big["turned"])]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    full = full_pixels(big["turned"])
    for row in rows:
        x1, y1, x2, y2 = row["box"]
        with Image.open(row["output"]) as im:
            assert im.size == (x2 - x1, y2 - y1) and im.info.get("icc_profile") == SRGB
            got = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert np.abs(got - full[y1:y2, x1:x2]).mean() < 2.0  # JPEG q95 of the same pixels


def test_the_library_decodes_the_full_image_on_demand(big):
    from cropper_engine import Cropper as Lib

    crops = Lib(vlm="none", keep_faces=False).crop(str(big["plain"]), ratio=["1:1", "3:2"])
    loaded = crops[0].result.loaded
    assert loaded.reduced and loaded.full_decodes == 0
    full = full_pixels(big["plain"])
    for c in crops:
        x1, y1, x2, y2 = c.box
        img = c.image()
        assert img.info["icc_profile"] == SRGB and np.array_equal(np.asarray(img), full[y1:y2, x1:x2])
    assert loaded.full_decodes == 1  # kept for the image's other crops
    assert crops[0].image(size=(64, 64)).size[0] <= 64


def test_the_server_decodes_small_for_json_and_whole_for_the_image(big):
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    from fastapi.testclient import TestClient

    from cropper_engine.server import create_app

    cfg = load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical",
                                         "loop.keep_faces": "off"})
    data = big["turned"].read_bytes()
    with TestClient(create_app(cfg)) as client:
        r = client.post("/v1/crop", files={"image": ("turned.jpg", data)}, data={"ratio": "4:5"})
        assert r.status_code == 200, r.text
        assert (r.json()["width"], r.json()["height"]) == big["size"] and r.json()["box"]
        r = client.post("/v1/crop?return=image", files={"image": ("turned.jpg", data)}, data={"ratio": "4:5"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        x1, y1, x2, y2 = map(int, r.headers["X-Crop-Box"].split(","))
        assert r.headers["X-Image-Size"] == "{}x{}".format(*big["size"])
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float32)
        assert np.abs(got - full_pixels(big["turned"])[y1:y2, x1:x2]).mean() < 3.0


# --- HEIC and AVIF -------------------------------------------------------------------------


def heic_folder(photos, folder, fmt="HEIF", suffix=".heic"):
    """Photos as HEIC (or AVIF): the second stored on its side with EXIF orientation 6."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for k, p in enumerate(photos[:3]):
        im = Image.open(p).convert("RGB")
        kw = {"quality": 85, "icc_profile": SRGB}
        if k == 1:
            exif = Image.Exif()
            exif[0x0112] = 6
            kw["exif"] = exif.tobytes()
            stored = im.transpose(Image.Transpose.ROTATE_90)
        else:
            stored = im
        stored.save(folder / f"p{k}{suffix}", fmt, **kw)
        sizes[f"p{k}{suffix}"] = im.size
    return sizes


def test_a_folder_of_heic_photos_is_cropped(photos, tmp_path):
    """The folder walk takes the HEIC photos; each is cropped upright, its crops written as JPEG
    with its ICC profile; --format heic writes HEIC crops instead."""
    pytest.importorskip("pillow_heif")
    sizes = heic_folder(photos, tmp_path / "phone")
    out = tmp_path / "out"
    res = run("crop", tmp_path / "phone", "--ratio", "1:1,4:5", "--out", out)
    assert "0 not read, 0 errors" in res.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        name = row["image"].rsplit("/", 1)[-1]
        assert (row["width"], row["height"]) == sizes[name]
        assert row["output"].endswith(".jpg")
        with Image.open(row["output"]) as im:
            x1, y1, x2, y2 = row["box"]
            assert im.format == "JPEG" and im.size == (x2 - x1, y2 - y1) and im.info.get("icc_profile") == SRGB
    out2 = tmp_path / "out2"
    run("crop", tmp_path / "phone" / "p1.heic", "--ratio", "1:1", "--out", out2, "--format", "heic")
    row = json.loads((out2 / "results.jsonl").read_text())
    with Image.open(row["output"]) as im:
        assert row["output"].endswith(".heic") and im.format == "HEIF"
        assert im.size == (row["box"][2] - row["box"][0], row["box"][3] - row["box"][1])


def test_heic_and_avif_in_a_manifest_the_library_and_the_server(photos, tmp_path):
    pytest.importorskip("pillow_heif")
    from PIL import features

    sizes = heic_folder(photos, tmp_path / "h")
    if features.check("avif"):
        sizes.update(heic_folder(photos[:2], tmp_path / "h", "AVIF", ".avif"))
    man = tmp_path / "list.txt"
    man.write_text("".join(f"{tmp_path / 'h' / n}\n" for n in sizes))
    out = tmp_path / "out"
    run("crop", man, "--ratio", "3:2", "--out", out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["image"].rsplit("/", 1)[-1]: (r["width"], r["height"]) for r in rows} == sizes
    assert all(r["output"].endswith(".jpg") for r in rows)

    from cropper_engine import Cropper as Lib

    crop = Lib(vlm="none").crop(tmp_path / "h" / "p1.heic", ratio="1:1")
    assert (crop.width, crop.height) == sizes["p1.heic"] and crop.image().info["icc_profile"] == SRGB

    pytest.importorskip("fastapi", reason="the server extra is not installed")
    from fastapi.testclient import TestClient

    from cropper_engine.server import create_app

    cfg = load_config(env={}, overrides={"vlm.model": "none", "retrieval.embedder": "classical"})
    with TestClient(create_app(cfg)) as client:
        data = (tmp_path / "h" / "p1.heic").read_bytes()
        r = client.post("/v1/crop?return=image", files={"image": ("p1.heic", data)}, data={"ratio": "1:1"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg" and r.headers["X-Image-Size"] == "{}x{}".format(
            *sizes["p1.heic"])


def test_index_build_reads_heic_images(photos, tmp_path):
    pytest.importorskip("pillow_heif")
    sizes = heic_folder(photos, tmp_path / "h")
    ann = tmp_path / "ann.jsonl"
    with ann.open("w") as fh:
        for name, (w, h) in sizes.items():
            fh.write(json.dumps({"image": str(tmp_path / "h" / name), "crops": [[0, 0, w // 2, h // 2]]}) + "\n")
    idx = tmp_path / "idx"
    res = run("index", "build", "--dataset", "jsonl", "--annotations", ann, "--out", idx, "--embedder", "classical")
    assert f"wrote {idx}: 3 examples, 0 skipped" in res.output
    from cropper_engine.index.store import ExampleIndex

    index = ExampleIndex.load(idx)
    assert sorted((e.width, e.height) for e in map(index.example, range(len(index)))) == sorted(sizes.values())


def test_format_option_needs_out_and_an_encoder(photos, tmp_path, monkeypatch):
    res = run("crop", photos[0], "--format", "png", ok=False)
    assert res.exit_code != 0 and "--format png needs --out" in res.output
    import cropper_engine.imageio as imageio

    monkeypatch.setattr(imageio, "heif_plugin", lambda: None)
    res = run("crop", photos[0], "--format", "heic", "--out", tmp_path / "o", ok=False)
    assert res.exit_code != 0 and "pip install pillow-heif" in res.output
