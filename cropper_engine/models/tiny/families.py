"""A tiny random Idefics2 (the Mantis-8B-Idefics2 architecture) built offline for tests and benchmarks.

`make_tiny_idefics2(out_dir)` writes a folder that `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained` load like the real model: SigLIP-style vision tower,
perceiver resampler (8 latents, so 8 `<image>` tokens per image), Mistral text model, a ~1000-token
BPE tokenizer with SentencePiece-style '▁' spaces, an Idefics2 image processor without splitting, and
the Idefics2 / Mantis chat template. Random weights, seeded: the same seed gives the same files.

The registry's other families, built the same way (a second, a few MB):
`make_tiny_idefics3` (a SmolVLM-style Idefics3: pixel-shuffle connector, Llama text model, byte-level
BPE, image splitting off, SmolVLM-Instruct's chat template) and `make_tiny_qwen2_5_vl` (Qwen2.5-VL:
windowed ViT with patch merging, multimodal rotary positions, Qwen2's special tokens, min/max
pixels for 4 to 16 image tokens, the Qwen2.5-VL-Instruct chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cropper_engine.models.chat_templates import (
    IDEFICS2_CHAT_TEMPLATE,
    QWEN2_5_VL_CHAT_TEMPLATE,
    SMOLVLM_CHAT_TEMPLATE,
)
from cropper_engine.models.tiny.bpe import (
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    _fast_tokenizer,
    _tag_words,
    _train_bytelevel_tokenizer,
    _train_tokenizer,
)

IMAGE_SEQ_LEN = 8  # perceiver latents = <image> tokens per image
IMAGE_SIZE = 112
PATCH_SIZE = 14


# The shape of Idefics2-8B / Mantis-8B-Idefics2 (their published config.json), for timing the
# real architecture with random weights (bench/fullsize.py); "tiny" is the test model.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": VOCAB_SIZE, "image_size": IMAGE_SIZE, "longest_edge": IMAGE_SIZE, "shortest_edge": 3 * PATCH_SIZE,
        "image_seq_len": IMAGE_SEQ_LEN, "individual_digits": False,
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        "perceiver": dict(hidden_size=256, rms_norm_eps=1e-5, resampler_n_latents=IMAGE_SEQ_LEN,
                          resampler_depth=1, resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2),
        "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, sliding_window=None),
    },
    "8b": {
        "vocab_size": 32003, "image_size": 980, "longest_edge": 980, "shortest_edge": 378, "image_seq_len": 64,
        "individual_digits": True,
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=980, patch_size=14),
        "perceiver": dict(hidden_size=4096, rms_norm_eps=1e-5, resampler_n_latents=64, resampler_depth=3,
                          resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4),
        "text": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, sliding_window=4096,
                     rope_theta=10000.0),
    },
}


def make_tiny_idefics2(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny random model, processor and generation config in `out_dir`; return it."""
    return build_idefics2(out_dir, "tiny", seed=seed)[0]


def build_idefics2(out_dir: str | Path, shape: str = "tiny", *, seed: int = 0, save_weights: bool = True,
                   device: str = "cpu", dtype: Any = None) -> tuple[Path, Any]:
    """An Idefics2 of the given shape with random weights: processor, tokenizer and config written
    to `out_dir`; the weights too when `save_weights` (else the model is only returned, built
    on `device`, which is how an 8B model is timed without writing 16 GB)."""
    import torch
    from transformers import (
        GenerationConfig,
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
        PreTrainedTokenizerFast,
    )

    spec = SHAPES[shape]
    vocab_size = spec["vocab_size"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(seed, vocab_size, spec["individual_digits"]),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=spec["text"]["max_position_embeddings"],
        padding_side="left",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": spec["shortest_edge"], "longest_edge": spec["longest_edge"]}
    )
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=spec["image_seq_len"], chat_template=IDEFICS2_CHAT_TEMPLATE)
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"

    text = dict(model_type="mistral", vocab_size=vocab_size, rms_norm_eps=1e-5, pad_token_id=ids["<unk>"],
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], **spec["text"])
    config = Idefics2Config(
        vision_config=dict(spec["vision"]),
        perceiver_config=dict(spec["perceiver"]),
        text_config=text,
        image_token_id=ids["<image>"],
        tie_word_embeddings=False,
    )
    gen = GenerationConfig(bos_token_id=ids["<s>"], pad_token_id=ids["<unk>"],
                           eos_token_id=[ids["<end_of_utterance>"], ids["</s>"]])
    torch.manual_seed(seed)
    processor.save_pretrained(out)
    if save_weights:
        model = Idefics2ForConditionalGeneration(config).eval()
        model.generation_config = gen
        model.save_pretrained(out)
        return out, model
    config.save_pretrained(out)
    gen.save_pretrained(out)
    return out, random_model(out, device, dtype or torch.bfloat16)


def random_model(folder: str | Path, device: str = "cpu", dtype: Any = None) -> Any:
    """The model a folder's config.json describes, with random weights made straight on `device`
    (no weights read or written: how the 8B shape is timed), its generation config attached."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.bfloat16).eval()
    model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model


# --- Idefics3 / SmolVLM ------------------------------------------------------------------------

# SmolVLM's specials, in its order: <|endoftext|> 0, <|im_start|> 1 (BOS), <|im_end|> 2 (pad); then
# after the BPE vocabulary the three tokens SmolVLM-Instruct adds. Its '<global-img>' and 6 x 6 tile
# tags are no tokens: text its processor writes, which the BPE splits (models/sheets/smolvlm-instruct.json).
SMOLVLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLVLM_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
IDEFICS3_IMAGE_SIZE = 112  # one 112 px tile: 8 x 8 patches, pixel-shuffled by 2 -> 16 <image> tokens
IDEFICS3_PATCH_SIZE = 14
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_IMAGE_SEQ_LEN = (IDEFICS3_IMAGE_SIZE // IDEFICS3_PATCH_SIZE) ** 2 // IDEFICS3_SCALE_FACTOR ** 2

# --- Qwen2.5-VL ------------------------------------------------------------------------------

# Qwen2's specials (after its BPE vocabulary, in this order, as in the real tokenizer).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (each digit alone, as `\p{N}`), before the byte-level mapping.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
QWEN_MIN_PIXELS = 2 * 2 * 28 * 28  # a token covers 28 x 28 pixels: 4 to 16 tokens an image
QWEN_MAX_PIXELS = 4 * 4 * 28 * 28


def _save(out: Path, processor: Any, config: Any, gen: Any, model_cls: Any, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    processor.save_pretrained(out)
    model = model_cls(config).eval()
    model.generation_config = gen
    model.save_pretrained(out)
    return out


def make_tiny_idefics3(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random SmolVLM (Idefics3 architecture) in `out_dir`: SigLIP-style vision tower, pixel
    shuffle connector (16 `<image>` tokens an image, one 112 px tile: image splitting off), Llama
    text model, a byte-level BPE tokenizer with SmolVLM-Instruct's special and added tokens (its
    '<global-img>' is 5 text tokens, as SmolLM2's: 16 + 7 = 23 tokens an image) and its chat template."""
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    from cropper_engine.models.sheets import load_sheet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = VOCAB_SIZE
    words = _tag_words(load_sheet("smolvlm-instruct"))  # '<global-img>' as '<', 'global', '-', 'img', '>'
    tokenizer = _fast_tokenizer(
        _train_bytelevel_tokenizer(seed, SMOLVLM_SPECIALS, SMOLVLM_IMAGE_TOKENS, vocab_size, words=words,
                                   unfused=("<",)),
        bos_token="<|im_start|>", eos_token="<end_of_utterance>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", extra_special_tokens=SMOLVLM_IMAGE_TOKENS, model_max_length=8192)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SMOLVLM_SPECIALS + SMOLVLM_IMAGE_TOKENS}
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": IDEFICS3_IMAGE_SIZE},
        max_image_size={"longest_edge": IDEFICS3_IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=IDEFICS3_IMAGE_SEQ_LEN, chat_template=SMOLVLM_CHAT_TEMPLATE)
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=256, intermediate_size=512,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=ids["<|im_end|>"],
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=False)
    config = Idefics3Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IDEFICS3_IMAGE_SIZE, patch_size=IDEFICS3_PATCH_SIZE),
        text_config=text, scale_factor=IDEFICS3_SCALE_FACTOR, image_token_id=ids["<image>"],
        pad_token_id=ids["<|im_end|>"], tie_word_embeddings=False)
    gen = GenerationConfig(bos_token_id=ids["<|im_start|>"], pad_token_id=ids["<|im_end|>"],
                           eos_token_id=[ids["<end_of_utterance>"], ids["<|endoftext|>"]])
    return _save(out, processor, config, gen, Idefics3ForConditionalGeneration, seed)


def make_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL in `out_dir`: windowed ViT with 2 x 2 patch merging (a token per
    28 x 28 pixels; min/max pixels keep an image at 4 to 16 tokens), Qwen2 text model with
    multimodal rotary positions (mrope), a byte-level BPE tokenizer with Qwen2's special tokens,
    the Qwen2.5-VL-Instruct chat template."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = VOCAB_SIZE
    tokenizer = _fast_tokenizer(
        _train_bytelevel_tokenizer(seed, [], QWEN_SPECIALS, vocab_size, split=QWEN_SPLIT),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIALS[1:],
        model_max_length=32768)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    image_processor = Qwen2VLImageProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                            patch_size=QWEN_PATCH_SIZE, merge_size=QWEN_MERGE_SIZE,
                                            temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                            patch_size=QWEN_PATCH_SIZE, merge_size=QWEN_MERGE_SIZE)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    assert len(processor.tokenizer) == vocab_size, "the processor must not add tokens"
    hidden, heads = 128, 4  # head_dim 32: mrope sections (t, h, w) of 16 frequencies
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=32768,
                rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=QWEN_PATCH_SIZE,
                  spatial_merge_size=QWEN_MERGE_SIZE, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1], out_hidden_size=hidden)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    gen = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                           eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    return _save(out, processor, config, gen, Qwen2_5_VLForConditionalGeneration, seed)
