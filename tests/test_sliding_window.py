"""Mistral's sliding window (Mantis / idefics2: 4096) in the transformers backend's tree decode,
KV slab and prefix store, on the tiny Idefics2 with a window of 16 tokens: prompts and answers
cross it, and every path gives what the model run alone gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_vlm_transformers import _conversation, _image

from cropper_engine.engine.grammar import BoxGrammar, parse_boxes
from cropper_engine.models.base import GenerationParams, ImagePart, Message

WINDOW = 16


@pytest.fixture(scope="module")
def windowed(tiny_dir, tmp_path_factory):
    from cropper_engine.models.vlm_transformers import TransformersVLM

    out = tmp_path_factory.mktemp("windowed") / "idefics2"
    shutil.copytree(tiny_dir / "idefics2", out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["sliding_window"] = WINDOW
    (out / "config.json").write_text(json.dumps(config))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TransformersVLM(str(out), device="cpu", batch_size=8)
    torch.set_num_threads(before)


def _alone(vlm, conv, tokens):
    """Next-token logits of the prompt + `tokens`, run through the model alone (no cache)."""
    inputs = vlm._inputs([conv])
    ids = inputs["input_ids"]
    full = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        return vlm.model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False,
                         **extra).logits[0, -1].float()


def test_the_window_is_read_and_matters(windowed):
    assert windowed.window == WINDOW
    conv = _conversation(3, seed=1)
    assert windowed.count_prompt_tokens(conv) > 4 * WINDOW
    inputs = windowed._inputs([conv])
    with torch.inference_mode():
        ref = _alone(windowed, conv, [])
        windowed.model.config.text_config.sliding_window = None
        try:
            full = windowed.model(**inputs, use_cache=False).logits[0, -1].float()
        finally:
            windowed.model.config.text_config.sliding_window = WINDOW
    assert not torch.allclose(ref, full, atol=1e-3), "the window must change the logits"


def test_tree_branches_equal_the_model_alone_past_the_window(windowed):
    convs = [_conversation(k, seed=80 + k) for k in (3, 1)]  # a padded batch, prompts > the window
    params = GenerationParams(n=6, max_new_tokens=2 * WINDOW, temperature=1.0, seed=2)  # free text: long answers
    windowed._trace = []
    try:
        gens = windowed.generate(convs, params)
        trace = windowed._trace
    finally:
        windowed._trace = None
    assert windowed.sampling == "grouped", "grouped sampling must not fall back"
    assert all(len(g.texts) == 6 for g in gens)
    long = [t for t in trace if len(t[1]) > WINDOW]  # answers longer than the window itself
    assert long, "some branches should outgrow the window"
    picked = long[::7] + [t for t in trace if 2 <= len(t[1]) <= 4][::5]
    for prompt, toks, logits in picked:
        ref = _alone(windowed, convs[prompt], toks)
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (prompt, len(toks), (logits - ref).abs().max())


def test_greedy_equals_generate_past_the_window(windowed):
    convs = [_conversation(k, seed=90 + k) for k in (1, 3)]
    params = GenerationParams(n=1, max_new_tokens=2 * WINDOW, temperature=0.0, seed=0)
    ours = windowed.generate(convs, params)
    try:
        windowed.sampling = "hf"
        theirs = windowed.generate(convs, params)
    finally:
        windowed.sampling = "grouped"
    assert [g.texts for g in ours] == [g.texts for g in theirs]
    assert ours[0].generated_tokens > WINDOW  # the answers themselves cross the window
    constrained = GenerationParams(n=1, max_new_tokens=windowed.answer_token_limit(BoxGrammar(2)),
                                   temperature=0.0, grammar=BoxGrammar(2))
    ours = windowed.generate(convs, constrained)
    assert all(parse_boxes(g.texts[0].strip(), BoxGrammar(2)) for g in ours)


def test_prefix_store_serves_a_refinement_prompt_past_the_window(windowed):
    """Round 0 is stored with all its KV; a refinement prompt extending it runs only its new
    tokens on top (a padding gap between prefix and rest) and gets the model-alone logits."""
    first = _conversation(3, seed=7)
    refine = [Message("user", [*first[0].content, "\nCandidates:", ImagePart(_image(99, 120, 90)),
                               "\n(4.5, 10, 20, 300, 400) scored 0.7\nPropose better crops."])]
    other = _conversation(1, seed=8)  # in the same batch: a row without a stored prefix
    params = GenerationParams(n=2, max_new_tokens=6, temperature=1.0, seed=1, grammar=BoxGrammar(1))
    windowed.generate([first], params)
    reused = windowed.prefix_tokens_reused
    entry = next(reversed(windowed.prefix_store.entries.values()))
    assert all(k.shape[1] == len(entry.ids) for k, _ in entry.kv), "stored KV shorter than its ids"
    windowed._trace = []
    try:
        windowed.generate([refine, other], params)
        trace = windowed._trace
    finally:
        windowed._trace = None
    assert windowed.prefix_tokens_reused - reused > 2 * WINDOW
    for prompt, toks, logits in [t for t in trace if len(t[1]) <= 2]:
        ref = _alone(windowed, [refine, other][prompt], toks)
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (prompt, toks, (logits - ref).abs().max())
