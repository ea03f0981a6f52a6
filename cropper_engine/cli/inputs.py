"""Reading the commands' inputs, and checking them before any work: --ratio, --size,
--subject, and a subject mask, point or box against the images' sizes.
"""

from __future__ import annotations

from typing import Any


def parse_ratios(text: str | None) -> list[Any]:
    """--ratio, read as the library, manifests and the server read a ratio (types.parse_ratios)."""
    from cropper_engine.types import parse_ratios as parse

    return parse(text, "--ratio")


def parse_size(text: str | None) -> tuple[int, int] | None:
    from cropper_engine.errors import InputError

    if not text:
        return None
    a, sep, b = text.lower().partition("x")
    try:
        w, h = int(a), int(b)
    except ValueError:
        raise InputError(f"bad --size {text!r}: write it as WxH in pixels, e.g. 1080x1080") from None
    if not sep or w <= 0 or h <= 0:
        raise InputError(f"bad --size {text!r}: write it as WxH in pixels, e.g. 1080x1080")
    return w, h


def precheck_sizes(sources: tuple[str, ...], out_dir: str | None = None) -> list[tuple[str, int, int]]:
    """(path, width, height) of the images to check a subject option against before any work:
    the explicit image files, else the first readable image of the folders and manifests that
    the option applies to (headers only; the others are checked one by one as they are cropped)."""
    from pathlib import Path

    from cropper_engine.batch import iter_inputs
    from cropper_engine.imageio import image_size, is_image_path

    def is_file(src: str) -> bool:
        try:
            return Path(src).is_file()
        except (OSError, ValueError):  # a name the file system refuses: named when its turn comes
            return False

    files = [src for src in sources if is_file(src) and is_image_path(src)]
    if files:
        sizes = []
        for src in files:
            try:
                sizes.append((src, *image_size(src)))
            except Exception:  # ImageError, Pillow's bomb error...: named when its turn comes; the others go on
                continue
        return sizes
    for item in iter_inputs(sources, lambda _m: None, out_dir):
        if item.mask is not None or item.subject is not None:  # a manifest line's own subject
            continue
        try:
            return [(item.path, *image_size(item.path))]
        except Exception:  # named when its turn comes
            continue
    return []


def precheck_mask(mask: str, sources: tuple[str, ...], out_dir: str | None = None,
                  max_pixels: int | None = None) -> None:
    """Refuse a mask that does not fit the images (see precheck_sizes) or the pixel limit, before
    any work starts."""
    from cropper_engine.imageio import DEFAULT_MAX_PIXELS, load_mask

    m = load_mask(mask, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    for src, w, h in precheck_sizes(sources, out_dir):
        if (m.shape[1], m.shape[0]) != (w, h):
            from cropper_engine.errors import InputError

            raise InputError(f"the mask {mask} is {m.shape[1]}x{m.shape[0]} but {src} is {w}x{h}; "
                             "a subject mask must have its image's size")


def parse_subject_option(text: str | None, mask: str | None, keep_faces: bool | None) -> Any:
    """The parsed --subject (or None); refuses it beside --mask, and a detector this machine lacks."""
    from cropper_engine.engine.subject import SubjectSpec, require_detectors
    from cropper_engine.errors import InputError

    if text is not None and mask:
        raise InputError("--mask and --subject both name the subject: give one (--subject MASK.png works too)")
    spec = SubjectSpec.parse(text) if text is not None else None
    if spec is not None or keep_faces:
        require_detectors(spec, keep_faces)
    return spec


def precheck_subject(spec: Any, sources: tuple[str, ...], out_dir: str | None = None,
                     max_pixels: int | None = None) -> None:
    """Refuse a subject mask, focal point or box that does not fit the images (see
    precheck_sizes), before any work starts."""
    if spec is None:
        return
    if spec.kind == "mask":
        precheck_mask(spec.path, sources, out_dir, max_pixels)
    elif spec.kind in ("point", "box"):
        for _src, w, h in precheck_sizes(sources, out_dir):
            spec.check(w, h)

