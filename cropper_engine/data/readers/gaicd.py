"""GAICD (kind ``gaicd``): ``image_crop.json`` (``{NAME: {"bbox": [[x1, y1, x2, y2], ...],
"score": [MOS, ...]}}``) or a folder of the original ``NAME.txt`` files, one ``y1 x1 y2 x2 MOS``
line per crop (note the order). ``split`` ("train" / "test") picks names from
``original_data_split.json`` next to the annotations. GAICD images are rarely at hand: with
``require_images=False`` a record whose image is missing is kept for metric-only use, its
width / height taken as the largest x2 / y2 of its crops (rounded up;
``extra["size_inferred"] = True``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.data.readers.base import _fmt, _four, _is_box_list, _load_json, _Reader
from cropper_engine.errors import AnnotationError
from cropper_engine.imageio import IMAGE_SUFFIXES


def _gaicd_name(r: _Reader, key: str) -> str:
    if os.path.splitext(key)[1].lower() in IMAGE_SUFFIXES:
        return key
    found = r.finder.find(r.images, key, IMAGE_SUFFIXES)
    return found.name if found is not None else key + ".jpg"


def _gaicd_example(r: _Reader, name: str, raws: list[Any], scores: list[Any] | None,
                   fmt: str = "xyxy") -> None:
    path = r.image_path(name)
    infer = None
    if not r.require_images:
        vals = [v for v in (_four(b) for b in raws) if v is not None and all(map(math.isfinite, v))]
        if fmt == "yxyx":
            vals = [[v[1], v[0], v[3], v[2]] for v in vals]
        if vals:
            w = math.ceil(max(v[2] for v in vals))
            h = math.ceil(max(v[3] for v in vals))
            infer = (w, h) if w > 0 and h > 0 else None
    size = r.size(name, path, infer=infer)
    if size is None:
        return
    boxes, kept = r.boxes(name, raws, *size, fmt=fmt, scores=scores)
    if not boxes:
        r.skip(f"{name}: no valid crop left; skipped")
        return
    extra = {"size_inferred": True} if infer is not None and size == infer and not path.is_file() else {}
    r.add(Example(name, str(path), size[0], size[1], boxes, scores=kept, extra=extra))


def _read_gaicd_json(r: _Reader, path: Path) -> None:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected {{name: {{'bbox': [...], 'score': [...]}}}}, "
                              f"got a JSON {type(data).__name__}")
    for key, rec in data.items():
        name = _gaicd_name(r, str(key))
        if not r.wanted(name, os.path.splitext(name)[0]):
            continue
        if r.full():
            break
        if not isinstance(rec, dict) or not _is_box_list(rec.get("bbox")) or not rec.get("bbox"):
            r.skip(f"{name}: expected {{'bbox': [[x1, y1, x2, y2], ...], 'score': [...]}}; skipped")
            continue
        raws = rec["bbox"]
        scores = rec.get("score")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(raws)):
            r.skip(f"{name}: {len(raws)} boxes but {_fmt(scores)[:40]} scores; skipped")
            continue
        _gaicd_example(r, name, raws, scores)


def _read_gaicd_txt(r: _Reader, folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt")
    if not files:
        raise AnnotationError(f"{folder}: no GAICD .txt annotation files (or image_crop.json) in it")
    for f in files:
        name = _gaicd_name(r, f.stem)
        if not r.wanted(name, f.stem):
            continue
        if r.full():
            break
        raws: list[Any] = []
        scores: list[Any] = []
        try:
            lines = f.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            r.skip(f"{f.name}: cannot read ({exc}); skipped")
            continue
        for lineno, line in enumerate(lines, 1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            try:
                vals = [float(p) for p in parts]
            except ValueError:
                vals = []
            if len(vals) != 5:
                r.drop(f"{f.name}:{lineno}: expected 'y1 x1 y2 x2 MOS', got {line.strip()!r}; skipped")
                continue
            raws.append(vals[:4])
            scores.append(vals[4])
        if not raws:
            r.skip(f"{f.name}: no crop lines; skipped")
            continue
        _gaicd_example(r, name, raws, scores, fmt="yxyx")


def read(r: _Reader, ann: Path) -> None:
    """The ``gaicd`` kind: `ann` is image_crop.json, or a folder holding it or the .txt files."""
    if ann.is_dir():
        if (ann / "image_crop.json").is_file():
            _read_gaicd_json(r, ann / "image_crop.json")
        else:
            _read_gaicd_txt(r, ann)
    else:
        _read_gaicd_json(r, ann)
