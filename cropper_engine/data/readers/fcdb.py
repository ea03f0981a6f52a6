"""FCDB (kind ``fcdb``): the official Flickr Cropping Dataset JSON (a list of
``{"url": ".../NAME.jpg", "flickr_photo_id": ..., "crop": [x, y, w, h]}``; the image is the
url's base name) or JSONL, one ``{"image", "width", "height", "crop": [x1, y1, x2, y2]}`` a
line (read as in jsonl.py); which one is told from the content. Records of the same image are
merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.data.readers.base import _fmt, _four, _Reader
from cropper_engine.data.readers.jsonl import _read_jsonl_lines
from cropper_engine.errors import AnnotationError


def _read_fcdb(r: _Reader, path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path}: not valid JSON ({exc})") from None
        _read_fcdb_official(r, records)
    else:
        _read_jsonl_lines(r, path, text.splitlines(), fcdb=True)


def _read_fcdb_official(r: _Reader, records: list[Any]) -> None:
    for i, rec in enumerate(records):
        where = f"record {i + 1}"
        if not isinstance(rec, dict) or not isinstance(rec.get("url"), str) or "crop" not in rec:
            r.skip(f"{r.source.name} {where}: expected {{'url', 'crop': [x, y, w, h]}}, "
                   f"got {_fmt(rec)[:120]}; skipped")
            continue
        name = rec["url"].rstrip("/").rsplit("/", 1)[-1]
        if not name:
            r.skip(f"{r.source.name} {where}: url {rec['url']!r} has no file name; skipped")
            continue
        if not r.wanted(name, os.path.splitext(name)[0]):
            continue
        merge = r.by_id.get(name)
        if merge is None and r.full():
            break
        if _four(rec["crop"]) is None:
            r.skip(f"{name}: crop {_fmt(rec['crop'])} is not 4 numbers [x, y, w, h]; skipped")
            continue
        path = r.image_path(name)
        if merge is not None:
            size: tuple[int, int] | None = (merge.width, merge.height)
        else:
            size = r.size(name, path)
        if size is None:
            continue
        boxes, _ = r.boxes(name, [rec["crop"]], *size, fmt="xywh")
        if not boxes:
            r.skip(f"{name}: no valid crop left; skipped")
            continue
        if merge is not None:
            merge.crops.extend(boxes)
            continue
        extra = {"flickr_photo_id": rec["flickr_photo_id"]} if "flickr_photo_id" in rec else {}
        r.add(Example(name, str(path), size[0], size[1], boxes, extra=extra))


def read(r: _Reader, ann: Path) -> None:
    """The ``fcdb`` kind: `ann` is the .json or .jsonl file."""
    if ann.is_dir():
        raise AnnotationError(f"{ann} is a folder; FCDB needs its .json or .jsonl file")
    _read_fcdb(r, ann)
