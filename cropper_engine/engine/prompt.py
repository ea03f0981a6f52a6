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

    Placeholders: {ratio} (the target W:H, said once, in the query line), {aspect} (an example
    crop's own width / height in pixels, 2 decimals), {subject} (a subject box x1, y1, x2, y2 in
    1..1000), {boxes}, {box}, {score}, {n} (boxes asked for), {regions} (`regions_one`, or
    `regions_many` with {n} filled), {s} (`unscored_s`).

    `unscored_s` is the one constant a prompt may show: the s of a ground-truth crop whose
    dataset has no MOS (FCDB, SACD); `unscored_note` then tells the model so, in the instruction.
    """

    instruction_free: str = "Localize the aesthetic part of the image. " + _COORDS + \
        " We provide several images here."
    instruction_subject: str = "Localize the aesthetic part of the image that keeps the subject. " + \
        _COORDS + " The subject is given as a box (x1, y1, x2, y2) in the same coordinates, and each " \
        "crop keeps its subject. We provide several images here."
    instruction_ratio: str = "Localize the aesthetic part of the image with the given aspect ratio " \
        "(width:height). " + _COORDS + " Each example crop is followed by its own aspect ratio " \
        "(width / height in pixels). We provide several images here."
    unscored_s: str = "5"
    unscored_note: str = " Crops from datasets without MOS are shown with s = {s}."
    example_free: str = "\n{boxes}\n"
    example_subject: str = "\n{boxes}\n"
    example_ratio: str = "\n{boxes}\n"
    box_free: str = "{box}"
    box_ratio: str = "{box} aspect ratio {aspect}"
    subject_group: str = "Subject ({subject}): {boxes}"  # the crops of one subject of an example
    subject_group_sep: str = ". "
    query_free: str = "\nQuery image. Answer with {regions}.\n"
    query_subject: str = "\nQuery image. Subject ({subject}). Answer with {regions}; each keeps the subject.\n"
    query_ratio: str = "\nQuery image. Aspect ratio {ratio}. Answer with {regions}, with that aspect ratio.\n"
    regions_one: str = "one region as (s, x1, y1, x2, y2)"
    regions_many: str = "{n} different regions, each as (s, x1, y1, x2, y2), separated by commas"
    zero_shot_note: str = "No example images are given; use your own judgement.\n"
    refine_intro: str = "Here are crops of the query image with their scores.\n"
    refine_candidate: str = "\n{box}, Score is {score}\n"
    refine_ask: str = "Propose similar crop that has high score. The region should be represented " \
        "by (s, x1, y1, x2, y2)."  # the paper's words, when one box is asked for
    refine_ask_many: str = "Propose {n} different similar crops that have high scores. The regions " \
        "should be represented by (s, x1, y1, x2, y2), separated by commas."


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


def fmt_score(s: float | None, unscored: str = "5") -> str:
    return unscored if s is None else f"{s:.2f}".rstrip("0").rstrip(".")


def fmt_box(norm: tuple[int, int, int, int], s: float | None, unscored: str = "5") -> str:
    x1, y1, x2, y2 = norm
    return f"({fmt_score(s, unscored)}, {x1}, {y1}, {x2}, {y2})"


def fmt_aspect(box: Box) -> str:
    """A crop's own aspect ratio, width / height in pixels."""
    return f"{box.width / box.height:.2f}" if box.height > 0 else "0"


@dataclass
class PromptExample:
    """One retrieved example: its image and its selected crops (pixels) with MOS, best first.

    `crop_subjects` (subject task): the subject box (pixels) of each crop, aligned with `crops`;
    `name` says which image it is where a saved prompt shows it (its path)."""

    image: Any  # PIL image
    width: int
    height: int
    crops: list[tuple[Box, float | None]]
    uuid: str | None = None
    crop_subjects: list[Box | None] | None = None
    name: str | None = None


@dataclass
class PromptSpec:
    task: Task
    query_image: Any  # PIL image
    width: int
    height: int
    examples: list[PromptExample]
    n_boxes: int = 1  # boxes asked for per answer (R in one answer; 1 when R samples run in parallel)
    ratio: Ratio | None = None
    subject: Box | None = None  # the query's subject box (pixels), subject task
    query_uuid: str | None = None
    query_name: str | None = None


def _fill(template: str, **kw: Any) -> str:
    try:
        return template.format(**kw)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompt template {template!r} has a bad placeholder: {exc}") from None


def _norm_str(box: Box, w: int, h: int) -> str:
    return ", ".join(str(v) for v in box.to_norm(w, h))


def _example_boxes(ex: PromptExample, task: str, tpl: PromptTemplates) -> str:
    unscored = tpl.unscored_s
    if task == "subject":  # crops grouped by their subject box, in the crops' order
        groups: dict[str, list[str]] = {}
        subjects = ex.crop_subjects or [None] * len(ex.crops)
        for (b, s), sub in zip(ex.crops, subjects, strict=True):
            if sub is None:
                continue
            key = _norm_str(sub, ex.width, ex.height)
            groups.setdefault(key, []).append(fmt_box(b.to_norm(ex.width, ex.height), s, unscored))
        return tpl.subject_group_sep.join(
            _fill(tpl.subject_group, subject=k, boxes=", ".join(v)) for k, v in groups.items())
    box_tpl = tpl.box_ratio if task == "ratio" else tpl.box_free
    return ", ".join(_fill(box_tpl, box=fmt_box(b.to_norm(ex.width, ex.height), s, unscored), aspect=fmt_aspect(b))
                     for b, s in ex.crops)


def regions(n: int, tpl: PromptTemplates) -> str:
    return _fill(tpl.regions_one) if n == 1 else _fill(tpl.regions_many, n=n)


def build_messages(spec: PromptSpec, tpl: PromptTemplates,
                   refinement: list[tuple[Box, float, float | None]] | None = None) -> list[Message]:
    """The conversation for one round; `refinement` = [(box px, score, s), ...]: each candidate
    is shown as its region of the query image, then its box and score. Every image part carries
    a name (the example's path, the query's, the crop's box) for saved prompts."""
    task = spec.task.value
    ratio = str(spec.ratio) if spec.ratio else ""
    subject = _norm_str(spec.subject, spec.width, spec.height) if spec.subject is not None else ""
    instruction = _fill(getattr(tpl, f"instruction_{task}"))
    if any(s is None for ex in spec.examples for _, s in ex.crops):
        instruction += _fill(tpl.unscored_note, s=tpl.unscored_s)
    parts: list[str | ImagePart] = [instruction]
    if not spec.examples:
        parts.append("\n" + tpl.zero_shot_note)
    for i, ex in enumerate(spec.examples, 1):
        parts.append(ImagePart(ex.image, ex.uuid, name=f"example {i}: {ex.name or ex.uuid or 'image'}"))
        parts.append(_fill(getattr(tpl, f"example_{task}"), boxes=_example_boxes(ex, task, tpl)))
    parts.append(ImagePart(spec.query_image, spec.query_uuid, name=f"query: {spec.query_name or 'image'}"))
    n = spec.n_boxes
    parts.append(_fill(getattr(tpl, f"query_{task}"), n=n, regions=regions(n, tpl), ratio=ratio,
                       subject=subject))
    if refinement:
        parts.append(tpl.refine_intro)
        for k, (box, score, s) in enumerate(refinement, 1):
            px = tuple(box.as_int())
            parts.append(ImagePart(spec.query_image, None, px,
                                   name=f"candidate {k}: the query cropped to {list(px)} px"))
            parts.append(_fill(tpl.refine_candidate,
                               box=fmt_box(box.to_norm(spec.width, spec.height), s, tpl.unscored_s),
                               score=f"{score:.3f}"))
        parts.append(_fill(tpl.refine_ask) if n == 1 else _fill(tpl.refine_ask_many, n=n))
    return [Message("user", _merge_text(parts))]


def render_text(conversation: list[Message]) -> str:
    """A conversation as the text the VLM reads, each image named where it stands as
    `<image: NAME>` (the backend's chat template adds role markers and image tokens)."""
    out = []
    for msg in conversation:
        for p in msg.content:
            out.append(p if isinstance(p, str) else f"<image: {p.name or 'unnamed'}>")
    return "".join(out)


def _merge_text(parts: list[str | ImagePart]) -> list[str | ImagePart]:
    out: list[str | ImagePart] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + p
        else:
            out.append(p)
    return out
