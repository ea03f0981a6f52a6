"""SACD (kind ``sacd``): a root with ``images/``, ``masks/`` and ``annotations/*.json`` (pass the
root, the annotations folder or one json file). Each json holds one record (image named by an
"image" / "image_name" / "name" / "file_name" key, or after the json file), a list of records
or a ``{NAME: record}`` map. A record has ``best_box`` and ``crop_box`` ([x1, y1, x2, y2];
crop_box may also be a list of boxes) and ``mask_box`` ([x, y, w, h]). Crops: best_box first,
then crop_box where it differs. The mask is ``masks/<stem>.png`` (or any file of that stem).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.data.readers.base import _four, _is_box_list, _load_json, _Reader
from cropper_engine.errors import AnnotationError
from cropper_engine.imageio import IMAGE_SUFFIXES

SACD_NAME_KEYS = ("image", "image_name", "name", "file_name", "filename", "img")
MASK_KEYS = ("mask", "mask_name", "mask_path")


def _sacd_records(r: _Reader, f: Path) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(image name or None, record) pairs of one annotation json."""
    try:
        data = _load_json(f)
    except AnnotationError as exc:
        r.skip(f"{exc}; skipped")
        return
    box_keys = ("best_box", "crop_box", "mask_box")
    if isinstance(data, list):
        for i, rec in enumerate(data):
            if isinstance(rec, dict):
                yield None, rec
            else:
                r.skip(f"{f.name} record {i + 1}: expected a JSON object; skipped")
    elif isinstance(data, dict) and not any(k in data for k in box_keys) and data and all(
            isinstance(v, dict) for v in data.values()):
        for k, rec in data.items():
            yield str(k), rec
    elif isinstance(data, dict):
        yield None, data
    else:
        r.skip(f"{f.name}: expected a JSON object or list of objects; skipped")


def _read_sacd(r: _Reader, files: list[Path], masks: Path) -> None:
    for f in files:
        single = None
        for key, rec in _sacd_records(r, f):
            if r.full():
                return
            name = key
            for k in SACD_NAME_KEYS:
                if name is None and isinstance(rec.get(k), str) and rec[k].strip():
                    name = rec[k]
            if name is None:
                if single is not None:
                    r.skip(f"{f.name}: several records without an image name; skipped")
                    continue
                single = f.stem
                found = r.finder.find(r.images, f.stem, IMAGE_SUFFIXES)
                name = found.name if found is not None else f.stem + ".jpg"
            elif not os.path.splitext(name)[1]:
                found = r.finder.find(r.images, name, IMAGE_SUFFIXES)
                name = found.name if found is not None else name + ".jpg"
            stem = os.path.splitext(os.path.basename(name))[0]
            ex_id = name if not os.path.isabs(name) else os.path.basename(name)
            if not r.wanted(ex_id, os.path.basename(name), stem):
                continue
            label = ex_id
            raws: list[Any] = []
            best = rec.get("best_box")
            if best is not None:
                raws.append(best)
            crop = rec.get("crop_box")
            for c in (crop if _is_box_list(crop) and crop else [crop] if crop is not None else []):
                if _four(c) is None or _four(c) != _four(best):
                    raws.append(c)
            if not raws:
                r.skip(f"{label} ({f.name}): no best_box or crop_box; skipped")
                continue
            declared = r.declared_size(label, rec)
            if declared is False:
                continue
            path = r.image_path(name)
            size = r.size(label, path, declared=declared or None)  # type: ignore[arg-type]
            if size is None:
                continue
            boxes, _ = r.boxes(label, raws, *size)
            if not boxes:
                r.skip(f"{label}: no valid crop left; skipped")
                continue
            mask_path = None
            for k in MASK_KEYS:
                if isinstance(rec.get(k), str) and rec[k].strip():
                    mp = Path(rec[k])
                    mp = mp if mp.is_absolute() else masks / mp
                    mask_path = Path(os.path.abspath(mp))
                    break
            if mask_path is None:
                png = masks / f"{stem}.png"
                mask_path = png if png.is_file() else r.finder.find(masks, stem)
                if mask_path is not None:
                    mask_path = Path(os.path.abspath(mask_path))
            if mask_path is None or not mask_path.is_file():
                if r.require_images:
                    where = mask_path if mask_path is not None else masks / f"{stem}.png"
                    r.skip(f"{label}: mask file {where} not found; skipped")
                    continue
                mask_path = None
            mask_box = None
            if rec.get("mask_box") is not None:
                mask_box = r.box(label, "mask_box", rec["mask_box"], *size, fmt="xywh")
            r.add(Example(ex_id, str(path), size[0], size[1], boxes,
                          mask_path=str(mask_path) if mask_path else None, mask_box=mask_box))


def _sacd_layout(p: Path) -> tuple[Path, list[Path]]:
    """(dataset root, annotation files) from the root, the annotations folder or one file."""
    if p.is_dir():
        if (p / "annotations").is_dir():
            root, folder = p, p / "annotations"
        else:
            root, folder = p.parent, p
        files = sorted(folder.glob("*.json"))
        if not files:
            raise AnnotationError(f"{folder}: no SACD annotation .json files in it")
        return root, files
    root = p.parent.parent if p.parent.name == "annotations" else p.parent
    return root, [p]


def read(r: _Reader, ann: Path) -> None:
    """The ``sacd`` kind: `ann` is the root, the annotations folder or one json file; the masks
    are in the root's ``masks/``."""
    root, files = _sacd_layout(ann)
    _read_sacd(r, files, root / "masks")
