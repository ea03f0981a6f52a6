"""Reading images safely: every mode to upright RGB, clear errors for what cannot be read."""

from __future__ import annotations

import io
import subprocess
import sys

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
    """draft_side: a JPEG is decoded at a 1/2..1/8 scale that still holds the side asked for
    (`working`), rotated as displayed and with the same picture; `size` is the full upright size
    and `image` the full image, decoded on first use, once; other formats and small images are
    decoded whole."""
    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([x * 255 // 1600, y * 255 // 1200, np.full_like(x, 90)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 CW: 1200 x 1600
    path = _save(img, tmp_path / "big.jpg", quality=95, exif=exif)
    full = open_image(path)
    small = open_image(path, draft_side=300)
    assert full.size == (1200, 1600) and small.rotated and not full.reduced
    assert small.working.size == (300, 400) and small.reduced  # 1/4: the largest reduction holding 300
    assert small.size == (1200, 1600) and small.scale == (4.0, 4.0)
    ref = np.asarray(full.image.resize(small.working.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small.working, dtype=np.float32) - ref).mean() < 3.0
    assert small.full_decodes == 0
    assert np.array_equal(np.asarray(small.image), np.asarray(full.image))  # the full image, upright
    assert small.image is small.image and small.full_decodes == 1  # decoded once, kept
    small.release()
    assert small.image.size == (1200, 1600) and small.full_decodes == 2
    assert open_image(path, draft_side=700).working.size == (600, 800)  # 1/2
    assert not open_image(path, draft_side=1000).reduced  # not worth it: as is
    png = _save(img, tmp_path / "big.png")
    assert not open_image(png, draft_side=300).reduced
    # from bytes and from a file object: the full image is decoded from the bytes kept
    data = path.read_bytes()
    for src in (data, io.BytesIO(data)):
        li = open_image(src, draft_side=300)
        assert li.reduced and li.size == (1200, 1600)
        assert np.array_equal(np.asarray(li.image), np.asarray(full.image))


def test_draft_full_size_is_the_headers_not_the_drafts(tmp_path):
    """A size that 1/8 does not divide (6001 x 4003: the draft is 751 x 501) keeps its exact full
    size, rotated or not, and the full decode has it."""
    img = Image.new("RGB", (6001, 4003), (90, 120, 150))
    for orientation, want in ((1, (6001, 4003)), (8, (4003, 6001))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        p = _save(img, tmp_path / f"odd{orientation}.jpg", quality=80, exif=exif)
        li = open_image(p, draft_side=512)
        assert li.size == want and li.reduced
        assert li.working.size == ((751, 501) if orientation == 1 else (501, 751))
        assert li.image.size == want


def test_a_changed_file_is_named_when_the_full_image_is_decoded(tmp_path):
    img = Image.new("RGB", (3000, 2000), (10, 20, 30))
    p = _save(img, tmp_path / "c.jpg")
    li = open_image(p, draft_side=256)
    _save(Image.new("RGB", (2000, 3000)), p)
    with pytest.raises(ImageError, match="changed while it was being cropped"):
        li.image  # noqa: B018
    p.unlink()
    li2 = open_image(_save(img, tmp_path / "d.jpg"), draft_side=256)
    (tmp_path / "d.jpg").unlink()
    with pytest.raises(ImageError, match="no such file"):
        li2.image  # noqa: B018


def test_mpo_is_drafted_like_jpeg(tmp_path):
    """A multi-picture JPEG (what some cameras write) is decoded small like a JPEG, its first picture."""
    a = Image.new("RGB", (2400, 1600), (200, 10, 10))
    b = Image.new("RGB", (2400, 1600), (10, 200, 10))
    p = tmp_path / "m.mpo"
    a.save(p, "MPO", save_all=True, append_images=[b])
    li = open_image(p, draft_side=256)
    assert li.reduced and li.size == (2400, 1600) and li.working.size == (300, 200)
    assert li.working.getpixel((5, 5))[0] > 150 and li.image.getpixel((5, 5))[0] > 150


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


# --- issue 23: damaged files, 16-bit memory, masks through the pixel limit --------------------


def _format_samples() -> dict[str, bytes]:
    """One small image in each format Pillow writes here (17 formats, TIFF single and multi-page
    with each compression, animated GIF / PNG / WebP, 16-bit PNG and TIFF)."""
    from PIL import features

    arr = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    rgb = Image.fromarray(arr)
    g16 = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    frames = [rgb.rotate(90), rgb.rotate(180)]
    out: dict[str, bytes] = {}

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("jpg", rgb, "JPEG")
    save("jpg-progressive", rgb, "JPEG", progressive=True)
    save("png", rgb, "PNG")
    save("png-palette", rgb.convert("P"), "PNG")
    save("png-16", g16, "PNG")
    save("png-la", rgb.convert("LA"), "PNG")
    save("apng", rgb, "PNG", save_all=True, append_images=frames)
    save("gif", rgb, "GIF", save_all=True, append_images=frames)
    save("bmp", rgb, "BMP")
    for comp in (None, "tiff_lzw", "tiff_deflate", "packbits", "jpeg"):
        save(f"tiff-{comp}", rgb, "TIFF", compression=comp)
        save(f"tiff-pages-{comp}", rgb, "TIFF", compression=comp, save_all=True, append_images=frames)
    save("tiff-16", g16, "TIFF")
    save("tiff-g4", rgb.convert("1"), "TIFF", compression="group4")
    save("tiff-cmyk", rgb.convert("CMYK"), "TIFF")
    save("ico", rgb, "ICO")
    save("ppm", rgb, "PPM")
    save("tga", rgb, "TGA", compression="tga_rle")
    save("pcx", rgb, "PCX")
    save("sgi", rgb, "SGI")
    save("dds", rgb.convert("RGBA"), "DDS")
    save("qoi", rgb, "QOI")
    save("blp", rgb.convert("P"), "BLP")
    save("mpo", rgb, "MPO", save_all=True, append_images=frames[:1])
    if features.check("webp"):
        save("webp", rgb, "WEBP")
        save("webp-anim", rgb, "WEBP", save_all=True, append_images=frames)
    if features.check("jpg_2000"):
        save("jp2", rgb, "JPEG2000")
    if features.check("avif"):
        save("avif", rgb, "AVIF")
    return out


def _mutate(data: bytes, rng) -> bytes:
    """A truncation, a few flipped or replaced bytes, or both."""
    k = rng.random()
    if k < 0.3:
        return data[: rng.randrange(1, len(data))]
    b = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        i = rng.randrange(len(b))
        b[i] = b[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b[: rng.randrange(1, len(b))]) if k > 0.85 else bytes(b)


def damaged_tiff() -> bytes:
    """A 3-page TIFF whose last page has no width (its ImageWidth tag renamed): Pillow raises
    `TypeError: Missing dimensions` when it counts the pages (issue 23, item 1)."""
    pages = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    data = buf.getvalue()
    k = data.rindex(b"\x00\x01\x04\x00\x01\x00\x00\x00")  # the last page's ImageWidth (tag 256, LONG, 1)
    return data[:k] + b"\x99\x99" + data[k + 2:]


def test_a_damaged_multi_page_tiff_is_an_image_error():
    with pytest.raises(ImageError, match=r"pages.tif: corrupt image \(TypeError: Missing dimensions\); the file "
                                         "is damaged: export it again"):
        open_image(damaged_tiff(), name="pages.tif")


def test_fuzzed_files_give_image_errors():
    """Truncations and byte flips of small files in every format Pillow writes here (a fixed
    seed, at most ~10 s): each decodes or is an ImageError, as an image and as a mask (bytes);
    never another exception and never a warning."""
    import random
    import time
    import warnings

    samples = _format_samples()
    assert len(samples) >= 30
    rng = random.Random(23)
    names = sorted(samples)
    t0, n, errors = time.perf_counter(), 0, 0
    with warnings.catch_warnings(record=True) as seen:  # the filters in force (imageio's) still apply
        while n < 6000 and time.perf_counter() - t0 < 10:
            name = names[n % len(names)]
            data = _mutate(samples[name], rng)
            n += 1
            try:
                out = open_image(data, 1_000_000, name=name)
                assert out.image.mode == "RGB" and min(out.size) >= 1
            except ImageError as exc:
                errors += 1
                assert str(exc).startswith(f"{name}: "), exc
            try:
                load_mask(data)
            except ImageError:
                pass
    assert n >= 1000 and errors > n // 10, (n, errors)
    raw = [w for w in seen if not issubclass(w.category, DeprecationWarning)]  # Pillow's own, of formats it drops
    assert not raw, [str(w.message) for w in raw[:5]]


def test_16_bit_grey_is_decoded_straight_to_8_bits(tmp_path, monkeypatch):
    """A 16-bit grey PNG (and PGM, uncompressed TIFF) is decoded by Pillow straight to 8 bits:
    no 16-bit copy is held, and it counts against the limit as an 8-bit image; where that
    cannot be (compressed TIFF) it is converted in strips and counts 1.2 times."""
    import cropper_engine.imageio as imageio
    from cropper_engine.imageio import _decoded_mode, charged_pixels, probe_pixels

    decoded = []  # the mode each image had once Pillow decoded it
    real = imageio._to_rgb
    monkeypatch.setattr(imageio, "_to_rgb", lambda im: (decoded.append(im.mode), real(im))[1])
    arr = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 21 % 65536).astype(np.uint16)
    want = np.round(arr / 257.0)
    for name, kw in (("g.png", {}), ("g.tif", {}), ("g.pgm", {}), ("lzw.tif", {"compression": "tiff_lzw"})):
        p = _save(Image.fromarray(arr), tmp_path / name, **kw)
        with Image.open(p) as im:
            direct = _decoded_mode(im) == "L"
            assert direct == (name != "lzw.tif"), name
        got = open_image(p).array()
        assert got.shape == (200, 300, 3) and np.abs(got[..., 0] - want).max() <= 1, name
        assert (decoded.pop() == "L") == direct, name  # no 16-bit image was ever held
        assert probe_pixels(p.read_bytes()) == (60_000 if direct else 72_000), name
    assert charged_pixels(100, 100, "RGB") == charged_pixels(100, 100, "L") == charged_pixels(100, 100, "1") == 10_000
    assert charged_pixels(100, 100, "RGBA") == charged_pixels(100, 100, "I") == 16_000
    assert probe_pixels(b"not an image") == 0


def test_the_pixel_limit_counts_bytes_per_pixel(tmp_path):
    """An RGBA image of 10 000 pixels decodes at 8 bytes a pixel (an 8-bit one at 5): it counts
    as 16 000, refused under a 12 000 limit with both figures and the flag; an RGB one is not."""
    rgba = _save(Image.new("RGBA", (100, 100), (1, 2, 3, 4)), tmp_path / "a.png")
    with pytest.raises(ImageError) as exc:
        open_image(rgba, 12_000)
    msg = str(exc.value)
    assert "100x100 = 10,000 pixels of RGB with alpha" in msg and "counts as 16,000 pixels" in msg, msg
    assert "more than the limit of 12,000 pixels" in msg and "--max-pixels" in msg, msg
    assert open_image(_save(Image.new("RGB", (100, 100)), tmp_path / "b.png"), 12_000).size == (100, 100)
    assert open_image(rgba, 16_000).size == (100, 100)


def test_modes_converted_in_strips_match_the_whole(tmp_path, monkeypatch):
    """Alpha, 32-bit and float images are converted in strips into one RGB image: the same
    pixels as converting the whole at once."""
    import cropper_engine.imageio as imageio

    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 255, (57, 41, 4), dtype=np.uint8), "RGBA")
    i32 = Image.fromarray(rng.integers(-5000, 70000, (57, 41), dtype=np.int32), "I")
    whole = {k: imageio._to_rgb(v).tobytes() for k, v in (("rgba", rgba), ("i", i32))}
    monkeypatch.setattr(imageio, "STRIP_BYTES", 41 * 4 * 5)  # 5 rows a strip
    assert {k: imageio._to_rgb(v).tobytes() for k, v in (("rgba", rgba), ("i", i32))} == whole
    white = np.asarray(imageio._to_rgb(Image.new("RGBA", (3, 3), (255, 0, 0, 0))))
    assert (white == 255).all()


def test_odd_sources_are_named_errors(tmp_path):
    """None, a number, a path with NUL or too long for the file system, a lazily opened PIL image
    of a truncated file, an array or PIL image with no pixels: each a named ImageError."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    cases = [
        (None, "no image given"),
        (7, "not an image: 7 (int)"),
        ("a\0b.jpg", "cannot contain a NUL character"),
        ("x" * 300 + ".jpg", "(304 characters): cannot use this path"),
        (Image.open(tmp_path / "cut.jpg"), "cut.jpg: truncated file"),
        (np.zeros((0, 10, 3), np.uint8), "has no pixels (shape (0, 10, 3))"),
        (Image.new("RGB", (0, 5)), "image has no pixels (0x5)"),
        (b"", "empty data"),
    ]
    for source, text in cases:
        with pytest.raises(ImageError) as exc:
            open_image(source)
        assert text in str(exc.value), (source, str(exc.value))


def test_masks_go_through_the_pixel_limit_and_may_be_bytes(tmp_path, recwarn):
    """A mask bomb (a path, bytes or a PIL image) is refused from its header with the images'
    message (never Pillow's, never a raw warning); a mask of the image's own size is never over
    the limit; a mask given as the bytes of a PNG works."""
    from bench.memory_bench import big_png

    bomb = big_png(20_000, 5_000)  # 100 MP, a few KB
    (tmp_path / "bomb.png").write_bytes(bomb)
    for source in (tmp_path / "bomb.png", str(tmp_path / "bomb.png"), bomb):
        with pytest.raises(ImageError) as exc:
            load_mask(source, (300, 200), max_pixels=50_000_000)
        assert "20000x5000 = 100 MP, more than the limit of 50 MP" in str(exc.value), exc.value
        assert "--max-pixels" in str(exc.value) and "DecompressionBomb" not in str(exc.value)
    with pytest.raises(ImageError, match="the mask is 20000x5000 but the image is 300x200"):
        load_mask(bomb, (300, 200))  # under the default limit: the size is wrong, said before decoding
    m = np.zeros((200, 300), np.uint8)
    m[50:100, 60:120] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, "PNG")
    assert load_mask(buf.getvalue(), (300, 200)).sum() == 50 * 60
    assert load_mask(bytearray(buf.getvalue())).sum() == 50 * 60
    with pytest.raises(ImageError, match="empty"):
        load_mask(big_png(3_000, 1_000, bit_depth=8), (3_000, 1_000), max_pixels=1_000_000)  # its own size: decoded
    assert not [w for w in recwarn if "PIL" in str(w.filename) or "Decompression" in str(w.message)]


def test_format_pixels_reads_as_numbers():
    from cropper_engine.imageio import format_pixels

    assert format_pixels(4096) == "4,096 pixels"
    assert format_pixels(92_160_000) == "92.16 MP" and format_pixels(120_000_000) == "120 MP"
    assert format_pixels(10**10) == "10,000 MP" and format_pixels(999_950_000) == "1,000 MP"
    assert format_pixels(12_345_678_901) == "12,346 MP"


def test_a_bomb_beyond_pillows_own_check_names_its_width_and_height(tmp_path, monkeypatch):
    """An image over twice Pillow's own limit is refused inside Image.open before its size is
    seen: its width and height are read from the header all the same, for the path, the bytes
    and a file object, and by image_size; image_size applies our limit, not Pillow's."""
    import cropper_engine.imageio as imageio
    from bench.memory_bench import big_png

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 120_000_000)  # as the guard leaves it for the default limit
    data = big_png(20_000, 15_000)  # 300 MP, a few KB: over 2 x 120 MP, so Pillow raises in Image.open
    p = tmp_path / "huge.png"
    p.write_bytes(data)
    want = r"huge.png: 20000x15000 = 300 MP, more than the limit of 120 MP \(a decompression bomb\?\); if the image"
    with pytest.raises(ImageError, match=want):
        open_image(p)
    for src in (data, io.BytesIO(data)):
        with pytest.raises(ImageError, match="20000x15000 = 300 MP, more than the limit of 120 MP"):
            open_image(src, name="huge.png")
    with pytest.raises(ImageError, match=want):
        image_size(p)
    # Pillow's check refusing an image under our limit (its limit set lower by someone else): the header's size
    monkeypatch.setattr(imageio, "pillow_guard", lambda max_pixels: None)
    assert image_size(p, max_pixels=400_000_000) == (20_000, 15_000)
    with pytest.raises(ImageError, match="20000x15000 = 300 MP, refused by Pillow as a decompression bomb"):
        open_image(p, max_pixels=400_000_000)


def _heif_ok():
    pytest.importorskip("pillow_heif")


def _photo(w=96, h=64):
    """A picture whose top-left corner is blue, the rest red: where it lands shows the rotation."""
    img = Image.new("RGB", (w, h), (200, 30, 30))
    img.paste((0, 0, 255), (0, 0, w // 4, h // 4))
    return img


def _srgb():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("fmt,suffix", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_heic_and_avif_are_read_upright_with_their_profile(tmp_path, fmt, suffix):
    """HEIC (pillow-heif, registered when imageio is imported) and AVIF (Pillow's own) are read
    from a path and from bytes: upright (EXIF orientation 6: shown rotated 90 degrees
    clockwise, the blue corner top right), their ICC profile kept, image_size as decoded."""
    if fmt == "HEIF":
        _heif_ok()
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / f"photo{suffix}"
    _photo().save(p, fmt, exif=exif.tobytes(), icc_profile=_srgb(), quality=90)
    for src in (p, p.read_bytes()):
        li = open_image(src)
        assert li.size == (64, 96) and li.icc_profile == _srgb() and li.image.mode == "RGB"
        r, _, b = li.image.getpixel((60, 3))  # top right: the blue corner
        assert b > 150 and r < 100, (fmt, li.image.getpixel((60, 3)))
        assert li.image.getpixel((3, 90))[0] > 150  # bottom left: red
    assert image_size(p) == (64, 96)


def test_a_heic_is_read_by_a_process_whose_first_image_it_is(tmp_path):
    """Importing imageio registers the HEIC opener: a fresh process reads a HEIC file with no
    HEIC written or opened before it (in this process the save above registers it anyway)."""
    _heif_ok()
    p = tmp_path / "photo.heic"
    _photo().save(p, "HEIF", quality=80)
    code = "import sys; from cropper_engine.imageio import open_image; print(open_image(sys.argv[1]).size)"
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "(96, 64)", out.stderr

def test_heic_without_pillow_heif_is_named(tmp_path, monkeypatch):
    """Where pillow-heif is not installed, a HEIC file (by its bytes, or by its name) is an
    ImageError that says so and how to install it, not "not an image"."""
    _heif_ok()
    p = tmp_path / "photo.heic"
    _photo().save(p, "HEIF", quality=80)
    Image.init()
    monkeypatch.setattr(Image, "ID", [f for f in Image.ID if f != "HEIF"])
    monkeypatch.delitem(Image.OPEN, "HEIF")
    for ext in [e for e, f in Image.EXTENSION.items() if f == "HEIF"]:
        monkeypatch.delitem(Image.EXTENSION, ext)
    for src, name in ((p, str(p)), (p.read_bytes(), "upload.bin")):
        with pytest.raises(ImageError, match=r"no HEIC decoder installed \(pip install pillow-heif\)") as e:
            open_image(src, name=name)
        assert str(e.value).startswith(f"{name}: ")
    (tmp_path / "fake.heic").write_bytes(b"not a heic at all, but named so")
    with pytest.raises(ImageError, match="fake.heic: no HEIC decoder installed"):
        open_image(tmp_path / "fake.heic")


def test_an_avif_under_a_generic_brand_is_left_to_pillow(tmp_path):
    """pillow-heif's opener is registered for HEIC only: an AVIF whose major brand is the generic
    mif1 (which HEIC files use too) still reaches Pillow's AVIF plugin."""
    _heif_ok()
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    from cropper_engine.imageio import image_kind

    buf = io.BytesIO()
    _photo().save(buf, "AVIF", quality=90)
    data = bytearray(buf.getvalue())
    assert data[8:12] == b"avif"
    data[8:12] = b"mif1"  # the major brand; "avif" stays among the compatible ones
    assert image_kind(bytes(data[:64])) == "avif"
    li = open_image(bytes(data))
    assert li.size == (96, 64)
    heic = io.BytesIO()
    _photo().save(heic, "HEIF", quality=80)
    assert image_kind(heic.getvalue()[:64]) == "heic"
