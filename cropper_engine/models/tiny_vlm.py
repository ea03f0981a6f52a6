"""Tiny random VLMs built offline for tests and benchmarks: the builders live in the package
models/tiny/ (families.py: `make_tiny_idefics2`, `build_idefics2` / `SHAPES` / `random_model`,
`make_tiny_idefics3`, `make_tiny_qwen2_5_vl`; like.py: `make_tiny_like`, `LIKE_NAMES`; bpe.py: their
tokenizers), the chat templates in models/chat_templates.py. This module re-exports every name it
had: tests and benchmarks import it, some inside subprocess strings.
"""

from __future__ import annotations

from cropper_engine.models.chat_templates import (
    IDEFICS2_CHAT_TEMPLATE,
    QWEN2_5_VL_CHAT_TEMPLATE,
    SMOLVLM_CHAT_TEMPLATE,
)
from cropper_engine.models.tiny.bpe import (  # noqa: F401  (re-exported: the names tiny_vlm had)
    _SENTENCES,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    _byte_level_chars,
    _bytelevel_like_tokenizer,
    _corpus,
    _fast_tokenizer,
    _force_words,
    _like_corpus,
    _sp_like_tokenizer,
    _tag_words,
    _train_bytelevel_tokenizer,
    _train_tokenizer,
    _word_merges,
)
from cropper_engine.models.tiny.families import (  # noqa: F401  (re-exported: the names tiny_vlm had)
    IDEFICS3_IMAGE_SEQ_LEN,
    IDEFICS3_IMAGE_SIZE,
    IDEFICS3_PATCH_SIZE,
    IDEFICS3_SCALE_FACTOR,
    IMAGE_SEQ_LEN,
    IMAGE_SIZE,
    PATCH_SIZE,
    QWEN_MAX_PIXELS,
    QWEN_MERGE_SIZE,
    QWEN_MIN_PIXELS,
    QWEN_PATCH_SIZE,
    QWEN_SPECIALS,
    QWEN_SPLIT,
    SHAPES,
    SMOLVLM_IMAGE_TOKENS,
    SMOLVLM_SPECIALS,
    _save,
    build_idefics2,
    make_tiny_idefics2,
    make_tiny_idefics3,
    make_tiny_qwen2_5_vl,
    random_model,
)
from cropper_engine.models.tiny.like import (  # noqa: F401  (re-exported: the names tiny_vlm had)
    _LIKE_TEXT,
    _LIKE_VISION,
    IDEFICS3_ADDED,
    LIKE_NAMES,
    LLAMA3_SPECIALS,
    LLAMA3_SPLIT,
    SMOLLM_SPLIT,
    _like_idefics2,
    _like_idefics3,
    _like_qwen2_5_vl,
    _like_sheet,
    make_tiny_like,
)

__all__ = ["IDEFICS2_CHAT_TEMPLATE", "LIKE_NAMES", "QWEN2_5_VL_CHAT_TEMPLATE", "SHAPES", "SMOLVLM_CHAT_TEMPLATE",
           "build_idefics2", "make_tiny_idefics2", "make_tiny_idefics3", "make_tiny_like", "make_tiny_qwen2_5_vl",
           "random_model"]
