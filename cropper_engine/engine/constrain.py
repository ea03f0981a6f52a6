"""The hard constraints of a crop (a mixin of `Cropper`, engine/loop.py): the exact ratio, at
least `loop.min_side` of each side, the subject inside, and no detected face cut (the faces kept
whole, engine/subject/faces.py). `_constrain` repairs one box; `_constrain_many` passes the boxes
that need no repair in one vectorised step and gives exactly what `_constrain` gives.
"""

from __future__ import annotations

import numpy as np

from cropper_engine.engine.geometry import expand_to_contain, fit_ratio, shift_inside
from cropper_engine.engine.job import Job
from cropper_engine.types import Box


class ConstrainMixin:
    """The hard constraints of `Cropper`; they read only `cfg.loop.min_side` (and call
    `_constrain`)."""

    def _constrain_many(self, job: Job, boxes_unit: np.ndarray) -> list[Box | None]:
        """`_constrain` of many boxes (unit coordinates): the boxes that need no repair (big
        enough, the subject inside, and no face cut once grown around the main faces) in one
        vectorised pass, exactly as `_constrain` gives them; the others one by one through
        `_constrain`."""
        from cropper_engine.engine.geometry import expand_to_contain_array, fit_ratio_array
        from cropper_engine.engine.subject.faces import main_faces_need, untouched

        w, h = job.size
        u = np.asarray(boxes_unit, dtype=np.float64).reshape(-1, 4)
        px = u * np.array([w, h, w, h], dtype=np.float64)  # Box.from_unit
        x1, x2 = np.minimum(px[:, 0], px[:, 2]), np.maximum(px[:, 0], px[:, 2])  # Box.clamp
        y1, y2 = np.minimum(px[:, 1], px[:, 3]), np.maximum(px[:, 1], px[:, 3])
        b = np.stack([np.minimum(np.maximum(x1, 0.0), w), np.minimum(np.maximum(y1, 0.0), h),
                      np.minimum(np.maximum(x2, 0.0), w), np.minimum(np.maximum(y2, 0.0), h)], axis=1)
        min_w, min_h = max(2.0, self.cfg.loop.min_side * w), max(2.0, self.cfg.loop.min_side * h)
        fast = np.isfinite(b).all(1) & (b[:, 2] - b[:, 0] >= min_w) & (b[:, 3] - b[:, 1] >= min_h)
        ratio = job.ratio.value if job.ratio else None
        if ratio:
            b = fit_ratio_array(b, ratio, w, h)
        subject = job.subject
        if subject is not None:
            fast &= untouched(b, [], subject)
        if job.faces:
            need = main_faces_need(job.faces, w, h, ratio, subject)
            if need is not None and any(getattr(f, "main", False) for f in job.faces):
                grow = fast & ~untouched(b, [], need)  # keep_faces_whole grows these around the main faces
                if grow.any():
                    b[grow] = expand_to_contain_array(b[grow], need, w, h, ratio)
            fast &= untouched(b, job.faces, need)
        fast &= (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        return [Box(*map(float, b[k])) if fast[k] else self._constrain(job, Box.from_unit(u[k], w, h))
                for k in range(len(u))]

    def _constrain(self, job: Job, box: Box) -> Box | None:
        """Apply the task's hard constraints: exact ratio, subject inside."""
        w, h = job.size
        box = box.clamp(w, h)
        if not box.is_valid():
            return None
        min_w, min_h = max(2.0, self.cfg.loop.min_side * w), max(2.0, self.cfg.loop.min_side * h)
        if box.width < min_w or box.height < min_h:  # too small to be a crop: grow it about its centre
            cx, cy = box.center
            bw, bh = max(box.width, min_w), max(box.height, min_h)
            box = shift_inside(Box(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), w, h).clamp(w, h)
        ratio = job.ratio.value if job.ratio else None
        if ratio:
            box = fit_ratio(box, ratio, w, h)
        if job.subject is not None and not box.contains(job.subject, tol=0.5):
            box = expand_to_contain(box, job.subject, w, h, ratio)
        if job.faces:  # no crop cuts through a detected face (engine/subject/faces.py)
            from cropper_engine.engine.subject import keep_faces_whole

            need = job.subject if job.subject is not None and box.contains(job.subject, tol=0.5) else None
            box, _ = keep_faces_whole(box, job.faces, w, h, ratio, need, min_w, min_h)
        return box if box.is_valid() else None
