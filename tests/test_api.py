"""The Python library as a user calls it: `from cropper_engine import Cropper`."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cropper_engine import Crop, CropBox, Cropper, CropperError, ImageError, InputError
from cropper_engine.config import load_config


@pytest.fixture(scope="module")
def cropper():
    return Cropper(vlm="none")


def test_import_is_light_and_builds_nothing():
    code = ("import sys; from cropper_engine import Cropper; c = Cropper(vlm='none'); "
            "print('HEAVY', [m for m in ('torch', 'transformers', 'open_clip', 'vllm', 'hnswlib', 'cv2', "
            "'cropper_engine.engine.loop') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "HEAVY []" in out.stdout


def test_one_ratio_gives_one_crop_with_everything(cropper, photos):
    crop = cropper.crop(photos[0], ratio="16:9")
    assert isinstance(crop, Crop) and isinstance(crop.box, CropBox)
    x1, y1, x2, y2 = crop.box
    assert 0 <= x1 < x2 <= crop.width and 0 <= y1 < y2 <= crop.height
    assert abs((x2 - x1) / (y2 - y1) - 16 / 9) < 0.01
    assert crop.pipeline == "no-vlm" and 0 < crop.score <= 1 and str(crop.ratio) == "16:9"
    assert crop.candidates and all(c.box.is_valid() for c in crop.candidates)
    assert isinstance(crop.notes, list)
    img = crop.image()
    assert img.size == (crop.box.width, crop.box.height) and img.mode == "RGB"
    row = crop.to_json()
    assert row["box"] == list(crop.box) and row["pipeline"] == "no-vlm"


def test_inputs_path_pil_array_bytes_agree(cropper, photos):
    p = photos[1]
    pil = Image.open(p)
    by_path = cropper.crop(p, ratio="1:1", id="x")
    for src in (str(p), pil, np.asarray(pil.convert("RGB")), p.read_bytes(), bytearray(p.read_bytes()),
                memoryview(p.read_bytes())):
        assert cropper.crop(src, ratio="1:1", id="x").box == by_path.box, type(src)


def test_several_ratios_give_a_list_in_order(cropper, photos):
    crops = cropper.crop(photos[0], ratio=["1:1", "4:5", "16:9"])
    assert [str(c.ratio) for c in crops] == ["1:1", "4:5", "16:9"]
    crops = cropper.crop(photos[0], ratio="1:1,16:9")  # as on the command line
    assert [str(c.ratio) for c in crops] == ["1:1", "16:9"]
    assert isinstance(cropper.crop(photos[0], ratio=1.5), Crop)


def test_size_resizes_never_enlarges(cropper, photos):
    crop = cropper.crop(photos[0], ratio="1:1", size=(64, 64))
    assert crop.image().size == (64, 64)
    assert crop.image(size="32x32").size == (32, 32)
    big = cropper.crop(photos[0], ratio="1:1", size=(10_000, 10_000))
    assert big.image().size == (big.box.width, big.box.height)


def test_image_is_upright_and_keeps_the_icc_profile(cropper, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    arr = np.zeros((60, 100, 3), dtype=np.uint8)
    arr[:, :50] = (255, 0, 0)  # left half red, right half blue
    arr[:, 50:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 60 wide, 100 tall, red on top
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, icc_profile=icc, quality=95)
    crop = cropper.crop(path)
    assert (crop.width, crop.height) == (60, 100)
    img = crop.image()
    assert img.info.get("icc_profile") == icc
    full = cropper.crop(path, task="subject", subject="0,0,60,100").image()
    top, bottom = np.asarray(full)[2, 30], np.asarray(full)[-3, 30]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red above blue: upright
    out = crop.save(tmp_path / "c.jpg", size=(20, 20))
    with Image.open(out) as saved:
        assert max(saved.size) == 20 and saved.info.get("icc_profile") == icc


def test_subject_and_mask(cropper, photos):
    w, h = Image.open(photos[0]).size
    crop = cropper.crop(photos[0], ratio="1:1", subject=f"{w // 3},{h // 3},{w // 3 + 40},{h // 3 + 40}")
    x1, y1, x2, y2 = crop.box
    assert x1 <= w // 3 and y1 <= h // 3 and x2 >= w // 3 + 40 and y2 >= h // 3 + 40
    mask = np.zeros((h, w), dtype=bool)
    mask[10:60, 10:60] = True
    crop = cropper.crop(photos[0], mask=mask)
    assert crop.task.value == "subject"
    x1, y1, x2, y2 = crop.box
    assert x1 <= 10 and y1 <= 10 and x2 >= 60 and y2 >= 60


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": "16-9"}, "bad aspect ratio '16-9'"),
    ({"task": "ratio"}, "needs ratio="),
    ({"task": "subject"}, "needs mask="),
    ({"task": "free", "subject": "auto"}, "not to task='free'"),
    ({"subject": "nonsense"}, "unknown subject 'nonsense'"),
    ({"ratio": "1:1", "size": "big"}, "bad size 'big'"),
    ({"task": "sideways"}, "unknown task 'sideways'"),
])
def test_bad_options_raise_input_error_with_the_cli_message(cropper, photos, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        cropper.crop(photos[0], **kwargs)


def test_bad_images_raise_image_error(cropper, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        cropper.crop(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        cropper.crop(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="must be uint8"):
        cropper.crop(np.zeros((10, 10, 3), dtype=np.float32))


def test_crop_many_streams_in_order_with_errors_as_values(cropper, photos, tmp_path):
    consumed = []

    def gen():
        for item in [photos[0], tmp_path / "missing.jpg", {"image": photos[1], "ratio": "4:5"},
                     {"image": photos[2], "ratio": "oops"}, {"nope": 1}, photos[3].read_bytes()]:
            consumed.append(item)
            yield item

    it = cropper.crop_many(gen(), ratio="1:1", batch_size=2)
    first = next(it)
    assert len(consumed) == 2  # lazy: only the first batch was read
    rest = list(it)
    out = [first, *rest]
    assert len(out) == 6
    assert isinstance(out[0], Crop) and str(out[0].ratio) == "1:1"
    assert isinstance(out[1], ImageError) and "no such file" in str(out[1])
    assert isinstance(out[2], Crop) and str(out[2].ratio) == "4:5"
    assert isinstance(out[3], InputError) and "bad aspect ratio 'oops'" in str(out[3])
    assert isinstance(out[4], CropperError) and "no 'image' key" in str(out[4])
    assert isinstance(out[5], Crop)
    assert out[0].box == cropper.crop(photos[0], ratio="1:1").box  # batching changes nothing
    several = list(cropper.crop_many(photos[:2], ratio=["1:1", "16:9"]))
    assert all(isinstance(r, list) and len(r) == 2 for r in several)


def test_config_and_keyword_overrides(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[vlm]\nmodel = "none"\ncandidates = 3\n[loop]\nkeep_faces = "off"\n')
    c = Cropper(cfg_file, overrides={"vlm.candidates": 5}, batch_size=2)
    assert c.config.vlm.model == "none" and c.config.vlm.candidates == 5 and c.config.vlm.batch_size == 2
    assert c.config.loop.keep_faces == "off"
    c = Cropper(load_config(overrides={"vlm.model": "none"}), keep_faces=True)
    assert c.config.vlm.model == "none" and c.config.loop.keep_faces == "on"
    monkeypatch.setenv("CROPPER_VLM_CANDIDATES", "4")
    assert Cropper().config.vlm.candidates == 4  # the environment applies as on the command line
    from cropper_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key"):
        Cropper(overrides={"vlm.nonsense": 1})
    with pytest.raises(ConfigError, match="vlm.backend"):
        Cropper(backend="warp")


def test_describe_close_and_context_manager(photos):
    with Cropper(vlm="none") as c:
        info = c.describe()
        assert info["pipeline"] == "no-vlm"
        assert c.crop(photos[0]).pipeline == "no-vlm"
    assert c._engine is None


def test_bytes_from_a_buffer(cropper, photos):
    buf = io.BytesIO()
    Image.open(photos[0]).save(buf, format="PNG")
    assert cropper.crop(buf.getvalue(), ratio="3:2").image().size[0] > 0
