"""Reading images safely: size limits before decoding, EXIF rotation, every mode to RGB.

Every failure becomes an `ImageError` whose message names the file and the problem, so a
batch can count and skip a bad image and go on.

Decoding lives here (`open_image`, `LoadedImage`, `image_size`, every mode to RGB); beside it:
heif.py (HEIC and AVIF, our HEIF opener registered with Pillow on import), limits.py (the
pixel limit, headers, Pillow's failures as ImageErrors), sources.py (paths, bytes and file
objects), masks.py (`load_mask`). Every name the module had is importable from here.
"""

from __future__ import annotations

import io
import math
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from cropper_engine.errors import ImageError
from cropper_engine.imageio.heif import (  # noqa: F401  (re-exported: the names imageio.py had)
    _HEIF_LOCK,
    AVIF_BRANDS,
    AVIF_SUFFIXES,
    HEIF_BRANDS,
    HEIF_SUFFIXES,
    NO_AVIF,
    NO_HEIC,
    _heif_accept,
    _heif_open,
    _heif_save,
    _register_heif,
    ensure_heif_opener,
    ftyp_brands,
    heif_plugin,
    image_kind,
    missing_decoder,
)
from cropper_engine.imageio.limits import (  # noqa: F401  (re-exported: the names imageio.py had)
    _DIRECT_8BIT,
    _GUARD_LOCK,
    _PIL_MODULES,
    _PIXEL_BYTES,
    BASE_PIXEL_BYTES,
    DEFAULT_MAX_PIXELS,
    PILLOW_DECODE_ERRORS,
    RAISE_HINT,
    RGB_PIXEL_BYTES,
    _decode_16_as_8,
    _decoded_mode,
    _depth_words,
    _direct_tiles,
    charged_pixels,
    check_pixels,
    format_pixels,
    held_bytes_per_pixel,
    open_header,
    pillow_errors,
    pillow_guard,
    pixel_problem,
    probe_pixels,
    too_many_pixels,
)
from cropper_engine.imageio.masks import _wrong_size, load_mask  # noqa: F401  (re-exported)
from cropper_engine.imageio.sources import (  # noqa: F401  (re-exported: the names imageio.py had)
    IMAGE_SUFFIXES,
    _as_file,
    _name_of,
    _read_all,
    _reopener,
    _short,
    is_image_path,
    missing_reason,
)


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


def with_image_notes(row: dict[str, Any], loaded: LoadedImage | None) -> dict[str, Any]:
    """A result row with what decoding its image changed (frames dropped, alpha flattened)
    first among its notes."""
    if loaded is not None and loaded.notes:
        row["notes"] = list(dict.fromkeys([*loaded.notes, *row.get("notes", [])]))
    return row


DRAFT_FORMATS = ("JPEG", "MPO")  # what Pillow can decode at a reduced scale (JPEG's DCT scaling)
STRIP_BYTES = 16 << 20  # modes converted by numpy are converted this many source bytes at a time


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

