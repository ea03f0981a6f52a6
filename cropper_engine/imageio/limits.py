"""The pixel limit, checked from an image's header before it is decoded: what an image counts
against it (`charged_pixels`: more where decoding holds more bytes a pixel), Pillow's own
bomb check raised to it (`pillow_guard`), headers read without that check, and Pillow's
failures turned into ImageErrors that name the file and the problem (`pillow_errors`).
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

from cropper_engine.errors import ImageError
from cropper_engine.imageio.heif import missing_decoder

# Pillow's own bomb check warns at 89M pixels; we refuse above this many, before decoding.
DEFAULT_MAX_PIXELS = 120_000_000


RAISE_HINT = "if the image is genuine, raise the limit: --max-pixels N (crop, serve) or CROPPER_MAX_PIXELS"
_GUARD_LOCK = threading.Lock()
_PIL_MODULES = r"PIL(\.|$)"  # the warnings of Pillow's decoders are silenced (`pillow_guard`)


def format_pixels(n: int) -> str:
    """92160000 -> '92.16 MP', 120000000 -> '120 MP', 10**10 -> '10,000 MP', 4096 -> '4,096 pixels'."""
    if n < 1_000_000:
        return f"{n:,} pixels"
    mp = n / 1e6
    text = f"{mp:.4g}"
    return f"{mp:,.0f} MP" if float(text) >= 1000 else f"{text} MP"


def too_many_pixels(name: str, w: int, h: int, max_pixels: int) -> str:
    return (f"{name}: {w}x{h} = {format_pixels(w * h)}, more than the limit of {format_pixels(max_pixels)} "
            f"(a decompression bomb?); {RAISE_HINT}")


def pillow_guard(max_pixels: int) -> None:
    """Pillow refuses images over its own MAX_IMAGE_PIXELS (89.5 MP, an error at twice that)
    inside Image.open, before we see the size: it is raised to our limit, which we check
    ourselves before decoding, and its warnings silenced: the bomb warning (our limit is the one
    that counts) and what its decoders say of damaged metadata ("Tag data larger than file",
    "Corrupt EXIF data"): an image that decodes is used, one that does not is an ImageError.
    The guard only ever goes up, so concurrent callers with other limits stay safe."""
    from PIL import Image

    with _GUARD_LOCK:
        cur = Image.MAX_IMAGE_PIXELS
        if cur is not None and cur < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        # checked on every call: a test harness or another thread's catch_warnings may have reset them
        kinds = {f[2] for f in warnings.filters if f[0] == "ignore"}
        if Image.DecompressionBombWarning not in kinds:
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        if not any(f[0] == "ignore" and f[2] is UserWarning and f[3] is not None and f[3].pattern == _PIL_MODULES
                   for f in warnings.filters):
            warnings.filterwarnings("ignore", category=UserWarning, module=_PIL_MODULES)


# What Pillow raises on damaged files besides OSError: a fuzz of truncations and byte flips over
# 17 formats (tests/test_imageio.py::test_fuzzed_files_give_image_errors) found TypeError
# ("Missing dimensions", multi-page TIFF), KeyError and IndexError (TIFF tags, GIF frames),
# struct.error, RuntimeError (AVIF), NotImplementedError (BLP), ValueError, SyntaxError, EOFError.
# Only Pillow's own calls (open, seek, load, transpose, convert) are guarded with these.
PILLOW_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError, struct.error, RuntimeError,
    NotImplementedError, ZeroDivisionError, OverflowError, zlib.error,
)
# Bytes a decoded pixel holds in Pillow (RGB is stored as 4 bytes), by mode
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4,
                "La": 4, "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4,
                "I": 4, "F": 4}
RGB_PIXEL_BYTES = 4
# What an 8-bit image (grey, palette, 1-bit, RGB) holds per pixel while it becomes RGB: the pixel
# limit counts pixels at this weight, and an image that needs more (16-bit kept as is, alpha,
# CMYK, 32-bit) counts as that many more pixels (`charged_pixels`).
BASE_PIXEL_BYTES = 5


_DIRECT_8BIT = {"I;16": "L;16", "I;16L": "L;16", "I;16B": "L;16B", "I;16N": "L;16"}


def held_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel decoding an image of this Pillow mode holds at its peak: the decoded
    image, plus the RGB image made of it (converted in strips, so nothing else of that size)."""
    own = _PIXEL_BYTES.get(mode, 4)
    return own if mode == "RGB" else own + RGB_PIXEL_BYTES


def charged_pixels(width: int, height: int, mode: str = "RGB") -> int:
    """The pixels an image counts against the pixel limit (and a server's pixel budget): its
    pixels, more where decoding holds more bytes per pixel than an 8-bit image does (16-bit grey
    that cannot be decoded straight to 8 bits x1.2, alpha / CMYK / 32-bit x1.6)."""
    n = int(width) * int(height)
    per = held_bytes_per_pixel(mode)
    return n if per <= BASE_PIXEL_BYTES else -(-n * per // BASE_PIXEL_BYTES)


def _decoded_mode(im: Any) -> str:
    """The mode `open_image` decodes an opened (not yet loaded) image to: 16-bit grey PNG, PGM
    and uncompressed TIFF are decoded straight to 8 bits (`_decode_16_as_8`)."""
    return "L" if _direct_tiles(im) is not None else im.mode


def probe_pixels(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """`charged_pixels` of an image file (bytes or a path) from its header only, without
    decoding; 0 when the header cannot be read (`open_image` then names the problem). For a
    caller that budgets decoded memory before decoding (the server's pixel budget)."""
    from PIL import Image

    pillow_guard(max_pixels)
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(fp) as im:
            return charged_pixels(im.width, im.height, _decoded_mode(im))
    except (OSError, Image.DecompressionBombError, *PILLOW_DECODE_ERRORS):
        return 0


def _depth_words(mode: str) -> str:
    return {"I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I;16N": "16-bit grey",
            "I": "32-bit integer", "F": "32-bit float", "CMYK": "CMYK", "LA": "grey with alpha",
            "PA": "palette with alpha", "RGBA": "RGB with alpha", "RGBa": "RGB with alpha"}.get(mode, mode)


def pixel_problem(name: str, w: int, h: int, max_pixels: int, mode: str = "RGB") -> str | None:
    """Why an image of this size and decoded mode cannot be decoded under the pixel limit (None: it can)."""
    if w <= 0 or h <= 0:
        return f"{name}: image has no pixels ({w}x{h})"
    charged = charged_pixels(w, h, mode)
    if charged <= max_pixels:
        return None
    if charged == w * h:
        return too_many_pixels(name, w, h, max_pixels)
    return (f"{name}: {w}x{h} = {format_pixels(w * h)} of {_depth_words(mode)}, which decodes at "
            f"{held_bytes_per_pixel(mode)} bytes a pixel (an 8-bit image {BASE_PIXEL_BYTES}) and so counts as "
            f"{format_pixels(charged)}, more than the limit of {format_pixels(max_pixels)}; {RAISE_HINT}")


def check_pixels(name: str, w: int, h: int, max_pixels: int, mode: str = "RGB") -> None:
    """Raise ImageError when an image of this size and decoded mode is over the pixel limit."""
    problem = pixel_problem(name, w, h, max_pixels, mode)
    if problem:
        raise ImageError(problem)


def open_header(reopen: Any) -> Any:
    """The image a file opens as, its header read as `Image.open` reads it but without Pillow's
    decompression-bomb check (which refuses an image of more than twice PIL.Image.MAX_IMAGE_PIXELS
    before anyone sees its size); None where no plugin reads it. `reopen()` gives the file from
    its start. For the size an over-limit image's message names; nothing is decoded."""
    from PIL import Image

    try:
        fp = reopen()
        prefix = fp.read(16)
    except (OSError, ValueError):
        return None
    Image.init()
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None:
            continue
        try:
            ok = not accept or accept(prefix)
            if ok and not isinstance(ok, str):
                fp.seek(0)
                im = factory(fp, "")
                im._exclusive_fp = True  # closing the image closes the file
                return im
        except Exception:  # a plugin that does not read it: the next one
            continue
    fp.close()
    return None


def _direct_tiles(im: Any) -> list[Any] | None:
    """The tiles of a 16-bit grey image rewritten so Pillow's decoder unpacks each sample's high
    byte into an 8-bit image (no 16-bit copy is ever held); None where that does not apply (only
    PNG's and the raw decoder's tiles, no transparency key)."""
    if im.mode not in _DIRECT_8BIT and not (im.mode == "I" and im.format == "PPM"):
        return None
    if "transparency" in getattr(im, "info", {}) or not hasattr(im, "_mode"):
        return None
    tiles = []
    for t in getattr(im, "tile", None) or []:
        args = t.args if hasattr(t, "args") else t[3]
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        codec = t.codec_name if hasattr(t, "codec_name") else t[0]
        if codec not in ("zip", "raw") or raw not in _DIRECT_8BIT:
            return None
        new = _DIRECT_8BIT[raw]
        tiles.append(t._replace(args=new if isinstance(args, str) else (new, *args[1:])))
    return tiles or None


def _decode_16_as_8(im: Any) -> None:
    """Decode a 16-bit grey image straight to 8 bits where Pillow's decoder can (see `_direct_tiles`)."""
    tiles = _direct_tiles(im)
    if tiles is not None:
        im.tile = tiles
        im._mode = "L"


@contextlib.contextmanager
def pillow_errors(name: str, max_pixels: int = DEFAULT_MAX_PIXELS, reopen: Any = None) -> Iterator[None]:
    """Pillow's calls inside become ImageErrors naming `name` and the problem: unreadable (a HEIC
    or AVIF file without its decoder named so), truncated, a decompression bomb (its width and
    height read from the header where `reopen()` gives the file again), or damaged in a way
    Pillow does not name (PILLOW_DECODE_ERRORS). ImageErrors raised inside pass through."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        head = b""
        if reopen is not None:
            with contextlib.suppress(OSError, ValueError), reopen() as f:
                head = f.read(64)
        why = missing_decoder(name, head)
        raise ImageError(f"{name}: {why}" if why else f"{name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        im = open_header(reopen) if reopen is not None else None
        if im is not None:
            with im:
                w, h = im.size
                problem = pixel_problem(name, w, h, max_pixels, _decoded_mode(im))
            raise ImageError(problem or (
                f"{name}: {w}x{h} = {format_pixels(w * h)}, refused by Pillow as a decompression bomb (over twice "
                f"PIL.Image.MAX_IMAGE_PIXELS, set lower than the limit of {format_pixels(max_pixels)})")) from None
        n = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{format_pixels(int(n.group(1)))}, " if n else ""
        raise ImageError(f"{name}: {size}more than the limit of {format_pixels(max_pixels)} (a decompression "
                         f"bomb?); {RAISE_HINT}") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode it (a damaged header, or lower --max-pixels "
                         "and decode fewer images at once)") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ImageError(f"{name}: truncated file ({msg})") from None
        raise ImageError(f"{name}: cannot read image ({msg})") from None
    except PILLOW_DECODE_ERRORS as exc:  # Pillow raises these on damaged files
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ImageError(f"{name}: corrupt image ({why}); the file is damaged: export it again from its "
                         "source, or leave it out") from None

