"""The transformers VLM backend on a tiny random Idefics2 built offline (seconds, about 12 MB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cropper_engine.engine.grammar import BoxGrammar, parse_boxes
from cropper_engine.errors import ModelNotFoundError
from cropper_engine.models.base import GenerationParams, ImagePart, Message

IMAGE_TOKENS = 10  # <fake> + 8 x <image> + <fake>: perceiver latents + 2


@pytest.fixture(scope="session")
def idefics2_dir(tiny_dir):
    """The tiny Idefics2 that conftest's `tiny_dir` builds once per session (seed 0)."""
    return tiny_dir / "idefics2"


@pytest.fixture(scope="session")
def vlm(idefics2_dir):
    import torch

    from cropper_engine.models.vlm_transformers import TransformersVLM

    # Tiny models gain nothing from threads; on a busy machine spinning threads cost more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TransformersVLM(str(idefics2_dir), device="cpu", batch_size=8)
    torch.set_num_threads(before)


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _conversation(n_images: int, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    parts: list = ["Localize the aesthetic part of the image."]
    for j in range(n_images):
        w, h = (int(v) for v in rng.integers(40, 300, size=2))  # sizes differ: pixel padding in batches
        parts += [ImagePart(_image(seed * 100 + j, w, h)), f"\n(4.5, {j + 1}, 20, 300, 1000)\n"]
    return [Message("user", parts)]


def test_builder_folder_is_consistent(idefics2_dir):
    from transformers import AutoProcessor

    config = json.loads((idefics2_dir / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(idefics2_dir, local_files_only=True)
    tok = processor.tokenizer
    assert len(tok) == config["text_config"]["vocab_size"]
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<image>")
    assert config["perceiver_config"]["resampler_n_latents"] == processor.image_seq_len == 8
    gen = json.loads((idefics2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.eos_token_id]
    assert processor.image_processor.do_image_splitting is False
    size_mb = sum(p.stat().st_size for p in idefics2_dir.iterdir()) / 1e6
    assert 5 < size_mb < 20
    # Numbers split into digit groups, SentencePiece spaces, newlines as byte tokens.
    pieces = tok.convert_ids_to_tokens(tok("(4.5, 12, 870, 1000)\n", add_special_tokens=False).input_ids)
    assert "<0x0A>" in pieces and any(p.startswith("▁") for p in pieces)


def test_builder_is_deterministic(idefics2_dir, tmp_path):
    from cropper_engine.models.tiny_vlm import make_tiny_idefics2

    again = make_tiny_idefics2(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (idefics2_dir / name).read_bytes(), name


def test_render_and_token_counts(vlm):
    conv = [Message("user", ["Hello.", ImagePart(_image(1, 80, 60)), "\n(4.5, 1, 2, 3, 4)",
                             ImagePart(_image(2, 60, 90)), "\nNow?"])]
    text, images = vlm.render(conv)
    assert text == ("User: Hello.<image>\n(4.5, 1, 2, 3, 4)<image>\nNow?<end_of_utterance>\nAssistant:")
    assert len(images) == 2
    assert vlm.render([Message("user", [ImagePart(_image(1, 80, 60)), "\nQ"])])[0].startswith("User:<image>")
    # Each image adds 10 tokens (and its caption the same number each time).
    counts = [vlm.count_prompt_tokens(_conversation(k)) for k in (1, 2, 3)]
    text_only = vlm.count_prompt_tokens([Message("user", ["Localize the aesthetic part of the image."])])
    assert counts[2] - counts[1] == counts[1] - counts[0] > IMAGE_TOKENS
    assert counts[0] - text_only > IMAGE_TOKENS
    ids = list(vlm.processor(text=[text], images=[images])["input_ids"][0])
    assert ids.count(vlm.model.config.image_token_id) == 2 * 8
    assert ids.count(vlm.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")) == 4
    assert len(ids) == vlm.count_prompt_tokens(conv)


def test_batched_equals_single_greedy(vlm):
    """Left padding (text and pixels) must not change greedy tokens: attention masks are passed.

    Exact equality holds in fp32 here; no tolerance is needed.
    """
    convs = [_conversation(k, seed=k) for k in (1, 2, 3)]
    params = GenerationParams(n=1, max_new_tokens=16, temperature=0.0, seed=0)
    batched = vlm.generate(convs, params)
    alone = [vlm.generate([c], params)[0] for c in convs]
    assert [g.texts for g in batched] == [g.texts for g in alone]
    assert [g.generated_tokens for g in batched] == [g.generated_tokens for g in alone]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in alone]
    assert [g.prompt_tokens for g in batched] == [vlm.count_prompt_tokens(c) for c in convs]
    # Greedy with n > 1: n copies of the one greedy text.
    copies = vlm.generate(convs[:1], GenerationParams(n=3, max_new_tokens=16, temperature=0.0))[0]
    assert copies.texts == batched[0].texts * 3


def test_constrained_sampling_gives_boxes(vlm):
    grammar = BoxGrammar(boxes=6)
    convs = [_conversation(k, seed=10 + k) for k in (1, 2, 3)]
    params = GenerationParams(n=6, max_new_tokens=200, temperature=1.0, top_p=1.0, seed=3, grammar=grammar)
    gens = vlm.generate(convs, params)
    assert len(gens) == 3
    for gen, conv in zip(gens, convs, strict=True):
        assert len(gen.texts) == 6
        for text in gen.texts:
            boxes = parse_boxes(text.strip(), grammar)
            assert boxes is not None and len(boxes) == 6, text
            assert all(1 <= v <= 1000 for box in boxes for v in box[1:])
        assert len(set(gen.texts)) > 1, "samples at temperature 1 should differ"
        assert gen.prompt_tokens == vlm.count_prompt_tokens(conv)
        # Each sample has 6 boxes (>= 30 tokens here) and ends with EOS well before the limit.
        assert 6 * 20 < gen.generated_tokens < 6 * 200


def test_constrained_greedy_and_seed(vlm):
    grammar = BoxGrammar(boxes=2)
    conv = _conversation(1, seed=5)
    greedy = vlm.generate([conv], GenerationParams(n=1, max_new_tokens=80, temperature=0.0, grammar=grammar))
    assert parse_boxes(greedy[0].texts[0].strip(), grammar) is not None
    params = GenerationParams(n=4, max_new_tokens=80, temperature=1.0, seed=7, grammar=grammar)
    assert vlm.generate([conv], params)[0].texts == vlm.generate([conv], params)[0].texts


def test_answers_at_the_token_limit_are_flagged(vlm):
    """At the limit the grammar gives (the longest answer in this tokenizer's tokens + the end
    token) every sample at temperature 1 of a random model ends with EOS; below it, samples are
    cut and say so."""
    grammar = BoxGrammar(2)
    limit = vlm.answer_token_limit(grammar)
    assert limit == len(grammar.longest()) + 1  # the tiny tokenizer has a token per grammar character
    conv = _conversation(1, seed=9)
    full = vlm.generate([conv], GenerationParams(n=8, max_new_tokens=limit, temperature=1.0, seed=4,
                                                 grammar=grammar))[0]
    assert full.truncated == [False] * 8 and all(parse_boxes(t.strip(), grammar) for t in full.texts)
    short = vlm.generate([conv], GenerationParams(n=3, max_new_tokens=6, temperature=1.0, seed=4,
                                                  grammar=grammar))[0]
    assert short.truncated == [True] * 3 and not any(parse_boxes(t.strip(), grammar) for t in short.texts)
    greedy = vlm.generate([conv], GenerationParams(n=2, max_new_tokens=6, temperature=0.0, grammar=grammar))[0]
    assert greedy.truncated == [True, True]


def test_stop_strings_cut_the_text(vlm):
    params = GenerationParams(n=2, max_new_tokens=40, temperature=1.0, seed=1, grammar=BoxGrammar(2),
                              stop=[", "])
    gen = vlm.generate([_conversation(1, seed=8)], params)[0]
    for text in gen.texts:
        assert ", " not in text and text.strip().startswith("(")
    assert 2 * 2 <= gen.generated_tokens < 2 * 12  # "(4.5," is a few tokens, not 40


def test_shared_prefill_matches_repeated_prompts(vlm):
    """The KV cache of one prefill, copied to n rows, samples exactly what n prompt copies sample."""
    convs = [_conversation(k, seed=20 + k) for k in (2, 1)]
    params = GenerationParams(n=3, max_new_tokens=12, temperature=1.0, seed=11)
    try:
        vlm.sampling = "shared-prefill"
        shared = vlm.generate(convs, params)
        vlm.sampling = "hf"
        repeated = vlm.generate(convs, params)
    finally:
        vlm.sampling = "grouped"
    assert [g.texts for g in shared] == [g.texts for g in repeated]
    assert [g.generated_tokens for g in shared] == [g.generated_tokens for g in repeated]
    assert all(0 < g.generated_tokens <= 3 * 12 for g in shared)


def test_grouped_sampling_draws_from_the_model_distribution(vlm):
    """Grouped sampling is exact: first tokens follow the model's own next-token probabilities."""
    import torch

    conv = _conversation(2, seed=31)
    inputs = vlm._inputs([conv])
    with torch.inference_mode():
        probs = torch.softmax(vlm.model(**inputs).logits[0, -1].float(), -1).numpy()
    n = 2000
    gen = vlm.generate([conv], GenerationParams(n=n, max_new_tokens=1, temperature=1.0, seed=3))[0]
    ids = [vlm.tokenizer.encode(t, add_special_tokens=False) for t in gen.texts]
    assert len(gen.texts) == n
    counts: dict[int, int] = {}
    for t in ids:
        if t:
            counts[t[0]] = counts.get(t[0], 0) + 1
    top = np.argsort(probs)[::-1][:5]
    for tok in top:  # each of the 5 likeliest tokens within 4 standard errors of its probability
        p = probs[tok]
        assert abs(counts.get(int(tok), 0) / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 2e-3


def test_grouped_sampling_decodes_few_rows_at_low_temperature(vlm):
    conv = _conversation(1, seed=41)
    params = GenerationParams(n=6, max_new_tokens=40, temperature=0.05, seed=5, grammar=BoxGrammar(1))
    gen = vlm.generate([conv], params)[0]
    assert len(gen.texts) == 6 and all(parse_boxes(t.strip(), BoxGrammar(1)) for t in gen.texts)
    # samples that agree on a prefix share its rows: fewer row-steps than sampled tokens
    assert vlm.decode_row_steps < gen.generated_tokens
    assert vlm.generate([conv], params)[0].texts == gen.texts  # seeded


def test_tree_decoding_sees_each_branch_alone(vlm):
    """Each row of the tree decode (a branch of its prompt's one sequence, behind a 4D mask)
    gets the next-token logits of its prompt + its own tokens run through the model alone."""
    import torch

    convs = [_conversation(k, seed=60 + k) for k in (2, 1)]  # padded batch: prompts of two lengths
    params = GenerationParams(n=6, max_new_tokens=8, temperature=1.0, seed=2, grammar=BoxGrammar(1))
    vlm._trace = []
    try:
        gens = vlm.generate(convs, params)
        trace = vlm._trace
    finally:
        vlm._trace = None
    assert all(len(g.texts) == 6 for g in gens)
    branched = [t for t in trace if len(t[1]) >= 3]
    assert len(branched) > 6
    assert len({(p, tuple(toks[:1])) for p, toks, _ in trace}) > 2, "the samples should split"
    inputs = [vlm._inputs([c]) for c in convs]
    for prompt, toks, logits in branched[::3]:
        ids = inputs[prompt]["input_ids"]
        full = torch.cat([ids, torch.tensor([toks], dtype=ids.dtype)], dim=1)
        extra = {k: v for k, v in inputs[prompt].items() if k not in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            ref = vlm.model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0, -1].float()
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (prompt, toks, (logits - ref).abs().max())


def test_tree_decoding_greedy_equals_generate(vlm):
    """Greedy answers of the tree decoder are transformers' own greedy answers."""
    convs = [_conversation(k, seed=70 + k) for k in (1, 3)]
    params = GenerationParams(n=1, max_new_tokens=12, temperature=0.0, seed=0)
    ours = vlm.generate(convs, params)
    try:
        vlm.sampling = "hf"
        theirs = vlm.generate(convs, params)
    finally:
        vlm.sampling = "grouped"
    assert [g.texts for g in ours] == [g.texts for g in theirs]


def test_shared_tokens_are_counted_apart_from_the_prefix_store(vlm):
    """The tokens a prompt shares with an earlier one come from the token ids (images compared by
    uuid), not from the prefix store's own match: with the store's entry evicted, the refinement
    prompt still shares its prefix but nothing is served, so the hit rate drops to 0."""
    from cropper_engine.models.vlm_transformers import PrefixStore

    imgs = [ImagePart(_image(900 + j, 64 + 8 * j, 48), uuid=f"shared-count-{j}") for j in range(3)]
    base = ["Shared-count test.", imgs[0], "\n(4.5, 1, 20, 300, 1000)\n", imgs[1], "\nThe query:", imgs[2]]
    round0 = [Message("user", base)]
    round1 = [Message("user", [*base, "\nCandidates: (4.1, 10, 10, 500, 500) (3.9, 20, 30, 900, 700)"])]
    params = GenerationParams(n=2, max_new_tokens=4, temperature=0.0, seed=0)
    g0 = vlm.generate([round0], params)[0]
    g1 = vlm.generate([round1], params)[0]
    assert g0.cached_tokens == 0  # its images are new: nothing beyond a short text prefix is shared
    assert g0.shared_tokens < 10
    # round 1 shares all of round 0's prompt but its closing (end of utterance, "Assistant:")
    assert g0.prompt_tokens - 8 <= g1.shared_tokens < g0.prompt_tokens < g1.prompt_tokens
    assert g1.cached_tokens == g1.shared_tokens  # the store held round 0: all of it served
    stored = vlm.prefix_store
    try:
        vlm.prefix_store = PrefixStore()  # round 0's entry evicted
        again = vlm.generate([round1], params)[0]
    finally:
        vlm.prefix_store = stored
    assert again.shared_tokens == again.prompt_tokens  # the same prompt again: all of it shared...
    assert again.cached_tokens == 0  # ...none of it served
    assert again.texts == g1.texts


def test_text_only_and_mixed_batches(vlm):
    convs = [[Message("user", ["Just text."])], _conversation(1, seed=3)]
    gens = vlm.generate(convs, GenerationParams(n=2, max_new_tokens=5, temperature=0.7, seed=0))
    assert [len(g.texts) for g in gens] == [2, 2]
    assert gens[0].prompt_tokens < gens[1].prompt_tokens


def test_folder_without_config(tmp_path):
    from cropper_engine.models.vlm_transformers import TransformersVLM

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json") as err:
        TransformersVLM(str(tmp_path / "empty"))
    assert "empty" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        TransformersVLM(str(tmp_path / "missing"))


def test_hub_id_not_cached_fails_at_once(tmp_path, monkeypatch):
    from cropper_engine.models.vlm_transformers import TransformersVLM

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        TransformersVLM("TIGER-Lab/Mantis-8B-Idefics2")
    assert err.traceback[-1].name == "resolve_model_dir"  # refused by the local lookup, before any loading
    msg = str(err.value)
    assert "huggingface-cli download TIGER-Lab/Mantis-8B-Idefics2" in msg
    assert str(tmp_path / "hf") in msg


def test_hub_id_in_cache_is_found(idefics2_dir, tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot, offline (a hand-made cache layout)."""
    import shutil

    from cropper_engine.models.vlm_transformers import resolve_model_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-idefics2"
    commit = "0" * 40
    shutil.copytree(idefics2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model_dir("acme/tiny-idefics2") == repo / "snapshots" / commit


def test_gqa_attention_equals_stock_attention(vlm, idefics2_dir):
    """The CPU attention that reads grouped K/V in place gives the stock logits exactly."""
    import torch

    from cropper_engine.models.vlm_transformers import TransformersVLM

    stock = TransformersVLM(idefics2_dir, device="cpu", attention="stock")
    assert vlm.attention == "cropper_sdpa_gqa" and stock.attention == "stock"
    convs = [_conversation(k, seed=50 + k) for k in (1, 2, 3)]  # padded batch: masks at every step
    inputs = vlm._inputs(convs)
    with torch.inference_mode():
        assert torch.equal(vlm.model(**inputs).logits, stock.model(**inputs).logits)
    params = GenerationParams(n=3, max_new_tokens=16, temperature=1.0, seed=9)
    assert [g.texts for g in vlm.generate(convs, params)] == [g.texts for g in stock.generate(convs, params)]
