"""Our own plain format, JSONL (kind ``jsonl``; FCDB's JSONL is read the same way), one JSON
object a line::

    {"image": "a/b.jpg", "crops": [[x1, y1, x2, y2], ...], "scores": [4.2, ...],
     "mask": "masks/b.png", "width": 800, "height": 600, "id": "b"}

``image`` is relative to the images folder (default: ``images`` next to the file, else the
file's own folder) or absolute; ``crops`` (or one ``crop``) are pixel boxes of the upright
image; ``scores`` (optional) one MOS per crop; ``mask`` (optional) a subject mask, relative
like ``image``; ``width`` / ``height`` (optional) are read from the image header when absent
and must match it when given; ``id`` (optional) defaults to ``image`` as written. Blank lines
are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cropper_engine.data.example import Example
from cropper_engine.data.readers.base import _fmt, _is_box_list, _Reader
from cropper_engine.errors import AnnotationError


def _read_jsonl_lines(r: _Reader, path: Path, lines: list[str], fcdb: bool = False) -> None:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            r.skip(f"{where}: not valid JSON ({exc.msg}); skipped")
            continue
        if not isinstance(rec, dict):
            r.skip(f"{where}: expected a JSON object, got {_fmt(rec)[:80]}; skipped")
            continue
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            r.skip(f"{where}: no \"image\" path; skipped")
            continue
        rid = rec.get("id")
        ex_id = str(rid) if rid is not None and not fcdb else (
            os.path.basename(image) if fcdb or os.path.isabs(image) else image)
        label = f"{where} ({ex_id})"
        if not r.wanted(ex_id, os.path.basename(image), os.path.splitext(os.path.basename(image))[0]):
            continue
        merge = r.by_id.get(ex_id) if fcdb else None
        if merge is None and r.full():
            break
        # crops
        if "crops" in rec:
            raws = rec["crops"]
            if not _is_box_list(raws) or not raws:
                r.skip(f"{label}: \"crops\" must be a non-empty list of [x1, y1, x2, y2]; skipped")
                continue
        elif "crop" in rec:
            raws = [rec["crop"]]
        else:
            r.skip(f"{label}: no {'crop' if fcdb else 'crops'}; skipped")
            continue
        scores = rec.get("scores")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(raws)):
            r.skip(f"{label}: \"scores\" must be a list with one MOS per crop "
                   f"({len(raws)} crops); skipped")
            continue
        declared = r.declared_size(label, rec)
        if declared is False:
            continue
        path_ = r.image_path(image)
        if merge is not None:
            size: tuple[int, int] | None = (merge.width, merge.height)
        else:
            size = r.size(label, path_, declared=declared or None)  # type: ignore[arg-type]
        if size is None:
            continue
        boxes, kept = r.boxes(label, raws, *size, scores=scores)
        if not boxes:
            r.skip(f"{label}: no valid crop left; skipped")
            continue
        if merge is not None:
            merge.crops.extend(boxes)
            continue
        mask_path = None
        mask = rec.get("mask")
        if mask is not None:
            if not isinstance(mask, str) or not mask.strip():
                r.skip(f"{label}: \"mask\" must be a path; skipped")
                continue
            mp = r.image_path(mask)
            if not mp.is_file():
                alt = Path(os.path.abspath(path.parent / mask))
                mp = alt if alt.is_file() else mp
            if r.require_images and not mp.is_file():
                r.skip(f"{label}: mask file {mp} not found; skipped")
                continue
            mask_path = str(mp)
        mask_box = None
        if rec.get("mask_box") is not None:
            mask_box = r.box(label, "mask_box", rec["mask_box"], *size)
        r.add(Example(ex_id, str(path_), size[0], size[1], boxes, scores=kept,
                      mask_path=mask_path, mask_box=mask_box))


def _read_jsonl(r: _Reader, path: Path) -> None:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None
    _read_jsonl_lines(r, path, lines)


def read(r: _Reader, ann: Path) -> None:
    """The ``jsonl`` kind: `ann` is the .jsonl file."""
    if ann.is_dir():
        raise AnnotationError(f"{ann} is a folder; give the .jsonl file")
    _read_jsonl(r, ann)
