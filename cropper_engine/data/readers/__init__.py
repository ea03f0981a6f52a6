"""Dataset readers: FCDB, GAICD, SACD and our own JSONL, all giving `Example` objects.

One entry point, `read_dataset(kind, annotations, images=None, split=..., require_images=...,
limit=...)`, returns a `Dataset`: the examples plus one human message per skipped record or box.
Boxes come out in pixels of the upright (EXIF-rotated) image as `Box(x1, y1, x2, y2)`; image
paths are absolute. `images` defaults to the folder `images` next to the annotations.

Formats (kind), each described in its reader's docstring (`READERS` maps a kind to its reader's
`read`; `KINDS` lists them):

- ``fcdb``: the official Flickr Cropping Dataset JSON, or JSONL (fcdb.py);
- ``gaicd``: ``image_crop.json`` or a folder of the original ``NAME.txt`` files (gaicd.py);
- ``sacd``: a root with ``images/``, ``masks/`` and ``annotations/*.json`` (sacd.py);
- ``jsonl``: our own plain format, one JSON object a line (jsonl.py).

Box checks (all formats): base.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cropper_engine.data.readers import fcdb, gaicd, jsonl, sacd
from cropper_engine.data.readers.base import Dataset, _load_json, _Reader
from cropper_engine.errors import AnnotationError, InputError

# kind -> its reader: read(r, annotations) fills the _Reader `r`
READERS: dict[str, Callable[[_Reader, Path], None]] = {
    "fcdb": fcdb.read,
    "gaicd": gaicd.read,
    "sacd": sacd.read,
    "jsonl": jsonl.read,
}
KINDS = tuple(READERS)
SPLIT_FILES = ("original_data_split.json", "split.json", "splits.json")


def _split_filter(ann: Path, split: str) -> Callable[[str], bool]:
    folder = ann if ann.is_dir() else ann.parent
    candidates = [d / n for d in (folder, folder.parent) for n in SPLIT_FILES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise AnnotationError(f"split {split!r} asked for, but no split file "
                              f"({' / '.join(SPLIT_FILES)}) next to {ann}")
    data = _load_json(found)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise AnnotationError(f"{found}: expected {{split name: [image names]}}")
    if split not in data:
        raise InputError(f"unknown split {split!r} in {found}; choose one of: {', '.join(data)}")
    names = {str(n) for n in data[split]}
    names |= {os.path.splitext(n)[0] for n in names}
    return names.__contains__


def read_dataset(kind: str, annotations: str | os.PathLike[str], images: str | os.PathLike[str] | None = None,
                 *, split: str | None = None, require_images: bool = True,
                 limit: int | None = None) -> Dataset:
    """Read a cropping dataset into `Example`s (see the package's docstring and each reader's for the formats).

    kind: "fcdb", "gaicd", "sacd" or "jsonl". images: the image folder (default: `images`
    next to the annotations). split: a split name from a split file next to the annotations.
    require_images: skip (and list) records whose image is missing; False keeps them where a
    size is known (JSONL width/height, GAICD crop extents). limit: stop after this many examples.
    Raises InputError for an unknown kind / split or a bad limit, AnnotationError for a missing
    or unreadable annotation file; bad records and boxes are listed in `Dataset.skipped`.
    """
    k = str(kind).strip().lower()
    if k not in KINDS:
        raise InputError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be a non-negative integer, got {limit!r}")
    ann = Path(annotations).expanduser()
    if not ann.exists():
        raise AnnotationError(f"annotation file {ann} not found")
    ann = Path(os.path.abspath(ann))
    keep = _split_filter(ann, split) if split is not None else None

    if k == "sacd":
        root, _ = sacd._sacd_layout(ann)
        default_images = root / "images"
    else:
        base = ann.parent
        default_images = base / "images"
        if ann.is_dir() and (ann / "images").is_dir():
            default_images = ann / "images"
        if not default_images.is_dir():
            default_images = base
    if images is not None:
        img_dir = Path(os.path.abspath(Path(images).expanduser()))
        if require_images and not img_dir.is_dir():
            raise InputError(f"image folder {img_dir} not found")
    else:
        img_dir = default_images

    r = _Reader(k, ann, img_dir, require_images, limit, keep)
    READERS[k](r, ann)
    return r.dataset()


__all__ = ["KINDS", "READERS", "Dataset", "read_dataset"]
