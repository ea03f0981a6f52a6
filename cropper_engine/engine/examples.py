"""Choosing the examples a query is shown (a mixin of `Cropper`, engine/loop.py).

For each job, the retrieved neighbours give the VLM's S examples, each with its T best crops by
the task's G (index/select.py) and, for the subject task, each crop's subject box: the index's,
else found at query time (`_with_subject`); they also give the no-VLM proposers the neighbours'
best crops. `ImageCache` keeps the decoded example images; `_uuid` names an example in a prompt.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from cropper_engine.engine.job import Job
from cropper_engine.engine.prompt import PromptExample
from cropper_engine.errors import ImageError
from cropper_engine.imageio import open_image
from cropper_engine.types import Task


class ImageCache:
    """A small LRU of decoded example images: retrieved examples recur across queries. They are
    only shown to the VLM, so they are decoded (JPEG draft) and kept no larger than it reads."""

    def __init__(self, capacity: int = 256, max_side: int = 1024) -> None:
        self.capacity, self.max_side = capacity, max_side
        self._d: OrderedDict[str, Any] = OrderedDict()

    def get(self, path: str) -> Any:
        if path in self._d:
            self._d.move_to_end(path)
            return self._d[path]
        img = open_image(path, draft_side=self.max_side).working  # no larger than needed: never the full decode
        if max(img.size) > self.max_side:
            img = img.copy()
            img.thumbnail((self.max_side, self.max_side))
        self._d[path] = img
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return img


def _uuid(path: str) -> str:
    return "ex-" + hashlib.sha1(path.encode()).hexdigest()[:16]


class ExamplesMixin:
    """The shown examples of `Cropper`, which provides `cfg`, `index`, `vlm`, `zero_shot`,
    `example_images` (an `ImageCache`) and `_auto_subjects`."""

    def _with_subject(self, ex: Any, job: Job) -> Any:
        """The example with subject boxes for the subject task: its own, else (an index built
        without them) its automatic ones, computed once per example (index/subjects.py)."""
        from cropper_engine.index.subjects import has_subject_box, with_auto_subject

        if has_subject_box(ex):
            return ex
        hit = self._auto_subjects.get(ex.id)
        if hit is None:
            hit = with_auto_subject(ex, self.example_images.get(ex.image_path))
            self._auto_subjects[ex.id] = hit
            if len(self._auto_subjects) > 4096:
                self._auto_subjects.popitem(last=False)
        else:
            self._auto_subjects.move_to_end(ex.id)
        job.notes.append("subject boxes of examples found at query time: the index has none stored "
                         "(rebuild it with `cropper-engine index build` to store them)")
        return hit

    def _attach_neighbours(self, job: Job, hits: list[Any]) -> None:
        """The S examples shown to the VLM, each with its T best crops by the task's G (and, for
        the subject task, each crop's subject box: the index's, else found at query time), and
        the neighbours' best crops for the no-VLM proposers."""
        from cropper_engine.index.select import crop_subject_boxes, select_indices

        if not hits:
            return
        w, h = job.size
        center_unit = None
        if job.subject is not None:  # G: the query's subject box centre, as the examples' (index/select.py)
            cx, cy = job.subject.center
            center_unit = (cx / w, cy / h)
        t_crops = self.cfg.retrieval.crops
        examples: list[PromptExample] = []
        showing = self.vlm is not None and not self.zero_shot
        for hit in hits:
            ex = self.index.example(hit.row)
            if job.task is Task.SUBJECT and showing and len(examples) < self.cfg.retrieval.examples:
                try:
                    ex = self._with_subject(ex, job)
                except ImageError as exc:
                    job.notes.append(f"example {ex.id} skipped: {exc}")
                    continue
            task = job.task if job.task is not Task.SUBJECT or center_unit is not None else Task.FREE
            order = select_indices(ex, task, t_crops, ratio=job.ratio, mask_center_unit=center_unit)
            scores = ex.scores if ex.scores is not None and len(ex.scores) == len(ex.crops) else None
            sel = [(ex.crops[i], float(scores[i]) if scores is not None else None) for i in order]
            for b, _ in sel[:1]:
                job.neighbours_unit.append(list(b.to_unit(ex.width, ex.height)))
                job.neighbour_weights.append(max(hit.similarity, 0.0))
            if not showing or len(examples) >= self.cfg.retrieval.examples:
                continue
            subjects = None
            if job.task is Task.SUBJECT:
                per_crop = crop_subject_boxes(ex)
                subjects = [per_crop[i] for i in order]
            try:
                img = self.example_images.get(ex.image_path)
            except ImageError as exc:
                job.notes.append(f"example {ex.id} skipped: {exc}")
                continue
            examples.append(PromptExample(img, ex.width, ex.height, sel, _uuid(ex.image_path), subjects,
                                          ex.image_path))
        job.examples = examples
