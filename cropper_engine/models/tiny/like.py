"""`--like NAME`: tiny random models that keep a registry model's real behaviour (the comment
below says what is kept); `cropper-engine models make-tiny --like NAME` writes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cropper_engine.models.tiny.bpe import (
    _bytelevel_like_tokenizer,
    _fast_tokenizer,
    _sp_like_tokenizer,
    _tag_words,
)
from cropper_engine.models.tiny.families import QWEN_SPECIALS, QWEN_SPLIT, _save

# --- `--like NAME`: tiny models that keep a registry model's real behaviour -----------------------
#
# `make_tiny_like(out, name)` builds a tiny random model that keeps everything of the real model's
# config that the engine depends on (models/sheets/NAME.json) and shrinks only its sizes (hidden
# widths, layers, vocabulary, image resolution where the token count does not depend on it):
# - tokenizer behaviour: the real model's kind of BPE ('▁' SentencePiece with byte fallback and the
#   legacy '▁' at the start of every text run / byte-level), its digit rule (one token per digit,
#   or Llama 3's groups of up to three), the real special token strings in the real order (specials
#   first, added tokens last, as in the real vocabularies; only the tokens the real model added), text
#   the real tokenizer has no token for split into the real pieces (Idefics3's '<global-img>': 4 Llama 3
#   tokens, 5 SmolLM2 ones) and BOS handling;
# - the real chat template (the sheet's), processor settings (image splitting as the hub files say:
#   the engine decides what it turns off), tokens per image (Mantis / idefics2: 64 perceiver latents,
#   66 an image unsplit; Idefics3: 364 px tiles of 169; SmolVLM: 384 px tiles of 81; Qwen2.5-VL: a
#   token per 28 x 28 px within the real min / max pixels), rope settings and context length;
# - the sliding window: Mistral's real 4096 is KEPT, not scaled down: the tests at the defaults
#   (S=30, T=5) send prompts of real length (real tokens per image, real box token counts), ~6-7k
#   tokens, which cross it as the real model's prompts do.

LIKE_NAMES = ("mantis-8b-idefics2", "idefics2-8b", "idefics3-8b", "smolvlm-instruct", "qwen2.5-vl-7b")
# head dims of 32: a size vLLM's CPU attention kernels take
_LIKE_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
_LIKE_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# SmolLM2: GPT-2's split with every digit alone.
SMOLLM_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
# The tokens Idefics3-8B-Llama3 and SmolVLM-Instruct add to their text tokenizer, in this order, at
# the end of the vocabulary. '<global-img>' and '<row_i_col_j>' are NOT tokens of theirs: text the
# processor writes, split by the text tokenizer (4 / 8 Llama 3 tokens, 5 / 9 SmolLM2 ones).
IDEFICS3_ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def _like_sheet(name: str) -> dict[str, Any]:
    from cropper_engine.models.sheets import load_sheet

    if name not in LIKE_NAMES:
        raise ValueError(f"unknown model {name!r} for --like; one of: {', '.join(LIKE_NAMES)}")
    return load_sheet(name)


def make_tiny_like(out_dir: str | Path, name: str, seed: int = 0) -> Path:
    """A tiny random model in `out_dir` that behaves like the registry model `name` (see above)."""
    sheet = _like_sheet(name)
    build = {"idefics2": _like_idefics2, "idefics3": _like_idefics3, "qwen2_5_vl": _like_qwen2_5_vl}[sheet["family"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return build(out, sheet, seed)


def _like_idefics2(out: Path, sheet: dict[str, Any], seed: int) -> Path:
    from transformers import (
        GenerationConfig,
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    real = sheet["config"]["text"]
    hub = sheet["processor"]["hub"]
    vocab_size = 2003  # 2000 + the 3 added tokens, as 32000 + 3
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    tokenizer = _fast_tokenizer(_sp_like_tokenizer(seed, vocab_size, ["<unk>", "<s>", "</s>"], added),
                                bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                                extra_special_tokens=added, model_max_length=real["context"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", *added]}
    edge = 56  # tokens per image do not depend on the resolution (the perceiver's latents): 4 x 4 patches
    image_processor = Idefics2ImageProcessor(do_image_splitting=hub["do_image_splitting"],
                                             size={"shortest_edge": 28, "longest_edge": edge})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=hub["image_seq_len"], chat_template=sheet["chat_template"]["template"])
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"
    text = dict(model_type="mistral", vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=ids["<unk>"],
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                max_position_embeddings=real["max_position_embeddings"],
                sliding_window=real["sliding_window"], rope_parameters=dict(real["rope"]), **_LIKE_TEXT)
    config = Idefics2Config(
        vision_config=dict(_LIKE_VISION, image_size=edge, patch_size=14),
        perceiver_config=dict(hidden_size=_LIKE_TEXT["hidden_size"], rms_norm_eps=1e-5,
                              resampler_n_latents=sheet["config"]["connector"]["resampler_n_latents"],
                              resampler_depth=1, resampler_n_heads=2, resampler_head_dim=32, num_key_value_heads=1),
        text_config=text, image_token_id=ids["<image>"], tie_word_embeddings=False)
    gen = GenerationConfig(bos_token_id=ids["<s>"], pad_token_id=ids["<unk>"],
                           eos_token_id=[ids["</s>"], ids["<end_of_utterance>"]])
    return _save(out, processor, config, gen, Idefics2ForConditionalGeneration, seed)


def _like_idefics3(out: Path, sheet: dict[str, Any], seed: int) -> Path:
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    real = sheet["config"]["text"]
    hub = sheet["processor"]["hub"]
    tile = sheet["config"]["vision"]["image_size"]
    scale = sheet["config"]["connector"]["scale_factor"]
    added = [tok for tok, _ in sheet["added_tokens"]["tokens"]]  # the real ones, in their order
    assert added == IDEFICS3_ADDED, added
    # the image tags are text to the real tokenizer: the tiny's splits them into the same pieces
    tags = {s: v["pieces"] for s, v in sheet["image_tags"]["strings"].items() if v["pieces"] is not None}
    words = _tag_words(sheet)
    if sheet["name"] == "idefics3-8b":  # Llama 3.1: regular tokens, 256 specials, then the added tokens
        head, tail = [], LLAMA3_SPECIALS + added
        vocab_size = 2400 + len(tail)
        tok = _bytelevel_like_tokenizer(seed, vocab_size, head, tail, LLAMA3_SPLIT, digit_groups=True,
                                        bos="<|begin_of_text|>", words=words, unfused=("<",))
        specials = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                        pad_token=sheet["special_tokens"]["pad"][0])
    else:  # SmolLM2: <|endoftext|>, <|im_start|>, <|im_end|> first, the image tokens last
        head, tail = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added
        vocab_size = 1200 + len(tail)
        tok = _bytelevel_like_tokenizer(seed, vocab_size, head, tail, SMOLLM_SPLIT, digit_groups=False,
                                        words=words, unfused=("<",))
        specials = dict(bos_token="<|im_start|>", eos_token=sheet["special_tokens"]["eos"][0],
                        unk_token="<|endoftext|>", pad_token=sheet["special_tokens"]["pad"][0])
    tokenizer = _fast_tokenizer(tok, extra_special_tokens=added, model_max_length=real["context"], **specials)
    for tag, pieces in tags.items():
        got = [tokenizer.decode([i]) for i in tokenizer(tag, add_special_tokens=False)["input_ids"]]
        assert got == pieces, (tag, got, pieces)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in head + tail}
    image_processor = Idefics3ImageProcessor(do_image_splitting=hub["do_image_splitting"], size=dict(hub["size"]),
                                             max_image_size=dict(hub["max_image_size"]))
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=hub["image_seq_len"],
                                  chat_template=sheet["chat_template"]["template"])
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"
    bos = ids[specials["bos_token"]]
    pad = ids[specials["pad_token"]]
    eos = [ids[t] for t in sheet["end_tokens"]]
    rope = dict(real["rope"])
    text = dict(model_type="llama", vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=pad, bos_token_id=bos,
                eos_token_id=eos[0],
                max_position_embeddings=max(real["context"], rope.get("original_max_position_embeddings", 0)),
                rope_parameters=rope, tie_word_embeddings=False, **_LIKE_TEXT)
    config = Idefics3Config(vision_config=dict(_LIKE_VISION, image_size=tile, patch_size=14), text_config=text,
                            scale_factor=scale, image_token_id=ids["<image>"], pad_token_id=pad,
                            tie_word_embeddings=False)
    gen = GenerationConfig(bos_token_id=bos, pad_token_id=pad, eos_token_id=eos)
    return _save(out, processor, config, gen, Idefics3ForConditionalGeneration, seed)


def _like_qwen2_5_vl(out: Path, sheet: dict[str, Any], seed: int) -> Path:
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    real = sheet["config"]["text"]
    hub = sheet["processor"]["hub"]
    vision = sheet["config"]["vision"]
    vocab_size = 1500
    tok = _bytelevel_like_tokenizer(seed, vocab_size, [], QWEN_SPECIALS, QWEN_SPLIT, digit_groups=False)
    tokenizer = _fast_tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_special_tokens=QWEN_SPECIALS[1:],
                                model_max_length=real["context"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    pix = dict(min_pixels=hub["min_pixels"], max_pixels=hub["max_pixels"], patch_size=hub["patch_size"],
               merge_size=hub["merge_size"])
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(temporal_patch_size=2, **pix),
                                    video_processor=Qwen2VLVideoProcessor(**pix), tokenizer=tokenizer,
                                    chat_template=sheet["chat_template"]["template"])
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"
    head_dim = _LIKE_TEXT["head_dim"]  # mrope sections scaled from [16, 24, 24] of 64 frequencies to 8
    sections = [s * head_dim // 2 // sum(real["rope"]["mrope_section"]) for s in real["rope"]["mrope_section"]]
    text = dict(vocab_size=vocab_size, rms_norm_eps=1e-6, max_position_embeddings=real["max_position_embeddings"],
                use_sliding_window=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": sections,
                                 "rope_theta": real["rope"]["rope_theta"]},
                **{k: v for k, v in _LIKE_TEXT.items() if k != "head_dim"})
    vis = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=vision["patch_size"],
               spatial_merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
               window_size=vision["window_size"], fullatt_block_indexes=[1], out_hidden_size=_LIKE_TEXT["hidden_size"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    gen = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                           eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    return _save(out, processor, config, gen, Qwen2_5_VLForConditionalGeneration, seed)
