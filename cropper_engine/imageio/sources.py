"""What an image is read from: a path checked before Pillow opens it (it exists, is a file, is
not empty, is a name the system takes), bytes or a file object, and the file again from its
start; which names are images.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from cropper_engine.errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".hif",
                  ".avif"}


def is_image_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


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

