"""The token budget (engine/budget.py): S is lowered for a request whose prompts would not fit
the model's context, on the tiny Idefics2 with a context made small for the test."""

from __future__ import annotations

import pytest

from cropper_engine.config import load_config
from cropper_engine.engine.budget import SLACK, fit_to_context
from cropper_engine.engine.grammar import BoxGrammar
from cropper_engine.engine.loop import Cropper
from cropper_engine.engine.prompt import PromptExample, PromptSpec, PromptTemplates
from cropper_engine.types import Box, CropRequest, Task


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from cropper_engine.models.vlm_transformers import TransformersVLM

    return TransformersVLM(str(tiny_dir / "idefics2"), device="cpu", batch_size=4)


def _spec(images, s):
    from PIL import Image

    examples = []
    for i, p in enumerate(images[:s]):
        im = Image.open(p).convert("RGB")
        examples.append(PromptExample(im, *im.size, [(Box(10, 10, 200, 150), 4.2)], f"ex-{i}"))
    query = Image.open(images[0]).convert("RGB")
    return PromptSpec(Task.FREE, query, *query.size, examples, query_uuid="q")


def test_the_estimate_is_the_processor_count(tiny, photos):
    from cropper_engine.engine.prompt import build_messages

    spec = _spec(photos, 3)
    for refine in (None, [(Box(0, 0, spec.width, spec.height), 0.999, 4.99)] * 3):
        conv = build_messages(spec, PromptTemplates(), refine)
        assert tiny.prompt_token_estimate(conv) == tiny.count_prompt_tokens(conv)
    assert tiny.image_tokens == 10  # <fake> + 8 perceiver latents + <fake>, measured


def test_fit_lowers_s_only_when_needed(tiny, photos):
    spec = _spec(photos, 3)
    tpl = PromptTemplates()
    same, note = fit_to_context(spec, tpl, tiny, candidates=3, rounds=2, answer_tokens=33)
    assert same is spec and note is None  # 8192 tokens: plenty
    need = [fit_need(tiny, spec, k) for k in range(4)]
    assert need[1] < need[2] < need[3]  # (S=0 adds a zero-shot note instead)
    tiny.context_length = need[1] + 33
    try:
        fitted, note = fit_to_context(spec, tpl, tiny, candidates=3, rounds=2, answer_tokens=33)
    finally:
        tiny.context_length = 8192
    assert len(fitted.examples) == 1 and "S lowered from 3 to 1" in note
    assert fitted.examples[0] is spec.examples[0]  # the most similar kept


def fit_need(vlm, spec, k):
    import dataclasses

    from cropper_engine.engine.prompt import build_messages

    s = dataclasses.replace(spec, examples=spec.examples[:k])
    w, h = spec.width, spec.height
    refine = [(Box(0.123 * w, 0.234 * h, 0.876 * w, 0.987 * h), 0.9975, None)] * 3  # scores shown as 4.99
    return vlm.prompt_token_estimate(build_messages(s, PromptTemplates(), refine)) + 3 * SLACK


def test_a_long_prompt_runs_with_fewer_examples_not_the_fallback(tiny, photos, tiny_clip, example_index):
    from cropper_engine.index.store import ExampleIndex

    cfg = load_config(env={}, overrides={"retrieval.examples": 3, "vlm.candidates": 3, "vlm.rounds": 2})
    idx = ExampleIndex.load(example_index, embedder=tiny_clip)
    cropper = Cropper.from_config(cfg, embedder=tiny_clip, index=idx, vlm=tiny)
    full = cropper.crop_batch([CropRequest(photos[1], Task.FREE)])[0][0]
    longest = max(t["prompt"] for t in full.extra["tokens_by_round"])
    tiny.context_length = longest - 5  # S=3 no longer fits
    try:
        outs = cropper.crop_batch([CropRequest(p, Task.FREE) for p in photos[:3]])
    finally:
        tiny.context_length = 8192
    for out in outs:
        row = out[0]
        assert row.pipeline == "vlm", row.notes
        assert any("S lowered from 3 to" in n for n in row.notes), row.notes
        limit = cropper.answer_limit(BoxGrammar(1))
        rounds = row.extra["tokens_by_round"]
        assert all(t["prompt"] + limit <= longest - 5 for t in rounds), (longest, limit, rounds)
