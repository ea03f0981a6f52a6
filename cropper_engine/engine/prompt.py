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
    "s is MOS score, from 1 (poor) to 5 (excellent)."
)


@dataclass(frozen=True)
class PromptTemplates:
    """Every piece of prompt text; a TOML file can override any of them (`load_templates`).

    Placeholders: {aspect} (a width / height ratio, 2 decimals: an example crop's own, or the
    target's in the query line and the refinement request), {subject} (a subject box x1, y1, x2,
    y2 in 1..1000), {boxes}, {box}, {score}, {n} (boxes asked for), {regions} (`regions_one`, or
    `regions_many` with {n} filled), {s} (`unscored_s`), {scorer} (what the scores measure).

    One scale for every s and score: a MOS from 1 (poor) to 5 (excellent), said once, in the
    instruction. `unscored_s` is the one constant a prompt may show: the s of a ground-truth crop
    whose dataset has no MOS (FCDB, SACD); `unscored_note` then tells the model so.
    """

    instruction_free: str = "Localize the aesthetic part of the image. " + _COORDS
    instruction_subject: str = "Localize the aesthetic part of the image that keeps the subject. " + \
        _COORDS + " The subject is given as a box (x1, y1, x2, y2) in the same coordinates, and each " \
        "crop keeps its subject."
    instruction_ratio: str = "Localize the aesthetic part of the image with the given aspect ratio " \
        "(width / height). " + _COORDS
    # when examples follow: the paper's words (and, in the ratio task, what follows each crop)
    examples_note_free: str = " We provide several images here."
    examples_note_subject: str = " We provide several images here."
    examples_note_ratio: str = " We provide several images here. Each example crop is followed by its own " \
        "aspect ratio."
    unscored_s: str = "5"
    unscored_note: str = " Crops from datasets without MOS are shown with s = {s}."
    instruction_end: str = "\n"
    example_free: str = "\n{boxes}\n"
    example_subject: str = "\n{boxes}\n"
    example_ratio: str = "\n{boxes}\n"
    box_free: str = "{box}"
    box_ratio: str = "{box} aspect ratio {aspect}"
    subject_group: str = "Subject ({subject}): {boxes}"  # the crops of one subject of an example
    subject_group_sep: str = ". "
    # the query line (shared by every round) and round 0's request after it
    query_free: str = "\nQuery image."
    query_subject: str = "\nQuery image. Subject ({subject})."
    query_ratio: str = "\nQuery image. Aspect ratio {aspect}."
    ask_free: str = " Answer with {regions}.\n"
    ask_subject: str = " Answer with {regions}; each keeps the subject.\n"
    ask_ratio: str = " Answer with {regions}, with that aspect ratio.\n"
    regions_one: str = "one region as (s, x1, y1, x2, y2)"
    regions_many: str = "{n} different regions, each as (s, x1, y1, x2, y2), separated by commas"
    # refinement rounds: the crops the scorer measured, each with the box it measured and its score
    refine_intro: str = "\nHere are crops of the query image with their regions; s and Score are each crop's " \
        "rating by {scorer}.\n"
    refine_candidate: str = "\n{box}, Score is {score}\n"
    refine_ask: str = "Propose similar crop that has high score. The region should be represented " \
        "by (s, x1, y1, x2, y2)."  # the paper's words, when one box is asked for
    refine_ask_many: str = "Propose {n} different similar crops that have high scores. The regions " \
        "should be represented by (s, x1, y1, x2, y2), separated by commas."
    keep_subject_one: str = " It keeps the subject."
    keep_subject_many: str = " Each keeps the subject."
    keep_ratio_one: str = " It has the aspect ratio {aspect}."
    keep_ratio_many: str = " Each has the aspect ratio {aspect}."


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
    """A crop's own aspect ratio, width / height in pixels, 2 decimals."""
    return f"{box.width / box.height:.2f}" if box.height > 0 else "0"


def fmt_ratio(ratio: Ratio) -> str:
    """A target ratio as the examples' crops show theirs: width / height, 2 decimals (16:9 -> 1.78)."""
    return f"{ratio.value:.2f}"


def mos_scale(score: float) -> float:
    """A scorer total (0..1) on the prompt's one scale, a MOS from 1 to 5."""
    return 1.0 + 4.0 * min(max(float(score), 0.0), 1.0)


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
                   refinement: list[tuple[Box, float, float | None]] | None = None,
                   scorer: str = "aesthetics and area") -> list[Message]:
    """The conversation for one round. Round 0: instruction, examples, query, the request.
    A refinement round: the same up to the query line, then `refinement` = [(box px, score 0..1,
    unused), ...], each the box the scorer measured, shown as that region of the query image with
    the box and its score (both on the MOS scale), then the request with the task's constraint.
    `scorer` says what the scores measure. Every template may use every placeholder (a filled
    one it does not use is ignored). Every image part carries a name (the example's path, the
    query's, the crop's box) for saved prompts."""
    task = spec.task.value
    n = spec.n_boxes
    ph = {"n": n, "regions": regions(n, tpl), "aspect": fmt_ratio(spec.ratio) if spec.ratio else "",
          "subject": _norm_str(spec.subject, spec.width, spec.height) if spec.subject is not None else "",
          "s": tpl.unscored_s, "scorer": scorer}
    instruction = _fill(getattr(tpl, f"instruction_{task}"), **ph)
    if spec.examples:
        instruction += _fill(getattr(tpl, f"examples_note_{task}"), **ph)
    if any(s is None for ex in spec.examples for _, s in ex.crops):
        instruction += _fill(tpl.unscored_note, **ph)
    parts: list[str | ImagePart] = [instruction + tpl.instruction_end]
    for i, ex in enumerate(spec.examples, 1):
        parts.append(ImagePart(ex.image, ex.uuid, name=f"example {i}: {ex.name or ex.uuid or 'image'}"))
        parts.append(_fill(getattr(tpl, f"example_{task}"), **ph, boxes=_example_boxes(ex, task, tpl)))
    parts.append(ImagePart(spec.query_image, spec.query_uuid, name=f"query: {spec.query_name or 'image'}"))
    parts.append(_fill(getattr(tpl, f"query_{task}"), **ph))
    if not refinement:
        parts.append(_fill(getattr(tpl, f"ask_{task}"), **ph))
        return [Message("user", _merge_text(parts))]
    parts.append(_fill(tpl.refine_intro, **ph))
    for k, (box, score, _) in enumerate(refinement, 1):
        px = tuple(box.as_int())
        parts.append(ImagePart(spec.query_image, None, px,
                               name=f"candidate {k}: the query cropped to {list(px)} px"))
        mos = mos_scale(score)
        parts.append(_fill(tpl.refine_candidate, **ph, box=fmt_box(box.to_norm(spec.width, spec.height), mos),
                           score=fmt_score(mos)))
    ask = _fill(tpl.refine_ask if n == 1 else tpl.refine_ask_many, **ph)
    if task == "subject":
        ask += _fill(tpl.keep_subject_one if n == 1 else tpl.keep_subject_many, **ph)
    elif task == "ratio":
        ask += _fill(tpl.keep_ratio_one if n == 1 else tpl.keep_ratio_many, **ph)
    parts.append(ask)
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
