"""One crop job and one batch's state, as `Cropper.crop_batch` (engine/loop.py) holds them.

`Job` is one (image, ratio) to crop with its candidates, notes and token counts; the pipeline
names (`PIPELINE_*`) say which path cropped it. `BatchContext` is what one `crop_batch` call
decoded and retrieved, shared by its pipelines; `SaliencyMaps` makes each image's saliency map
on first use; `_row_timings` splits the batch's stage times among its results.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cropper_engine.engine.prompt import PromptExample, PromptSpec
from cropper_engine.errors import CropperError
from cropper_engine.imageio import LoadedImage
from cropper_engine.types import Box, Candidate, CropRequest, Ratio, Task

PIPELINE_VLM = "vlm"
PIPELINE_FALLBACK = "vlm-fallback"
PIPELINE_NO_VLM = "no-vlm"


@dataclass
class Job:
    """One (image, ratio) to crop."""

    req: int
    image: LoadedImage
    task: Task
    ratio: Ratio | None
    mask: np.ndarray | None
    subject: Box | None
    spec: PromptSpec | None = None
    candidates: list[Candidate] = field(default_factory=list)
    pipeline: str = PIPELINE_VLM
    notes: list[str] = field(default_factory=list)
    neighbours_unit: list[list[float]] = field(default_factory=list)
    neighbour_weights: list[float] = field(default_factory=list)
    examples: list[PromptExample] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "generated": 0, "cached": 0})
    round_tokens: list[dict[str, int]] = field(default_factory=list)
    faces: list[Box] = field(default_factory=list)  # kept whole by `_constrain` (engine/subject/faces.py)
    distinct: dict[int, dict[str, int]] = field(default_factory=dict)  # round -> VLM boxes, distinct ones
    prompts: list[dict[str, Any]] | None = None  # with `Cropper.record_prompts`: every prompt and answer
    own_seconds: dict[str, float] = field(default_factory=dict)  # stages timed for this job alone
    subject_info: Any = None  # engine/subject/resolve.py's Subject: what the result row says of the subject

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def round_candidates(self, r: int) -> list[Candidate]:
        return [c for c in self.candidates if c.round == r]


class SaliencyMaps(dict):
    """Each image's spectral-residual saliency map (64 px), made on first use: the VLM loop's
    scorer and the classical fallbacks read it, the fitted default (its own maps) does not."""

    def __init__(self, images: list[LoadedImage | None], own: dict[int, dict[str, float]]) -> None:
        super().__init__()
        self._images, self._own = images, own

    def __missing__(self, i: int) -> np.ndarray:
        from cropper_engine.models.saliency import spectral_residual_saliency

        t_own = time.perf_counter()
        im = self._images[i].working  # type: ignore[union-attr]  # a reduced decode does: 160 px are read
        w, h = im.size
        s = 160 / max(w, h)
        small = im.convert("L").resize((max(8, round(w * s)), max(8, round(h * s))))
        self[i] = spectral_residual_saliency(np.asarray(small, dtype=np.float32), 64)
        self._own.setdefault(i, {})["saliency"] = time.perf_counter() - t_own
        return self[i]


@dataclass
class BatchContext:
    """What one `crop_batch` call decoded and retrieved, shared by its pipelines."""

    requests: Sequence[CropRequest]
    images: list[LoadedImage | None]
    live: list[int]
    neighbours: dict[int, list[Any]]
    exclude_ids: Sequence[set[str] | None] | None
    saliency: SaliencyMaps
    own_seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # per request: stages timed alone
    pending_faces: dict[int, Any] = field(default_factory=dict)  # request -> its face detection (a Future)
    failed: dict[int, CropperError] = field(default_factory=dict)  # requests that failed after decoding


def _row_timings(job: Job, timings: dict[str, float], own: dict[int, dict[str, float]], jobs: list[Job],
                 per_req: dict[int, int]) -> dict[str, float]:
    """One result's own seconds per stage: what was timed for its image alone (decode, saliency,
    analysis: shared by that image's ratios) or for its job alone (proposals), plus an equal
    share of what the batch did for all at once (embedding, retrieval, VLM generation)."""
    out: dict[str, float] = {}
    for stage, total in timings.items():
        req_own = {i: d[stage] for i, d in own.items() if stage in d}
        job_own = [j.own_seconds[stage] for j in jobs if stage in j.own_seconds]
        shared = max(total - sum(req_own.values()) - sum(job_own), 0.0) / len(jobs)
        mine = job.own_seconds.get(stage, 0.0) + req_own.get(job.req, 0.0) / max(per_req.get(job.req, 1), 1)
        out[stage] = mine + shared
    out["total"] = sum(out.values())
    return out
