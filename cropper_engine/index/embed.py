"""Embedding examples for an index, with their subject boxes on the way.

Subject boxes (the subject-aware task's examples): an example with a mask file gets the mask's
tight box (`mask_box`, extra["mask_box_from"] = "mask"); one with a box from its dataset keeps
it; one without either gets the automatic subject of `--subject auto` (faces, else persons, else
the salient region; index/subjects.py): `mask_box`, one box per crop in extra["mask_boxes"] and
extra["mask_box_from"] = "auto:faces" | "auto:persons" | "auto:saliency". `subjects="none"`
(`index build --subjects none`) leaves such examples without. The manifest's "subjects" records
the mode, how many rows got their box from where ("counts"), the detectors and their versions.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import ExampleIndexError, ImageError, InputError
from cropper_engine.index.search import _normalise_rows
from cropper_engine.index.subjects import subject_counts
from cropper_engine.types import Box

SUBJECT_MODES = ("auto", "none")


def _check_subjects(subjects: str) -> str:
    mode = str(subjects).strip().lower()
    if mode not in SUBJECT_MODES:
        raise InputError(f"subjects must be one of {', '.join(SUBJECT_MODES)}, got {subjects!r}")
    return mode


def _embed_examples(examples: Iterable[Example], embedder: Any, *, batch_size: int, progress: bool,
                    on_error: Callable[[str], None] | None, skip_ids: Collection[str] = (),
                    subjects: str = "auto", stats: dict[str, Any] | None = None,
                    ) -> tuple[np.ndarray, list[Example], list[str]]:
    """Open and embed examples in batches; unreadable images are reported and skipped.

    Each example gets its subject box on the way (see the module's docstring): from its mask
    file, else (subjects="auto", no box from the dataset) the automatic subject of its image.
    `stats` (when given) receives "subject_seconds" and "crop_boxes" (how the automatic per-crop
    boxes were found: the subject inside the crop, or the crop's own salient region)."""
    from tqdm import tqdm

    from cropper_engine.imageio import open_image
    from cropper_engine.index.subjects import apply_auto_subject, has_subject_box

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    auto = _check_subjects(subjects) == "auto"
    stats = stats if stats is not None else {}
    stats.setdefault("subject_seconds", 0.0)
    crop_from: dict[str, int] = stats.setdefault("crop_boxes", {})
    dim = int(embedder.dim)
    chunks: list[np.ndarray] = []
    kept: list[Example] = []
    skipped: list[str] = []
    seen: set[str] = set(skip_ids)
    batch_images: list[Any] = []
    batch_examples: list[Example] = []

    def skip(msg: str) -> None:
        skipped.append(msg)
        if on_error is not None:
            on_error(msg)

    def flush() -> None:
        if not batch_images:
            return
        vecs = np.asarray(embedder.embed(batch_images), dtype=np.float32)
        if vecs.shape != (len(batch_images), dim):
            raise ExampleIndexError(
                f"embedder {embedder.id!r} returned shape {vecs.shape} for {len(batch_images)} images; "
                f"expected ({len(batch_images)}, {dim})"
            )
        chunks.append(_normalise_rows(vecs, f"embeddings from {embedder.id!r}"))
        kept.extend(batch_examples)
        batch_images.clear()
        batch_examples.clear()

    desc = "embedding examples, subject boxes" if auto else "embedding examples"
    bar = tqdm(examples, desc=desc, unit="img", file=sys.stderr, disable=not progress)
    for ex in bar:
        if ex.id in seen:
            skip(f"{ex.id}: duplicate example id (already in the index), skipped")
            continue
        try:
            image = open_image(ex.image_path).image
        except ImageError as exc:
            skip(f"{ex.id}: {exc}")
            continue
        seen.add(ex.id)
        if ex.mask_path:
            _derive_subject_box(ex)
        if auto and not has_subject_box(ex):
            t = time.perf_counter()
            got = apply_auto_subject(ex, image)
            stats["subject_seconds"] += time.perf_counter() - t
            for how in got.crop_from if got is not None else ():
                crop_from[how] = crop_from.get(how, 0) + 1
        batch_images.append(image)
        batch_examples.append(ex)
        if len(batch_images) >= batch_size:
            flush()
    flush()
    bar.close()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    return vectors, kept, skipped


def _subjects_record(mode: str, kept: Sequence[Example], stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "subjects" for rows just embedded: the mode, the counts by source, and
    (where automatic boxes were computed) how the per-crop boxes were found, the seconds spent
    and the detectors with their versions."""
    from cropper_engine.index.subjects import detector_info

    counts = subject_counts(kept)
    rec: dict[str, Any] = {"mode": mode, "counts": counts}
    if any(k.startswith("auto:") for k in counts):
        rec["crop_boxes"] = dict(sorted(stats.get("crop_boxes", {}).items()))
        rec["seconds"] = round(float(stats.get("subject_seconds", 0.0)), 3)
        rec["detectors"] = detector_info()
    return rec


def _merge_subjects(old: dict[str, Any], new: dict[str, Any], old_rows: Sequence[bytes]) -> dict[str, Any]:
    """The manifest's "subjects" after an append: counts over all rows (an index written before
    they were recorded is counted from its rows), the build's detectors (each addition keeps its
    own in "additions")."""
    old_counts = old.get("counts")
    if not isinstance(old_counts, dict):
        old_counts = subject_counts(json.loads(line) for line in old_rows)
    counts = dict(old_counts)
    for k, v in new["counts"].items():
        counts[k] = counts.get(k, 0) + v
    out = {**new, **{k: v for k, v in old.items() if k not in ("counts", "crop_boxes", "seconds")}}
    out["counts"] = dict(sorted(counts.items()))
    crop_boxes = dict(old.get("crop_boxes") or {})
    for k, v in (new.get("crop_boxes") or {}).items():
        crop_boxes[k] = crop_boxes.get(k, 0) + v
    if crop_boxes:
        out["crop_boxes"] = dict(sorted(crop_boxes.items()))
    seconds = float(old.get("seconds") or 0.0) + float(new.get("seconds") or 0.0)
    if seconds:
        out["seconds"] = round(seconds, 3)
    return out


def _derive_subject_box(ex: Example) -> None:
    """The subject box of an example with a mask file: the mask's tight box (scaled to the image
    when the mask has another size), the same way the loop derives a query's; stored in the
    metadata as `mask_box` with extra["mask_box_from"] = "mask". An unreadable or empty mask
    leaves the dataset's own `mask_box` (if any; else, with subjects="auto", the
    automatic subject: index/subjects.py)."""
    from cropper_engine.engine.geometry import mask_bbox
    from cropper_engine.imageio import load_mask

    try:
        mask = load_mask(ex.mask_path)
        box = mask_bbox(mask)
    except (ImageError, ValueError, OSError):
        return
    h, w = mask.shape
    sx, sy = ex.width / w, ex.height / h
    ex.mask_box = Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
    ex.extra = {**ex.extra, "mask_box_from": "mask"}
