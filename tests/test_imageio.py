"""Reading images safely: every mode to upright RGB, clear errors for what cannot be read."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cropper_engine.errors import ImageError
from cropper_engine.imageio import image_size, load_mask, open_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    cases = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray.png": rgb.convert("L"),
        "palette.png": rgb.convert("P"),
        "la.png": rgb.convert("LA"),
        "rgba.png": rgb.convert("RGBA"),
        "bits.png": rgb.convert("1"),
    }
    for name, img in cases.items():
        out = open_image(_save(img, tmp_path / name))
        assert out.image.mode == "RGB" and out.size == (30, 20), name
    # 16-bit grey: scaled, not clipped to white
    arr16 = (np.linspace(0, 65535, 600).reshape(20, 30)).astype(np.uint16)
    out = open_image(_save(Image.fromarray(arr16), tmp_path / "g16.png"))
    a = out.array()
    assert a.min() == 0 and a.max() == 255 and 100 < a.mean() < 155


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert open_image(_save(img, tmp_path / "t.png")).array()[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    out = open_image(path)
    assert out.size == (20, 40) and out.rotated
    assert image_size(path) == (20, 40)


def test_draft_decodes_a_large_jpeg_small_and_upright(tmp_path):
    """draft_side: a JPEG comes back at a 1/2..1/8 scale that still holds the side asked for,
    rotated as displayed and with the same picture; other formats and small images are as is."""
    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([x * 255 // 1600, y * 255 // 1200, np.full_like(x, 90)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 CW: 1200 x 1600
    path = _save(img, tmp_path / "big.jpg", quality=95, exif=exif)
    full = open_image(path)
    small = open_image(path, draft_side=300)
    assert full.size == (1200, 1600) and small.rotated
    assert small.size == (300, 400)  # 1/4: the largest reduction with a longest side >= 300
    ref = np.asarray(full.image.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small.image, dtype=np.float32) - ref).mean() < 3.0
    assert open_image(path, draft_side=700).size == (600, 800)  # 1/2
    assert open_image(path, draft_side=1000).size == (1200, 1600)  # not worth it: as is
    png = _save(img, tmp_path / "big.png")
    assert open_image(png, draft_side=300).size == (1600, 1200)


def test_icc_profile_kept(tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = _save(Image.new("RGB", (8, 8)), tmp_path / "icc.jpg", icc_profile=icc)
    assert open_image(path).icc_profile == icc


def test_icc_profile_dropped_when_not_rgb(tmp_path):
    """A CMYK or grey profile does not describe the RGB image (nor its crops): it is dropped."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = srgb[:16] + b"CMYK" + srgb[20:]  # a profile header naming another colour space
    gray = srgb[:16] + b"GRAY" + srgb[20:]
    rgb = Image.new("RGB", (8, 8), (200, 40, 10))
    assert open_image(_save(rgb.convert("CMYK"), tmp_path / "c.jpg", icc_profile=cmyk)).icc_profile is None
    assert open_image(_save(rgb.convert("L"), tmp_path / "g.png", icc_profile=gray)).icc_profile is None
    assert open_image(_save(rgb.convert("L"), tmp_path / "g2.png", icc_profile=srgb)).icc_profile is None
    assert open_image(_save(rgb, tmp_path / "bad.png", icc_profile=cmyk)).icc_profile is None
    assert open_image(_save(rgb.convert("RGBA"), tmp_path / "a.png", icc_profile=srgb)).icc_profile == srgb
    with Image.open(tmp_path / "c.jpg") as im:
        assert open_image(im).icc_profile is None


@pytest.mark.parametrize("content,msg", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
])
def test_bad_files(tmp_path, content, msg):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=msg):
        open_image(p)


def test_missing_truncated_directory_and_bomb(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        open_image(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated|cannot read"):
        open_image(tmp_path / "cut.jpg")
    big = _save(Image.new("L", (5000, 5000)), tmp_path / "big.png")  # 25 MP of zeros: a tiny file
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(big, max_pixels=10_000_000)


def test_arrays_and_masks(tmp_path):
    assert open_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    with pytest.raises(ImageError, match="uint8"):
        open_image(np.zeros((5, 6, 3), np.float32))
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 255
    p = _save(Image.fromarray(m), tmp_path / "m.png")
    mask = load_mask(p, (12, 10))
    assert mask.sum() == 12 and mask.dtype == bool
    with pytest.raises(ImageError, match="12x10.*20x20"):
        load_mask(p, (20, 20))
    with pytest.raises(ImageError, match="empty"):
        load_mask(np.zeros((4, 4), bool))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    assert load_mask(rgba).sum() == 1  # alpha is the mask
