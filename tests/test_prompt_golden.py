"""What the VLM is shown, word for word: the prompts of each task (round 0 and a refinement round)
and of S=0, rendered with each image named where it stands, against the committed files in
tests/golden/prompts/. Any change to what the model reads is a visible diff there; after a
deliberate change, `CROPPER_UPDATE_GOLDEN=1 pytest tests/test_prompt_golden.py` rewrites them."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
from PIL import Image

from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates, render_text
from cropper_engine.models.scorers import FusedScorer
from cropper_engine.types import Box, Ratio, Task

GOLDEN = Path(__file__).parent / "golden" / "prompts"
UPDATE = bool(os.environ.get("CROPPER_UPDATE_GOLDEN"))  # read at import: the tests run without CROPPER_*
RATIO = Ratio(16, 9)


def _spec(task: Task, n_examples: int = 2) -> PromptSpec:
    """Two examples of 640 x 480, a crop with MOS and one without each; per-crop subject boxes that
    differ in the subject task; the query 800 x 600 with a subject box; R=6 in one answer."""
    img = Image.new("RGB", (64, 48))
    crops = [(Box(0, 0, 320, 240), 4.5), (Box(64, 48, 640, 480), None)]
    subjects = [Box(64, 48, 320, 240), Box(320, 240, 576, 432)] if task is Task.SUBJECT else None
    exs = [PromptExample(img, 640, 480, crops, f"u{i}", subjects, f"/data/ex{i}.jpg") for i in range(n_examples)]
    return PromptSpec(task, img, 800, 600, exs, 6, RATIO if task is Task.RATIO else None,
                      Box(80, 60, 400, 300) if task is Task.SUBJECT else None, query_name="/photos/q.jpg")


REFINE = [(Box(0, 0, 400, 300), 0.71234, 4.0), (Box(100, 50, 700, 560), 0.5, None)]
CASES = {f"{t.value}_round0": (t, 2, None) for t in Task} | {f"{t.value}_refine": (t, 2, REFINE) for t in Task} | \
    {f"{t.value}_s0": (t, 0, None) for t in Task}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_prompt_word_for_word(name):
    task, n_examples, refine = CASES[name]
    words = FusedScorer().prompt_words(task)  # no CLIP, no aesthetic head: the stand-in named
    text = render_text(build_messages(_spec(task, n_examples), load_templates(None), refine, words))
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text)
    want = path.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now"))
    assert text == want, f"the prompt changed (CROPPER_UPDATE_GOLDEN=1 rewrites {path.name}):\n{diff}"


def test_no_prompt_says_both_examples_and_none():
    for task in Task:
        for n in (0, 2):
            text = render_text(build_messages(_spec(task, n), load_templates(None)))
            assert ("several images" in text) == (n > 0)
            assert "No example images" not in text


def test_the_refinement_asks_once_with_the_tasks_constraint():
    for task in Task:
        text = render_text(build_messages(_spec(task), load_templates(None), REFINE))
        assert text.count("Answer with") == 0 and text.count("Propose") == 1
        assert text.rstrip().endswith({Task.FREE: "separated by commas.", Task.SUBJECT: "Each keeps the subject.",
                                       Task.RATIO: "Each has the aspect ratio 1.78."}[task])
        # one notation for ratios: width / height, 2 decimals, in the query line and the request alike
        assert ("16:9" not in text) and (text.count("1.78") == (2 if task is Task.RATIO else 0))
