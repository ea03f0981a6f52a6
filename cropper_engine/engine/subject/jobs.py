"""A loop Job's subject (engine/job.py): the subject box a crop of its ratio must contain, the
faces it keeps whole, and the result row's subject keys and notes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cropper_engine.engine.subject.faces import (
    MAIN_PERSON_SHARE,
    _pad,
    _side,
    _union,
    face_cut_note,
    faces_left_out_note,
    faces_to_keep,
    fits,
    not_a_face,
)
from cropper_engine.engine.subject.resolve import Subject
from cropper_engine.types import Box


def _greedy_fit(boxes: Sequence[Box], ratio: float | None, width: float, height: float) -> Box | None:
    """The union of `boxes` (largest first) taken in order while one crop of the ratio holds it."""
    core = None
    for b in boxes:
        u = b if core is None else _union([core, b])
        if fits(u, ratio, width, height):
            core = u
    return core


def job_subject_box(sub: Subject, ratio: float | None, width: float, height: float) -> tuple[Box | None, str | None]:
    """The subject box a crop of this ratio must contain. Faces or persons that do not fit one
    crop of the ratio together: the main ones (faces: the best-ranked and those ranked at least
    half of it, faces.rank_scores; persons: the largest and those at least half its size), as
    many as fit, best first (with a note); the best alone when even it does not fit."""
    if sub.box is None:
        return None, None
    if fits(sub.box, ratio, width, height):
        return sub.box, None
    if sub.kind == "face" and sub.faces:
        kept = faces_to_keep(sub.faces, ratio, width, height)
        main = [k for k in kept if k.main]
        if not main:
            return kept[0], None
        core = Box(*_union(main).as_list())
        n = sum(1 for w in not_a_face(sub.faces[:len(kept)]) if w is None)
        if len(main) >= n:  # all of them fit without their margins
            return core, None
        what = "the best-ranked face" if len(main) == 1 else f"the {len(main)} best-ranked faces"
        return core, f"the {n} faces do not fit one crop of this ratio: the subject is {what}"
    if sub.kind == "person" and sub.persons:
        big = _side(sub.persons[0])
        main = [b for b in sub.persons if _side(b) >= MAIN_PERSON_SHARE * big - 1e-9]
        core = _greedy_fit(main, ratio, width, height)
        if core is None:
            return sub.persons[0], None  # not even the largest fits: the crop is centred on it (note below)
        k = sum(1 for b in main if core.contains(b, tol=0.5))
        what = "the largest person" if k == 1 else f"the {k} largest persons"
        return core, f"the {len(sub.persons)} persons do not fit one crop of this ratio: the subject is {what}"
    return sub.box, None


def attach_subject(job: Any, sub: Subject) -> None:
    """Give a loop Job (engine/job.py) its subject box, the faces to keep whole and the notes."""
    w, h = job.size
    ratio = job.ratio.value if job.ratio else None
    job.subject_info = sub
    job.notes[:0] = list(sub.notes)
    at = f"a {job.ratio} crop" if job.ratio else "a crop"
    if sub.box is not None and (job.mask is not None or job.ratio is not None):
        box, note = job_subject_box(sub, ratio, w, h)
        job.subject = box
        if note:
            job.notes.append(note)
        elif not fits(box, ratio, w, h):
            job.notes.append(f"the subject ({round(box.width)}x{round(box.height)} px) does not fit {at}: "
                             "the crop is centred on it")
    if sub.keep_faces and sub.faces:
        job.faces = faces_to_keep(sub.faces, ratio, w, h)
        if any(not fits(_pad(f.keep, w, h), ratio, w, h) for f in sub.faces):
            job.notes.append(f"{at} has no room for a face's margin (forehead, hair): the face is kept "
                             "whole as detected")


def result_extra(job: Any, crop: Box) -> dict[str, Any]:
    """The result row's subject keys for a job and its chosen crop; a note if the crop cuts a face."""
    sub: Subject = job.subject_info
    out = sub.to_extra()
    out["subject_ms"] = {k: round(v, 2) for k, v in sub.ms.items()}
    if job.faces:
        ratio_text = str(job.ratio) if job.ratio else None
        for note in (face_cut_note(crop.rounded(), sub.faces, ratio_text),
                     faces_left_out_note(crop.rounded(), sub.faces, job.faces, ratio_text)):
            if note:
                job.notes.append(note)
    return out
