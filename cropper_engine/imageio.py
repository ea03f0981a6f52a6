"""Reading images safely: size limits before decoding, EXIF rotation, every mode to RGB.

Every failure becomes an `ImageError` whose message names the file and the problem, so a
batch can count and skip a bad image and go on.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import struct
import threading
import uuid
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import ImageError

# Pillow's own bomb check warns at 89M pixels; we refuse above this many, before decoding.
DEFAULT_MAX_PIXELS = 120_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".hif",
                  ".avif"}
HEIF_SUFFIXES = (".heic", ".heif", ".hif", ".heics", ".heifs")
AVIF_SUFFIXES = (".avif", ".avifs")
NO_HEIC = "no HEIC decoder installed (pip install pillow-heif)"
NO_AVIF = "no AVIF decoder installed (pip install -U pillow: its wheels read AVIF from 11.3 on)"
# ISO-BMFF brands (the `ftyp` box) of HEVC-coded HEIF images (HEIC) and of AVIF images
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
AVIF_BRANDS = (b"avif", b"avis")


class LoadedImage:
    """An RGB image as the user sees it (EXIF orientation applied).

    `image` is the whole picture at full resolution and `size` its (upright) size. A large JPEG
    opened for its crop box alone (`open_image(..., draft_side=N)`) is decoded at a reduced scale
    (`working`: JPEG draft mode, longest side at least N, several times faster than a full
    decode); `image` then decodes the source again at full size on its first use (to cut and
    write a crop) and keeps it until `release()`. Whoever only downscales the picture (analysis,
    descriptors, saliency, face detection) reads `working`; whoever cuts it by a box in pixels
    reads `image` (`reduced` says whether the two differ).
    """

    def __init__(self, image: Any, path: str, icc_profile: bytes | None = None, source_mode: str = "RGB",
                 rotated: bool = False, uid: str | None = None, notes: list[str] | None = None, *,
                 full_size: tuple[int, int] | None = None, source: Any = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, format: str | None = None) -> None:
        self.working = image  # PIL.Image.Image in mode RGB: the full image, or a reduced decode of it
        self.path = path
        self.icc_profile = icc_profile
        self.source_mode = source_mode
        self.rotated = rotated
        self.uid = uid or uuid.uuid4().hex  # names this decoded image in caches
        self.notes = list(notes or [])  # what decoding changed: frames dropped, alpha flattened
        self.format = format  # the file's format as Pillow names it (JPEG, PNG, HEIF, AVIF, ...); None: not a file
        self._size = tuple(full_size) if full_size is not None else tuple(image.size)
        self.reduced = self._size != tuple(image.size)
        self._full = None if self.reduced else image
        self._source = source if self.reduced else None  # what `image` decodes again: a path or the file's bytes
        self._max_pixels = max_pixels
        self._lock = threading.Lock()
        self.full_decodes = 0  # how many times `image` decoded the source (tests: once per image)

    def __repr__(self) -> str:
        held = f", working {self.working.size[0]}x{self.working.size[1]}" if self.reduced else ""
        return f"LoadedImage({self.path!r}, {self._size[0]}x{self._size[1]}{held})"

    @property
    def size(self) -> tuple[int, int]:
        """The upright image's full width and height (whatever `working` holds)."""
        return self._size  # type: ignore[return-value]

    @property
    def scale(self) -> tuple[float, float]:
        """Full-resolution pixels per `working` pixel, across and down (1.0 unless reduced)."""
        return self._size[0] / self.working.size[0], self._size[1] / self.working.size[1]

    @property
    def image(self) -> Any:
        """The whole image at full resolution (RGB PIL image): decoded from the source on first
        use where only a reduced copy is held; an ImageError where the source cannot be decoded
        again as it was (gone, changed)."""
        full = self._full
        if full is not None:
            return full
        with self._lock:
            if self._full is None:
                self._full = self._decode_full()
            return self._full

    def release(self) -> None:
        """Forget the full-resolution decode of a reduced image (the next `image` decodes again)."""
        if self.reduced:
            self._full = None

    def _decode_full(self) -> Any:
        self.full_decodes += 1
        again = open_image(self._source, self._max_pixels, name=self.path)
        if again.size != self.size:
            raise ImageError(f"{self.path}: the file changed while it was being cropped (it was "
                             f"{self.size[0]}x{self.size[1]}, it is {again.size[0]}x{again.size[1]} now); "
                             "crop it again")
        return again.working

    def array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


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


def ftyp_brands(head: bytes) -> list[bytes]:
    """The brands of an ISO-BMFF file's `ftyp` box (major first, then the compatible ones) from
    its first bytes; [] for any other file."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return []
    end = min(len(head), max(16, int.from_bytes(head[:4], "big")))
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def image_kind(head: bytes) -> str | None:
    """'heic' or 'avif' for the first bytes of a HEIF file coded in HEVC or AV1, else None."""
    brands = ftyp_brands(head)
    if not brands:
        return None
    if brands[0] in AVIF_BRANDS or (any(b in AVIF_BRANDS for b in brands)
                                    and not any(b in HEIF_BRANDS for b in brands)):
        return "avif"
    return "heic" if any(b in HEIF_BRANDS for b in brands) else None


_HEIF_LOCK = threading.Lock()
_heif_class: Any = None  # pillow_heif's HeifImageFile, once imported


def _heif_accept(prefix: bytes) -> bool:
    """Pillow's first look (16 bytes): a HEIF major brand, or a generic one (mif1 / msf1) that
    `_heif_open` tells apart from AVIF by the compatible brands."""
    return prefix[4:8] == b"ftyp" and (prefix[8:12] in HEIF_BRANDS or prefix[8:12] in (b"mif1", b"msf1"))


def heif_plugin() -> Any:
    """pillow_heif's image class, imported and registered with Pillow (opener, saver) on first
    use; None where pillow-heif is not installed."""
    global _heif_class
    if _heif_class is None:
        with _HEIF_LOCK:
            if _heif_class is None:
                try:
                    import pillow_heif
                except ImportError:
                    return None
                from PIL import Image

                pillow_heif.register_heif_opener()  # its saver, extensions and MIME type
                cls = pillow_heif.HeifImageFile
                Image.register_open(cls.format, _heif_open, _heif_accept)  # ours: AVIF is left to Pillow
                _heif_class = cls
    return _heif_class


def _heif_open(fp: Any, filename: Any = None) -> Any:
    """Pillow's opener for HEIC: pillow-heif's, imported on the first HEIC file (importing it
    costs ~20 ms, so it is not imported with this module). An AVIF file under a generic brand is
    refused with a SyntaxError, which sends Pillow on to its own AVIF plugin."""
    head = fp.read(64)
    fp.seek(0)
    if image_kind(head) != "heic":
        raise SyntaxError("not a HEVC-coded HEIF image")
    cls = heif_plugin()
    if cls is None:  # pragma: no cover - registered only where pillow-heif is installed
        raise SyntaxError(NO_HEIC)
    return cls(fp, filename)


def _register_heif() -> None:
    """Register the HEIC opener with Pillow where pillow-heif is installed, without importing it
    (`_heif_open` does, on the first HEIC file): a folder walk then takes .heic / .heif files."""
    from importlib.util import find_spec

    from PIL import Image

    if find_spec("pillow_heif") is None:
        return
    if "HEIF" not in Image.OPEN:
        Image.register_save("HEIF", _heif_save)
        Image.register_extensions("HEIF", list(HEIF_SUFFIXES))
        Image.register_mime("HEIF", "image/heif")
    ensure_heif_opener()


def ensure_heif_opener() -> None:
    """Keep our HEIF opener in place: a library that registers pillow-heif's own (imageio's Pillow
    plugin does, on import) would send an AVIF under a generic brand to pillow-heif, which has no
    AV1 decoder. A dict lookup when nothing changed; called before every open."""
    from PIL import Image

    entry = Image.OPEN.get("HEIF")
    if entry is not None and entry[0] is not _heif_open:
        Image.register_open("HEIF", _heif_open, _heif_accept)


def _heif_save(im: Any, fp: Any, filename: Any) -> None:
    """Pillow's saver for HEIC until pillow-heif is imported: it imports it and hands over."""
    from PIL import Image

    heif_plugin()
    handler = Image.SAVE.get("HEIF")
    if handler is None or handler is _heif_save:
        raise OSError("no HEIC encoder here (pillow-heif without one); write the crops as JPEG: --format jpg")
    handler(im, fp, filename)


_register_heif()


def missing_decoder(name: str, head: bytes = b"") -> str | None:
    """Why Pillow cannot read an image that is a HEIC or AVIF file (by its first bytes, else its
    name's suffix) here: no decoder installed; None for anything else."""
    from PIL import Image, features

    kind = image_kind(head) or {**dict.fromkeys(HEIF_SUFFIXES, "heic"), **dict.fromkeys(AVIF_SUFFIXES, "avif")}.get(
        Path(name).suffix.lower() if name else "")
    if kind == "heic" and "HEIF" not in Image.OPEN:
        return NO_HEIC
    if kind == "avif":
        try:
            ok = bool(features.check("avif"))
        except (ValueError, ImportError):
            ok = False
        if not ok:
            return NO_AVIF
    return None


def with_image_notes(row: dict[str, Any], loaded: LoadedImage | None) -> dict[str, Any]:
    """A result row with what decoding its image changed (frames dropped, alpha flattened)
    first among its notes."""
    if loaded is not None and loaded.notes:
        row["notes"] = list(dict.fromkeys([*loaded.notes, *row.get("notes", [])]))
    return row


def is_image_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


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
DRAFT_FORMATS = ("JPEG", "MPO")  # what Pillow can decode at a reduced scale (JPEG's DCT scaling)
STRIP_BYTES = 16 << 20  # modes converted by numpy are converted this many source bytes at a time
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


def _strips(im: Any) -> Iterator[tuple[int, Any]]:
    """(top row, a copy of the rows from there) over the image, STRIP_BYTES of it at a time."""
    w, h = im.size
    rows = max(1, STRIP_BYTES // max(1, w * _PIXEL_BYTES.get(im.mode, 4)))
    for y in range(0, h, rows):
        yield y, im.crop((0, y, w, min(h, y + rows)))


def _to_rgb(im: Any) -> Any:
    """Any Pillow mode -> RGB: 16-bit and float scaled, alpha composited on white. What Pillow
    converts in one step it converts; the rest (16 / 32-bit, alpha) is converted in strips
    into one RGB image, so no full-size intermediate is held beside it."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    wide = mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
    if not alpha and not wide:
        return im.convert("RGB")
    out = Image.new("RGB", im.size)
    lo = hi = 0.0
    if wide and not mode.startswith("I;16"):
        lo, hi = (float(v) for v in im.getextrema())
    for y, strip in _strips(im):
        if wide:
            arr = np.asarray(strip)
            if mode.startswith("I;16"):
                grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
            else:
                f = arr.astype(np.float32)
                if hi > 255 or lo < 0:
                    f = (f - lo) * np.float32(255.0 / max(hi - lo, 1e-12))
                grey = np.clip(f + 0.5, 0, 255).astype(np.uint8)
            part = Image.fromarray(grey, "L").convert("RGB")
        else:
            rgba = strip.convert("RGBA")
            part = Image.new("RGB", rgba.size, (255, 255, 255))
            part.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        out.paste(part, (0, y))
    return out


def _name_of(source: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview, io.IOBase)):
        return "the image"
    return str(source)


def _as_file(source: Any, name: str, what: str = "") -> Any:
    """A path or file object Pillow can open, after the checks a path needs (it exists, is a
    file, is not empty, is a name the system can take)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{name}: empty {what or 'data'} (no bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, io.IOBase) or (hasattr(source, "read") and hasattr(source, "seek")):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"{name}: not an image: give a path, bytes, a PIL image or an H x W x 3 uint8 array "
                         f"(got {type(source).__name__})")
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise ImageError(f"{name!r}: a path cannot contain a NUL character (\\0); is it a file's bytes? "
                         "pass bytes as bytes, not as a path")
    p = Path(text)
    try:
        if not p.exists():
            raise ImageError(f"{name}: {missing_reason(p)}")
        if p.is_dir():
            raise ImageError(f"{name}: is a directory, not an image")
        if p.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    except OSError as exc:  # a name too long for the file system, a component that is a file, ...
        raise ImageError(f"{_short(name)}: cannot use this path ({exc.strerror or exc})") from None
    return str(p)


def _short(name: str, n: int = 120) -> str:
    return name if len(name) <= n else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"


def open_image(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_side: int | None = None,
               name: str | None = None) -> LoadedImage:
    """Open a path, bytes, PIL image or uint8 array as an upright RGB image.

    draft_side: the caller needs no more than this longest side; a JPEG is then decoded at the
    smallest of 1/2, 1/4, 1/8 scale that still has it (several times faster than a full decode).

    name: what messages call the image (an upload's file name) [default: its path, or "the image"].

    max_pixels counts pixels at the bytes per pixel decoding holds (`charged_pixels`): 16-bit
    grey is decoded straight to 8 bits where Pillow can, else converted in strips.

    Raises ImageError for a missing, unreadable, truncated, damaged, empty or oversized image.
    """
    ensure_heif_opener()
    from PIL import Image, ImageOps

    if isinstance(source, LoadedImage):
        return source
    if source is None:
        raise ImageError("no image given (None): give a path, bytes, a PIL image or an H x W x 3 uint8 array")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ImageError(f"an image array must be H x W x 3 (RGB), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ImageError(f"an image array must be uint8, got {arr.dtype}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ImageError(f"the image array has no pixels (shape {arr.shape}): an image needs at least 1 x 1")
        return LoadedImage(_to_rgb(Image.fromarray(np.ascontiguousarray(arr))), "<array>")
    if isinstance(source, Image.Image):
        name = name or getattr(source, "filename", None) or "the PIL image"
        pillow_guard(max_pixels)
        w, h = source.size
        check_pixels(name, w, h, max_pixels, source.mode)
        with pillow_errors(name, max_pixels):  # a lazily opened file is decoded here
            source.load()
            up = ImageOps.exif_transpose(source) or source
            rgb = _to_rgb(up)
        return LoadedImage(rgb, "<image>", _rgb_profile(source.info.get("icc_profile"), source.mode), source.mode)
    if isinstance(source, (bool, int, float)):
        raise ImageError(f"not an image: {source!r} ({type(source).__name__}); give a path, bytes, a PIL image or "
                         "an H x W x 3 uint8 array")

    name = _name_of(source, name)
    fp = _as_file(source, name)
    if not isinstance(fp, str):  # a file object: its bytes, so that the image can be read again
        data = source if isinstance(source, bytes) else fp.getvalue() if fp is not source else _read_all(fp, name)
        fp = io.BytesIO(data)
        keep: Any = data
    else:
        keep = fp
    pillow_guard(max_pixels)
    with pillow_errors(name, max_pixels, _reopener(keep)):
        im = Image.open(fp)
        w, h = im.size
        check_pixels(name, w, h, max_pixels, _decoded_mode(im))
        source_mode, fmt = im.mode, im.format
        icc = _rgb_profile(im.info.get("icc_profile"), source_mode)
        frames = int(getattr(im, "n_frames", 1) or 1)
        drafted = False
        if draft_side and im.format in DRAFT_FORMATS and max(w, h) > 2 * draft_side:
            s = draft_side / max(w, h)
            im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            drafted = im.size != (w, h)  # decoded at 1/2, 1/4 or 1/8: the full size is the header's
        _decode_16_as_8(im)
        im.load()
        if im.size[0] <= 0 or im.size[1] <= 0:
            raise ImageError(f"{name}: image has no pixels ({im.size[0]}x{im.size[1]})")
        orientation = _orientation(im)  # after load: a PNG's EXIF read first would decode it at 16 bits
        full_size = ((h, w) if orientation in (5, 6, 7, 8) else (w, h)) if drafted else None
        rotated = orientation not in (None, 1)
        if rotated:
            im = ImageOps.exif_transpose(im)
        notes = []
        if frames > 1:
            notes.append(f"the first of its {frames} frames was used ({im.format or 'multi-frame'} image)")
        if _has_transparency(im):
            notes.append("transparent pixels were composited on white (the crop has no alpha)")
        rgb = _to_rgb(im)
    return LoadedImage(rgb, name, icc, source_mode, rotated, notes=notes, full_size=full_size,
                       source=keep if full_size is not None else None, max_pixels=max_pixels, format=fmt)


def _read_all(fp: Any, name: str) -> bytes:
    """A file object's bytes from its start, as Pillow reads it (from where it stands if it cannot seek)."""
    try:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fp.seek(0)
        data = fp.read()
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot read the file object ({exc})") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{name}: the file object gives {type(data).__name__}, not bytes: open it in binary mode")
    if len(data) == 0:
        raise ImageError(f"{name}: empty file (no bytes left to read)")
    return bytes(data)


def _reopener(keep: str | bytes) -> Any:
    """A function giving the image file again from its start (a path opened, or its bytes)."""
    if isinstance(keep, str):
        return lambda: open(keep, "rb")  # the caller closes it
    return lambda: io.BytesIO(keep)


def missing_reason(p: Path) -> str:
    """Why a path that does not exist cannot be read: no such file, a link loop, a dangling link."""
    import errno

    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links (it points back to itself); fix or remove the link"
        if p.is_symlink():
            return f"a symbolic link to {os.readlink(p)}, which does not exist"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
    return "no such file"


def _rgb_profile(icc: bytes | None, mode: str) -> bytes | None:
    """The source's ICC profile if it still describes the RGB image we make of it: an RGB
    profile on an RGB(A) or palette image. A CMYK or grey profile would give an RGB crop wrong
    colours; it is dropped (the crop is then read as sRGB)."""
    if not icc or mode not in ("RGB", "RGBA", "RGBX", "RGBa", "P"):
        return None
    return icc if icc[16:20] == b"RGB " else None  # the profile header's colour space


def _has_transparency(im: Any) -> bool:
    """Whether an image has pixels that are not fully opaque (its alpha, or a palette's
    transparent colour)."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        try:
            return im.getchannel("A").getextrema()[0] < 255
        except (ValueError, OSError):
            return True
    return im.mode == "P" and "transparency" in im.info


def _orientation(im: Any) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:
        return None


def image_size(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The upright (EXIF-rotated) size of an image, read from its header only. An image over the
    pixel limit is an ImageError naming its width and height, also one so large that Pillow's own
    decompression-bomb check refuses to open it (its header is then read without that check)."""
    from PIL import Image

    name = str(path)
    fp = _as_file(path, name)
    reopen = _reopener(fp) if isinstance(fp, str) else None
    pillow_guard(max_pixels)
    with pillow_errors(name, max_pixels, reopen):
        try:
            im = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            im = open_header(reopen) if reopen is not None else None
            if im is None:
                raise
        with im:
            w, h = im.size
            check_pixels(name, w, h, max_pixels, _decoded_mode(im))
            if _orientation(im) in (5, 6, 7, 8):
                w, h = h, w
    return w, h


def load_mask(source: Any, size: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, *,
              name: str | None = None) -> np.ndarray:
    """A binary subject mask (H x W bool) from a path, the bytes of an image file, a PIL image or
    an array.

    `size` (W, H) is the image's size: a mask of another size is refused, an empty one too. A
    mask file goes through the images' pixel limit with the images' message (read from its
    header, before decoding); one of exactly the image's size is never over it (the image was not).
    """
    from PIL import Image

    if source is None:
        raise ImageError("no mask given (None): give a path, the bytes of an image file, a PIL image or an array")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.size == 0:
            raise ImageError(f"the mask array has no pixels (shape {arr.shape})")
    else:
        pillow_guard(max_pixels)
        if isinstance(source, Image.Image):
            label = name or f"the mask {getattr(source, 'filename', '') or '(a PIL image)'}".rstrip()
            img, fp = source, None
        else:
            what = name or ("the mask" if isinstance(source, (bytes, bytearray, memoryview, io.IOBase))
                            else f"mask {source}")
            label = what
            fp = _as_file(source, what, "mask")
            img = None
        with pillow_errors(label, max_pixels):
            if img is None:
                img = Image.open(fp)
            w, h = img.size
            if size is None or (w, h) != tuple(size):
                check_pixels(label, w, h, max_pixels, "L")
            if size is not None and (w, h) != tuple(size):
                _wrong_size(w, h, size)
            img.load()
            if img.mode in ("RGBA", "LA", "PA"):
                arr = np.asarray(img.getchannel("A"))
            elif img.mode in ("1", "L", "P", "RGB"):
                arr = np.asarray(img.convert("L"))
            else:  # 16 / 32-bit and the rest: anything above zero is the subject
                arr = np.asarray(img) if img.mode.startswith(("I", "F")) else np.asarray(img.convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ImageError(f"a mask must be a 2-D image, got shape {arr.shape}")
    if arr.dtype == bool or arr.max(initial=0) <= 1:
        mask = arr > 0.5
    elif arr.dtype == np.uint8 or arr.max(initial=0) <= 255:
        mask = arr > 127
    else:  # a 16-bit mask: half its range
        mask = arr > (32767 if arr.max(initial=0) <= 65535 else float(arr.max()) / 2)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        _wrong_size(mask.shape[1], mask.shape[0], size)
    if not mask.any():
        raise ImageError("the subject mask is empty (no foreground pixels)")
    return mask


def _wrong_size(w: int, h: int, size: tuple[int, int]) -> None:
    raise ImageError(f"the mask is {w}x{h} but the image is {size[0]}x{size[1]}; "
                     "a subject mask must have the image's size")
