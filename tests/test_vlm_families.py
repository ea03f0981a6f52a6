"""The transformers backend on the registry's other families, each a tiny random model built
offline in about a second: Idefics3 (SmolVLM-style) and Qwen2.5-VL (multimodal rotary positions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cropper_engine.engine.grammar import BoxGrammar, parse_boxes
from cropper_engine.models.base import GenerationParams, ImagePart, Message
from cropper_engine.types import CropRequest, Task

FAMILIES = ("idefics3", "qwen2_5_vl")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from cropper_engine.models.tiny_vlm import make_tiny_idefics3, make_tiny_qwen2_5_vl

    out = tmp_path_factory.mktemp("families")
    return {"idefics3": make_tiny_idefics3(out / "idefics3"), "qwen2_5_vl": make_tiny_qwen2_5_vl(out / "qwen2_5_vl")}


@pytest.fixture(scope="module")
def vlms(family_dirs):
    import torch

    from cropper_engine.models.vlm_transformers import TransformersVLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads
    yield {name: TransformersVLM(str(path), device="cpu", batch_size=4) for name, path in family_dirs.items()}
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _conversation(n_images: int, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    parts: list = ["Localize the aesthetic part of the image."]
    for j in range(n_images):
        w, h = (int(v) for v in rng.integers(40, 300, size=2))  # sizes differ: different token counts (Qwen)
        parts += [ImagePart(_image(seed * 100 + j, w, h), uuid=f"img-{seed}-{j}"),
                  f"\n(4.5, {j + 1}, 20, 300, 1000)\n"]
    return [Message("user", parts)]


def test_builders_write_consistent_folders(family_dirs, vlms):
    from transformers import AutoProcessor

    conv = [Message("user", ["Hi.", ImagePart(_image(1, 80, 60)), "\nNow?"])]
    for name, path in family_dirs.items():
        config = json.loads((path / "config.json").read_text())
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        tok = processor.tokenizer
        assert len(tok) == config["text_config"]["vocab_size"] == 1000, name
        assert config["image_token_id"] == tok.convert_tokens_to_ids(processor.image_token), name
        assert sum(p.stat().st_size for p in path.iterdir()) / 1e6 < 20, name
        vlm = vlms[name]
        text, images = vlm.render(conv)
        assert len(images) == 1
        ids = vlm._inputs([conv])["input_ids"][0].tolist()
        n_image = ids.count(config["image_token_id"])
        if name == "idefics3":  # SmolVLM-Instruct's format; one 112 px tile = 16 tokens, no splitting
            assert text == "<|im_start|>User: Hi.<image>\nNow?<end_of_utterance>\nAssistant:"
            assert processor.image_processor.do_image_splitting is False and n_image == 16
            # only SmolVLM-Instruct's added tokens; '<global-img>' is text, 5 tokens as SmolLM2's
            assert tok.convert_ids_to_tokens([997, 998, 999]) == ["<fake_token_around_image>", "<image>",
                                                                  "<end_of_utterance>"]
            assert "<global-img>" not in tok.get_vocab() and "<row_1_col_1>" not in tok.get_vocab()
            tag = tok("<global-img>", add_special_tokens=False)["input_ids"]
            assert [tok.decode([i]) for i in tag] == ["<", "global", "-", "img", ">"]
            fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
            start = ids.index(fake)
            assert ids[start + 1:start + 6] == tag and ids[start + 6:start + 22] == [config["image_token_id"]] * 16
            assert vlm.image_tokens == 1 + 5 + 16 + 1
            assert vlm.eos_token_ids[0] == tok.convert_tokens_to_ids("<end_of_utterance>")
        else:  # Qwen2.5-VL-Instruct's format; 80 x 60 px -> 84 x 56: a 3 x 2 grid of 28 px tokens
            assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                            "Hi.<|vision_start|><|image_pad|><|vision_end|>\nNow?<|im_end|>\n"
                            "<|im_start|>assistant\n")
            assert n_image == 6
            assert vlm.eos_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
            assert vlm.image_edge is None and vlm._fit.max_pixels == 16 * 28 * 28  # an area budget, not an edge


def test_builders_are_deterministic(family_dirs, tmp_path):
    from cropper_engine.models.tiny_vlm import make_tiny_idefics3, make_tiny_qwen2_5_vl

    for name, build in (("idefics3", make_tiny_idefics3), ("qwen2_5_vl", make_tiny_qwen2_5_vl)):
        again = build(tmp_path / name, seed=0)
        for f in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (again / f).read_bytes() == (family_dirs[name] / f).read_bytes(), (name, f)


def test_box_grammar_samples_parse(vlms, family):
    """n=3 samples for each of 2 multi-image conversations, all boxes under the grammar."""
    vlm = vlms[family]
    grammar = BoxGrammar(boxes=3)
    convs = [_conversation(2, seed=10), _conversation(3, seed=11)]
    params = GenerationParams(n=3, max_new_tokens=120, temperature=1.0, top_p=1.0, seed=3, grammar=grammar)
    gens = vlm.generate(convs, params)
    assert vlm.sampling == "grouped"  # no fallback was needed
    assert len(gens) == 2
    for gen, conv in zip(gens, convs, strict=True):
        assert len(gen.texts) == 3
        for text in gen.texts:
            boxes = parse_boxes(text.strip(), grammar)
            assert boxes is not None and len(boxes) == 3, text
        assert gen.prompt_tokens == vlm.count_prompt_tokens(conv)
        assert 0 < gen.generated_tokens < 3 * 120


def test_greedy_equals_generate(vlms, family):
    """Greedy answers of the tree decoder are transformers' own greedy answers (for Qwen2.5-VL
    only with its 3-D rotary positions: with 1-D ones three of these four answers differ)."""
    vlm = vlms[family]
    convs = [_conversation(k, seed=40 + k) for k in (1, 3, 2, 2)]
    params = GenerationParams(n=1, max_new_tokens=24, temperature=0.0, seed=0)
    ours = vlm.generate(convs, params)
    again = vlm.generate(convs, params)  # Idefics3: image features from the cache, prompts from the prefix store
    try:
        vlm.sampling = "hf"
        theirs = vlm.generate(convs, params)
    finally:
        vlm.sampling = "grouped"
    assert [g.texts for g in ours] == [g.texts for g in theirs] == [g.texts for g in again]
    if family == "idefics3":
        assert vlm._features_supported() and vlm.image_cache_hits > 0 and vlm.prefix_tokens_reused > 0
    else:
        assert not vlm._features_supported() and vlm.prefix_tokens_reused == 0


def test_tree_branches_match_the_model_alone(vlms, family):
    """Each row of a sampled tree decode gets the logits of its prompt + its own tokens run through
    the model alone (positions included: the model computes its own for the whole sequence)."""
    import torch

    vlm = vlms[family]
    convs = [_conversation(k, seed=60 + k) for k in (2, 1)]  # padded batch: prompts of two lengths
    params = GenerationParams(n=4, max_new_tokens=6, temperature=1.0, seed=2, grammar=BoxGrammar(1))
    vlm._trace = []
    try:
        vlm.generate(convs, params)
        trace = vlm._trace
    finally:
        vlm._trace = None
    branched = [t for t in trace if len(t[1]) >= 3]
    assert branched
    inputs = [vlm._inputs([c]) for c in convs]
    for prompt, toks, logits in branched[::2][:4]:
        ids = inputs[prompt]["input_ids"]
        add = torch.tensor([toks], dtype=ids.dtype)
        full = torch.cat([ids, add], dim=1)
        extra = {k: v for k, v in inputs[prompt].items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(add)], dim=1)
        with torch.inference_mode():
            ref = vlm.model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0, -1].float()
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (prompt, toks, (logits - ref).abs().max())


def test_gqa_attention_equals_stock_attention(vlms, family_dirs, family):
    """The CPU attention that reads grouped K/V in place (also routed to the vision towers) gives
    the stock attention's logits and samples."""
    import torch

    from cropper_engine.models.vlm_transformers import TransformersVLM

    vlm = vlms[family]
    stock = TransformersVLM(family_dirs[family], device="cpu", attention="stock")
    assert vlm.attention == "cropper_sdpa_gqa" and stock.attention == "stock"
    convs = [_conversation(k, seed=50 + k) for k in (1, 2)]  # padded batch
    inputs = vlm._inputs(convs)
    with torch.inference_mode():
        assert torch.allclose(vlm.model(**inputs).logits, stock.model(**inputs).logits, atol=1e-5, rtol=1e-5)
    params = GenerationParams(n=3, max_new_tokens=16, temperature=1.0, seed=9)
    assert [g.texts for g in vlm.generate(convs, params)] == [g.texts for g in stock.generate(convs, params)]


def test_loop_crops_with_the_vlm(vlms, family, photos, tiny_clip, example_index):
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.index.store import ExampleIndex

    cfg = load_config(env={}, overrides={"retrieval.examples": 3, "vlm.candidates": 3, "vlm.rounds": 1})
    cropper = Cropper.from_config(cfg, embedder=tiny_clip, index=ExampleIndex.load(example_index, embedder=tiny_clip),
                                  vlm=vlms[family])
    outs = cropper.crop_batch([CropRequest(photos[0], Task.FREE), CropRequest(photos[1], Task.RATIO, ["1:1"])])
    rows = [r for out in outs for r in out]
    assert len(rows) == 2
    assert all(r.pipeline == "vlm" for r in rows), [(r.pipeline, r.notes) for r in rows]
    for r in rows:
        assert r.box.is_valid() and r.box.x2 <= r.width and r.box.y2 <= r.height
        assert {c.round for c in r.candidates} == {0, 1}
        assert r.extra["tokens"]["generated"] > 0
    assert vlms[family].sampling == "grouped"
