"""Dataset readers: FCDB, GAICD, SACD and our own JSONL, all giving `Example` objects.

One entry point, `read_dataset(kind, annotations, images=None, split=..., require_images=...,
limit=...)`, returns a `Dataset`: the examples plus one human message per skipped record or box.
Boxes come out in pixels of the upright (EXIF-rotated) image as `Box(x1, y1, x2, y2)`; image
paths are absolute. `images` defaults to the folder `images` next to the annotations.

Formats (kind):

- ``fcdb``: the official Flickr Cropping Dataset JSON (a list of
  ``{"url": ".../NAME.jpg", "flickr_photo_id": ..., "crop": [x, y, w, h]}``; the image is the
  url's base name) or JSONL, one ``{"image", "width", "height", "crop": [x1, y1, x2, y2]}`` a
  line; which one is told from the content. Records of the same image are merged.
- ``gaicd``: ``image_crop.json`` (``{NAME: {"bbox": [[x1, y1, x2, y2], ...], "score": [MOS, ...]}}``)
  or a folder of the original ``NAME.txt`` files, one ``y1 x1 y2 x2 MOS`` line per crop (note the
  order). ``split`` ("train" / "test") picks names from ``original_data_split.json`` next to
  the annotations. GAICD images are rarely at hand: with ``require_images=False`` a record
  whose image is missing is kept for metric-only use, its width / height taken as the largest
  x2 / y2 of its crops (rounded up; ``extra["size_inferred"] = True``).
- ``sacd``: a root with ``images/``, ``masks/`` and ``annotations/*.json`` (pass the root, the
  annotations folder or one json file). Each json holds one record (image named by an
  "image" / "image_name" / "name" / "file_name" key, or after the json file), a list of records
  or a ``{NAME: record}`` map. A record has ``best_box`` and ``crop_box`` ([x1, y1, x2, y2];
  crop_box may also be a list of boxes) and ``mask_box`` ([x, y, w, h]). Crops: best_box first,
  then crop_box where it differs. The mask is ``masks/<stem>.png`` (or any file of that stem).
- ``jsonl`` (our own plain format), one JSON object a line::

      {"image": "a/b.jpg", "crops": [[x1, y1, x2, y2], ...], "scores": [4.2, ...],
       "mask": "masks/b.png", "width": 800, "height": 600, "id": "b"}

  ``image`` is relative to the images folder (default: ``images`` next to the file, else the
  file's own folder) or absolute; ``crops`` (or one ``crop``) are pixel boxes of the upright
  image; ``scores`` (optional) one MOS per crop; ``mask`` (optional) a subject mask, relative
  like ``image``; ``width`` / ``height`` (optional) are read from the image header when absent
  and must match it when given; ``id`` (optional) defaults to ``image`` as written. Blank lines
  are ignored.

Box checks (all formats): a box that overshoots the image by at most 2% of the side (or 2 px)
is clamped silently; one that overshoots more but lies mostly (>= 50%) inside is clamped with a
note in `Dataset.notes`; non-finite, degenerate (zero or negative size) or mostly-outside boxes
are dropped with a message, and a record with no valid box left is skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropper_engine.data.example import Example
from cropper_engine.errors import AnnotationError, ImageError, InputError
from cropper_engine.imageio import IMAGE_SUFFIXES, image_size
from cropper_engine.types import Box

KINDS = ("fcdb", "gaicd", "sacd", "jsonl")
SPLIT_FILES = ("original_data_split.json", "split.json", "splits.json")
SACD_NAME_KEYS = ("image", "image_name", "name", "file_name", "filename", "img")
MASK_KEYS = ("mask", "mask_name", "mask_path")
# A box may overshoot the image by this share of the side (or _TOL_PX) and is clamped silently.
_TOL_FRAC = 0.02
_TOL_PX = 2.0
_MIN_INSIDE = 0.5


@dataclass
class Dataset:
    """Examples read from one annotation source, and what was left out on the way."""

    examples: list[Example]
    skipped: list[str]
    kind: str
    source: str
    images: str | None = None
    notes: list[str] = field(default_factory=list)
    n_skipped: int = 0  # records (images) skipped; `skipped` also lists single dropped boxes

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def summary(self) -> str:
        text = f"{self.kind}: {len(self.examples)} examples from {self.source}"
        if self.n_skipped:
            text += f", {self.n_skipped} skipped"
        return text


# --- small helpers --------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _four(raw: Any) -> list[float] | None:
    if isinstance(raw, (list, tuple)) and len(raw) == 4 and all(_num(v) for v in raw):
        return [float(v) for v in raw]
    return None


def _is_box_list(raw: Any) -> bool:
    return isinstance(raw, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in raw)


def _positive_int(v: Any) -> int | None:
    if _num(v) and math.isfinite(v) and v > 0 and float(v).is_integer():
        return int(v)
    return None


class _Finder:
    """Files of a folder by stem, listed once (for names given without their extension)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, list[str]]] = {}

    def find(self, folder: Path, stem: str, suffixes: Iterable[str] | None = None) -> Path | None:
        if folder not in self._cache:
            index: dict[str, list[str]] = {}
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                index.setdefault(os.path.splitext(name)[0], []).append(name)
            self._cache[folder] = index
        for name in self._cache[folder].get(stem, []):
            if suffixes is None or os.path.splitext(name)[1].lower() in suffixes:
                return folder / name
        return None


class _Reader:
    """Shared state of one read: examples, messages, limit, split filter, image sizes."""

    def __init__(self, kind: str, source: Path, images: Path, require_images: bool,
                 limit: int | None, keep: Callable[[str], bool] | None) -> None:
        self.kind = kind
        self.source = source
        self.images = images
        self.require_images = require_images
        self.limit = limit
        self.keep = keep
        self.examples: list[Example] = []
        self.by_id: dict[str, Example] = {}
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.n_skipped = 0
        self.finder = _Finder()

    # bookkeeping
    def full(self) -> bool:
        return self.limit is not None and len(self.examples) >= self.limit

    def wanted(self, *names: str) -> bool:
        if self.keep is None:
            return True
        return any(self.keep(n) for n in names if n)

    def skip(self, message: str) -> None:
        self.skipped.append(message)
        self.n_skipped += 1

    def drop(self, message: str) -> None:
        """A dropped box (the record may still be kept)."""
        self.skipped.append(message)

    def add(self, ex: Example) -> None:
        if ex.id in self.by_id:
            self.skip(f"{ex.id}: duplicate id (already read); skipped - give each record its own id")
            return
        self.by_id[ex.id] = ex
        self.examples.append(ex)

    def dataset(self) -> Dataset:
        return Dataset(self.examples, self.skipped, self.kind, str(self.source),
                       str(self.images), self.notes, self.n_skipped)

    # paths and sizes
    def image_path(self, name: str) -> Path:
        p = Path(name).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.images / p))

    def size(self, label: str, path: Path, declared: tuple[int, int] | None = None,
             infer: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Upright size from the header; without the file (and require_images=False) the
        declared size, else the inferred one. None (with a message) when the record must go."""
        try:
            actual = image_size(path)
        except ImageError as exc:
            missing = not path.is_file()
            if missing and self.require_images:
                self.skip(f"{label}: image file {path} not found; skipped")
                return None
            if not missing and self.require_images:
                self.skip(f"{label}: {exc}; skipped")
                return None
            if declared is not None:
                return declared
            if infer is not None:
                return infer
            why = "not found" if missing else f"unreadable ({exc})"
            self.skip(f"{label}: image file {path} {why} and the annotation gives no size; skipped")
            return None
        if declared is not None and tuple(declared) != actual:
            self.skip(f"{label}: annotation says {declared[0]}x{declared[1]} but image is "
                      f"{actual[0]}x{actual[1]}; skipped")
            return None
        return actual

    def declared_size(self, label: str, rec: dict[str, Any]) -> tuple[int, int] | bool | None:
        """(w, h) from a record, None when absent, False (with a message) when malformed."""
        if rec.get("width") is None and rec.get("height") is None:
            return None
        w, h = _positive_int(rec.get("width")), _positive_int(rec.get("height"))
        if w is None or h is None:
            self.skip(f"{label}: width/height {_fmt(rec.get('width'))}x{_fmt(rec.get('height'))} "
                      "must be positive integers; skipped")
            return False
        return w, h

    # boxes
    def box(self, label: str, what: str, raw: Any, width: int, height: int,
            fmt: str = "xyxy") -> Box | None:
        """Check one box (`raw` as written, in `fmt`); clamp small overshoots; None if dropped."""
        shown = f"{what} {_fmt(raw)}"
        vals = _four(raw)
        if vals is None:
            self.drop(f"{label}: {shown} is not 4 numbers; skipped")
            return None
        if not all(math.isfinite(v) for v in vals):
            self.drop(f"{label}: {shown} has non-finite values; skipped")
            return None
        if fmt == "xywh":
            x, y, w, h = vals
            if w <= 0 or h <= 0:
                self.drop(f"{label}: {shown} (x, y, w, h) is degenerate (w <= 0 or h <= 0); skipped")
                return None
            b = Box.from_xywh(x, y, w, h)
        elif fmt == "yxyx":
            b = Box(vals[1], vals[0], vals[3], vals[2])
        else:
            b = Box(*vals)
        if b.x2 <= b.x1 or b.y2 <= b.y1:
            axis = "x2 <= x1" if b.x2 <= b.x1 else "y2 <= y1"
            self.drop(f"{label}: {shown} is degenerate ({axis}); skipped")
            return None
        over_x = max(0.0, -b.x1, b.x2 - width)
        over_y = max(0.0, -b.y1, b.y2 - height)
        if over_x == 0 and over_y == 0:
            return b
        inside = b.intersection(Box.full(width, height)) / b.area
        if inside < _MIN_INSIDE:
            self.drop(f"{label}: {shown} lies mostly outside the {width}x{height} image "
                      f"({inside:.0%} inside); skipped")
            return None
        clamped = b.clamp(width, height)
        if not clamped.is_valid():
            self.drop(f"{label}: {shown} has no area inside the {width}x{height} image; skipped")
            return None
        if over_x > max(_TOL_PX, _TOL_FRAC * width) or over_y > max(_TOL_PX, _TOL_FRAC * height):
            self.notes.append(f"{label}: {shown} overshoots the {width}x{height} image by "
                              f"{max(over_x, over_y):g} px; clamped")
        return clamped

    def boxes(self, label: str, raws: list[Any], width: int, height: int, fmt: str = "xyxy",
              scores: list[Any] | None = None, what: str = "crop") -> tuple[list[Box], list[float] | None]:
        out: list[Box] = []
        kept: list[float] = []
        for i, raw in enumerate(raws):
            s = None
            if scores is not None:
                s = scores[i]
                if not (_num(s) and math.isfinite(s)):
                    self.drop(f"{label}: score {_fmt(s)} of {what} {_fmt(raw)} is not a number; "
                              "crop skipped")
                    continue
            b = self.box(label, what, raw, width, height, fmt)
            if b is None:
                continue
            out.append(b)
            if s is not None:
                kept.append(float(s))
        return out, (kept if scores is not None else None)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None


# --- FCDB -----------------------------------------------------------------------------------


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


# --- JSONL (FCDB's and ours) ----------------------------------------------------------------


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


# --- GAICD ----------------------------------------------------------------------------------


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


# --- SACD -----------------------------------------------------------------------------------


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


# --- entry point ----------------------------------------------------------------------------


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
    """Read a cropping dataset into `Example`s (see the module docstring for the formats).

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

    masks: Path | None = None
    sacd_files: list[Path] = []
    if k == "sacd":
        root, sacd_files = _sacd_layout(ann)
        default_images = root / "images"
        masks = root / "masks"
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
    if k == "fcdb":
        if ann.is_dir():
            raise AnnotationError(f"{ann} is a folder; FCDB needs its .json or .jsonl file")
        _read_fcdb(r, ann)
    elif k == "jsonl":
        if ann.is_dir():
            raise AnnotationError(f"{ann} is a folder; give the .jsonl file")
        _read_jsonl(r, ann)
    elif k == "gaicd":
        if ann.is_dir():
            if (ann / "image_crop.json").is_file():
                _read_gaicd_json(r, ann / "image_crop.json")
            else:
                _read_gaicd_txt(r, ann)
        else:
            _read_gaicd_json(r, ann)
    else:
        assert masks is not None
        _read_sacd(r, sacd_files, masks)
    return r.dataset()


__all__ = ["KINDS", "Dataset", "read_dataset"]
