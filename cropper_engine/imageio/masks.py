"""Subject masks: a binary H x W mask from a path, an image file's bytes, a PIL image or an
array, under the images' pixel limit and of the image's size.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from cropper_engine.errors import ImageError
from cropper_engine.imageio.limits import DEFAULT_MAX_PIXELS, check_pixels, pillow_errors, pillow_guard
from cropper_engine.imageio.sources import _as_file


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

