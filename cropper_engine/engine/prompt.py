"""Prompts for the three tasks, in the paper's format, as overridable data.

Layout of one prompt (one user turn):
    instruction | example image 1, its T boxes | ... | example image S, its boxes | query image,
    query line | [refinement: cropped candidate 1, its box and score | ... | the ask]
Everything shared between rounds (instruction, examples, query) comes first, so a prefix
cache serves it in the refinement rounds. Text after an image starts with a newline (token
parity between transformers and vLLM, see FACTS.md). Boxes are (s, x1, y1, x2, y2) in 1..1000.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cropper_engine.errors import ConfigError
from cropper_engine.models.base import ImagePart, Message
from cropper_engine.types import Box, Ratio, Task

_COORDS = (
    "(s, x1, y1, x2, y2) represents the region. x1 and x2 are the left and right most positions, "
    "normalized into 1 to 1000, where 1 is the left and 1000 is the right. y1 and y2 are the top "
    "and bottom positions, normalized into 1 to 1000 where 1 is the top and 1000 is the bottom. "
    "s is MOS score."
)


@dataclass(frozen=True)
class PromptTemplates:
    """Every piece of prompt text; a TOML file can override any of them (`load_templates`).

    Placeholders: {ratio} (W:H), {cx} {cy} (subject centre, 1..1000), {boxes}, {box}, {score},
    {n} (boxes asked for).
    """

    instruction_free: str = "Localize the aesthetic part of the image. " + _COORDS + \
        " We provide several images here."
    instruction_subject: str = "Localize the aesthetic part of the image that keeps the subject. " + \
        _COORDS + " The subject's centre is given as (cx, cy) in the same coordinates. " \
        "We provide several images here."
    instruction_ratio: str = "Localize the aesthetic part of the image with the given aspect ratio " \
        "(width:height). " + _COORDS + " We provide several images here."
    example_free: str = "\n{boxes}\n"
    example_subject: str = "\nSubject centre ({cx}, {cy}). {boxes}\n"
    example_ratio: str = "\nAspect ratio {ratio}. {boxes}\n"
    query_free: str = "\nQuery image. Answer with {n} region(s) as (s, x1, y1, x2, y2).\n"
    query_subject: str = "\nQuery image. Subject centre ({cx}, {cy}). Answer with {n} region(s) " \
        "as (s, x1, y1, x2, y2) that contain the subject.\n"
    query_ratio: str = "\nQuery image. Aspect ratio {ratio}. Answer with {n} region(s) as " \
        "(s, x1, y1, x2, y2) with that aspect ratio.\n"
    zero_shot_note: str = "No example images are given; use your own judgement.\n"
    refine_intro: str = "Here are crops of the query image with their scores.\n"
    refine_candidate: str = "\n{box}, Score is {score}\n"
    refine_ask: str = "Propose similar crop that has high score. The region should be represented " \
        "by (s, x1, y1, x2, y2)."


def load_templates(path: str | Path | None) -> PromptTemplates:
    """Defaults, overridden by the keys of a TOML file (unknown keys are refused)."""
    base = PromptTemplates()
    if not path:
        return base
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt template file {p} not found")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt template file {p} is not valid TOML: {exc}") from None
    valid = {f.name for f in dataclasses.fields(base)}
    bad = sorted(set(data) - valid)
    if bad:
        raise ConfigError(f"unknown prompt template keys in {p}: {', '.join(bad)}; "
                          f"valid keys: {', '.join(sorted(valid))}")
    return dataclasses.replace(base, **{k: str(v) for k, v in data.items()})


def fmt_score(s: float | None) -> str:
    return "5" if s is None else f"{s:.2f}".rstrip("0").rstrip(".")


def fmt_box(norm: tuple[int, int, int, int], s: float | None) -> str:
    x1, y1, x2, y2 = norm
    return f"({fmt_score(s)}, {x1}, {y1}, {x2}, {y2})"


@dataclass
class PromptExample:
    """One retrieved example: its image and its selected crops (pixels) with MOS."""

    image: Any  # PIL image
    width: int
    height: int
    crops: list[tuple[Box, float | None]]
    uuid: str | None = None
    subject_center_norm: tuple[int, int] | None = None


@dataclass
class PromptSpec:
    task: Task
    query_image: Any  # PIL image
    width: int
    height: int
    examples: list[PromptExample]
    n_boxes: int = 1  # boxes asked for per answer (1 when R samples run in parallel)
    ratio: Ratio | None = None
    subject_center_norm: tuple[int, int] | None = None
    query_uuid: str | None = None


def _fill(template: str, **kw: Any) -> str:
    try:
        return template.format(**kw)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompt template {template!r} has a bad placeholder: {exc}") from None


def build_messages(spec: PromptSpec, tpl: PromptTemplates,
                   refinement: list[tuple[Box, float, float | None]] | None = None) -> list[Message]:
    """The conversation for one round; `refinement` = [(box px, score, s), ...]: each candidate
    is shown as its region of the query image, then its box and score."""
    task = spec.task.value
    ratio = str(spec.ratio) if spec.ratio else ""
    cx, cy = spec.subject_center_norm or (500, 500)
    parts: list[str | ImagePart] = [_fill(getattr(tpl, f"instruction_{task}"))]
    if not spec.examples:
        parts.append("\n" + tpl.zero_shot_note)
    for ex in spec.examples:
        boxes = ", ".join(fmt_box(b.to_norm(ex.width, ex.height), s) for b, s in ex.crops)
        ecx, ecy = ex.subject_center_norm or (500, 500)
        parts.append(ImagePart(ex.image, ex.uuid))
        parts.append(_fill(getattr(tpl, f"example_{task}"), boxes=boxes, ratio=ratio, cx=ecx, cy=ecy))
    parts.append(ImagePart(spec.query_image, spec.query_uuid))
    parts.append(_fill(getattr(tpl, f"query_{task}"), n=spec.n_boxes, ratio=ratio, cx=cx, cy=cy))
    if refinement:
        parts.append(tpl.refine_intro)
        for box, score, s in refinement:
            parts.append(ImagePart(spec.query_image, None, tuple(box.as_int())))
            parts.append(_fill(tpl.refine_candidate, box=fmt_box(box.to_norm(spec.width, spec.height), s),
                               score=f"{score:.3f}"))
        parts.append(tpl.refine_ask)
    return [Message("user", _merge_text(parts))]


def _merge_text(parts: list[str | ImagePart]) -> list[str | ImagePart]:
    out: list[str | ImagePart] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + p
        else:
            out.append(p)
    return out
