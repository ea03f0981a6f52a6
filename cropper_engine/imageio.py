"""Reading images safely: size limits before decoding, EXIF rotation, every mode to RGB.

Every failure becomes an `ImageError` whose message names the file and the problem, so a
batch can count and skip a bad image and go on.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import ImageError

# Pillow's own bomb check warns at 89M pixels; we refuse above this many, before decoding.
DEFAULT_MAX_PIXELS = 120_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class LoadedImage:
    """An RGB image as the user sees it (EXIF orientation applied)."""

    image: Any  # PIL.Image.Image in mode RGB
    path: str
    icc_profile: bytes | None = None
    source_mode: str = "RGB"
    rotated: bool = False
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this decoded image in caches
    notes: list[str] = field(default_factory=list)  # what decoding changed: frames dropped, alpha flattened

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


RAISE_HINT = "if the image is genuine, raise the limit: --max-pixels N (crop, serve) or CROPPER_MAX_PIXELS"
_GUARD_LOCK = threading.Lock()


def format_pixels(n: int) -> str:
    """92160000 -> '92.16 MP', 120000000 -> '120 MP', 4096 -> '4,096 pixels'."""
    return f"{n / 1e6:.4g} MP" if n >= 1_000_000 else f"{n:,} pixels"


def too_many_pixels(name: str, w: int, h: int, max_pixels: int) -> str:
    return (f"{name}: {w}x{h} = {format_pixels(w * h)}, more than the limit of {format_pixels(max_pixels)} "
            f"(a decompression bomb?); {RAISE_HINT}")


def pillow_guard(max_pixels: int) -> None:
    """Pillow refuses images over its own MAX_IMAGE_PIXELS (89.5 MP, an error at twice that)
    inside Image.open, before we see the size: it is raised to our limit, which we check
    ourselves before decoding, and its warning (our limit is the one that counts) silenced.
    The guard only ever goes up, so concurrent callers with other limits stay safe."""
    from PIL import Image

    with _GUARD_LOCK:
        cur = Image.MAX_IMAGE_PIXELS
        if cur is not None and cur < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        if not getattr(pillow_guard, "silenced", False):
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            pillow_guard.silenced = True  # type: ignore[attr-defined]


def with_image_notes(row: dict[str, Any], loaded: LoadedImage | None) -> dict[str, Any]:
    """A result row with what decoding its image changed (frames dropped, alpha flattened)
    first among its notes."""
    if loaded is not None and loaded.notes:
        row["notes"] = list(dict.fromkeys([*loaded.notes, *row.get("notes", [])]))
    return row


def is_image_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_rgb(im: Any) -> Any:
    """Any Pillow mode -> RGB: 16-bit and float scaled, alpha composited on white."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            hi = float(arr.max()) if arr.size else 0.0
            lo = float(arr.min()) if arr.size else 0.0
            if hi > 255 or lo < 0:
                arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_side: int | None = None,
               name: str | None = None) -> LoadedImage:
    """Open a path, bytes, PIL image or uint8 array as an upright RGB image.

    draft_side: the caller needs no more than this longest side; a JPEG is then decoded at the
    smallest of 1/2, 1/4, 1/8 scale that still has it (several times faster than a full decode).

    name: what messages call the image (an upload's file name) [default: its path, or "the image"].

    Raises ImageError for a missing, unreadable, truncated or oversized image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ImageError(f"an image array must be H x W x 3 (RGB), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ImageError(f"an image array must be uint8, got {arr.dtype}")
        return LoadedImage(_to_rgb(Image.fromarray(arr)), "<array>")
    if isinstance(source, Image.Image):
        return LoadedImage(_to_rgb(ImageOps.exif_transpose(source) or source), "<image>",
                           _rgb_profile(source.info.get("icc_profile"), source.mode), source.mode)

    if name is None:
        name = "the image" if isinstance(source, (bytes, bytearray, io.IOBase)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        fp: Any = io.BytesIO(source)
    elif isinstance(source, io.IOBase):
        fp = source
    else:
        p = Path(source)
        if not p.exists():
            raise ImageError(f"{name}: {missing_reason(p)}")
        if p.is_dir():
            raise ImageError(f"{name}: is a directory, not an image")
        if p.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
        fp = str(p)
    pillow_guard(max_pixels)
    try:
        im = Image.open(fp)
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(too_many_pixels(name, w, h, max_pixels))
        source_mode = im.mode
        icc = _rgb_profile(im.info.get("icc_profile"), source_mode)
        frames = int(getattr(im, "n_frames", 1) or 1)
        if draft_side and im.format == "JPEG" and max(w, h) > 2 * draft_side:
            s = draft_side / max(w, h)
            im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        im.load()
        rotated = _orientation(im) not in (None, 1)
        if rotated:
            im = ImageOps.exif_transpose(im)
        notes = []
        if frames > 1:
            notes.append(f"the first of its {frames} frames was used ({im.format or 'multi-frame'} image)")
        if _has_transparency(im):
            notes.append("transparent pixels were composited on white (the crop has no alpha)")
        rgb = _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        n = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{format_pixels(int(n.group(1)))}, " if n else ""
        raise ImageError(f"{name}: {size}more than the limit of {format_pixels(max_pixels)} (a decompression "
                         f"bomb?); {RAISE_HINT}") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ImageError(f"{name}: truncated file ({msg})") from None
        raise ImageError(f"{name}: cannot read image ({msg})") from None
    except (ValueError, SyntaxError, EOFError) as exc:  # Pillow raises these on broken headers
        raise ImageError(f"{name}: corrupt image ({exc})") from None
    return LoadedImage(rgb, name, icc, source_mode, rotated, notes=notes)


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
    """The upright (EXIF-rotated) size of an image, read from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if _orientation(im) in (5, 6, 7, 8):
                w, h = h, w
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image ({exc})") from None
    if w * h > max_pixels:
        raise ImageError(too_many_pixels(str(path), w, h, max_pixels))
    return w, h


def load_mask(source: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary subject mask (H x W bool) from a path, PIL image or array.

    `size` (W, H) is the image's size: a mask of another size is refused, an empty one too.
    """
    from PIL import Image

    if isinstance(source, np.ndarray):
        arr = source
    else:
        if isinstance(source, (str, os.PathLike)):
            try:
                img = Image.open(source)
                img.load()
            except FileNotFoundError:
                raise ImageError(f"mask {source}: no such file") from None
            except OSError as exc:
                raise ImageError(f"mask {source}: cannot read ({exc})") from None
        else:
            img = source
        if img.mode in ("RGBA", "LA"):
            arr = np.asarray(img)[..., -1]
        else:
            arr = np.asarray(img.convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ImageError(f"a mask must be a 2-D image, got shape {arr.shape}")
    mask = arr > (0.5 if arr.dtype == bool or arr.max(initial=0) <= 1 else 127)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ImageError(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}; "
            "a subject mask must have the image's size"
        )
    if not mask.any():
        raise ImageError("the subject mask is empty (no foreground pixels)")
    return mask
