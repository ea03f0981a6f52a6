"""The VLM loop at the shipped defaults on every registry model's `--like` tiny (real tokenizer
rules, tokens per image, context, rope and sliding window; tiny sizes): S=30 examples with T=5 crops
each, R=6, L=2, and no test override of anything the engine sets (max_new_tokens included), through
the engine's own model loading. Every row must be `vlm`, none cut at the token limit, and every
prompt within the real model's context. Prompts here are of real length (~6-7k tokens for
Mantis: 31 images x 66 tokens and 150 boxes of ~27 tokens), so they cross Mistral's real window."""

from __future__ import annotations

import pytest
from photos import photo_examples

from cropper_engine.models.sheets import load_sheet
from cropper_engine.models.tiny_vlm import LIKE_NAMES
from cropper_engine.types import CropRequest, Task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def index_30x5(tmp_path_factory, tiny_clip):
    """36 photos (random colour fields, sizes varying) with 5 ground-truth crops and MOS each."""
    from cropper_engine.index.store import ExampleIndex

    out = tmp_path_factory.mktemp("idx30") / "index"
    ExampleIndex.build(photo_examples(tmp_path_factory.mktemp("photos30")), tiny_clip, out)
    return out


def _crop_at_defaults(model_dir, tiny_clip, index_dir, photos, backend: str, context: int):
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.index.store import ExampleIndex

    cfg = load_config(env={}, overrides={"vlm.model": str(model_dir), "vlm.backend": backend})
    assert (cfg.retrieval.examples, cfg.retrieval.crops, cfg.vlm.candidates, cfg.vlm.rounds) == (30, 5, 6, 2)
    cropper = Cropper.from_config(cfg, embedder=tiny_clip, index=ExampleIndex.load(index_dir, embedder=tiny_clip))
    prompts: list[int] = []
    generate = cropper.vlm.generate

    count = getattr(cropper.vlm, "count_prompt_tokens", None)

    def recording(convs, params):  # the real generate; records each prompt's length
        if count is not None:  # a prompt past the context fails here, before it is run (memory)
            for conv in convs:
                n = count(conv)
                assert n <= context, f"a prompt of {n} tokens was sent to a model of context {context}"
        gens = generate(convs, params)
        prompts.extend(g.prompt_tokens for g in gens)
        return gens

    cropper.vlm.generate = recording
    outs = cropper.crop_batch([CropRequest(photos[0], Task.FREE), CropRequest(photos[1], Task.FREE)])
    return [r for out in outs for r in out], prompts, cropper


@pytest.mark.parametrize("name", LIKE_NAMES)
def test_defaults_on_the_transformers_backend(name, tmp_path_factory, tiny_clip, index_30x5, photos):
    import torch

    from cropper_engine.models.tiny_vlm import make_tiny_like

    sheet = load_sheet(name)
    model_dir = make_tiny_like(tmp_path_factory.mktemp("like") / name, name)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, prompts, _ = _crop_at_defaults(model_dir, tiny_clip, index_30x5, photos, "transformers",
                                             sheet["config"]["text"]["context"])
    finally:
        torch.set_num_threads(before)
    assert len(rows) == 2
    for r in rows:
        assert r.pipeline == "vlm", (r.pipeline, r.notes)
        assert not any("cut at the token limit" in n for n in r.notes), r.notes
        assert {c.round for c in r.candidates} >= {0}
    assert prompts and max(prompts) <= sheet["config"]["text"]["context"], (max(prompts), sheet["config"]["text"])
    print(f"{name}: {len(prompts)} prompts of {min(prompts)}..{max(prompts)} tokens; notes {rows[0].notes}")
    if sheet["family"] == "idefics2":  # real-length prompts: the first round already crosses the 4096 window
        assert max(prompts) > sheet["config"]["text"]["sliding_window"]
