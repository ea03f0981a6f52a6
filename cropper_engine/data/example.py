"""`Example`: one image of a cropping dataset with its ground-truth crops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cropper_engine.types import Box


@dataclass
class Example:
    """One annotated image, whatever dataset it came from.

    `crops` are ground-truth boxes in pixels of the upright image of size (width, height);
    `scores` (same length, optional) are their MOS; `mask_path` / `mask_box` describe the
    subject for subject-aware sets (SACD). `id` is unique within a dataset.
    """

    id: str
    image_path: str
    width: int
    height: int
    crops: list[Box]
    scores: list[float] | None = None
    mask_path: str | None = None
    mask_box: Box | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def best_crop(self) -> Box:
        """The crop of highest score (the first one when unscored)."""
        if not self.scores:
            return self.crops[0]
        i = max(range(len(self.crops)), key=lambda j: self.scores[j])  # type: ignore[index]
        return self.crops[i]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": self.image_path,
            "width": self.width,
            "height": self.height,
            "crops": [[round(v, 3) for v in b.as_list()] for b in self.crops],
        }
        if self.scores is not None:
            out["scores"] = list(self.scores)
        if self.mask_path is not None:
            out["mask"] = self.mask_path
        if self.mask_box is not None:
            out["mask_box"] = [round(v, 3) for v in self.mask_box.as_list()]
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(
            id=str(d["id"]),
            image_path=str(d["image"]),
            width=int(d["width"]),
            height=int(d["height"]),
            crops=[Box(*map(float, b)) for b in d["crops"]],
            scores=[float(s) for s in d["scores"]] if d.get("scores") is not None else None,
            mask_path=d.get("mask"),
            mask_box=Box(*map(float, d["mask_box"])) if d.get("mask_box") else None,
            extra=dict(d.get("extra") or {}),
        )
