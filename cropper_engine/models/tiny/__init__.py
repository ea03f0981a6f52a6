"""Tiny random models for tests and benchmarks, built offline in seconds; importing this package loads
no torch (the builders import it when they run). Each builder is seeded: a seed writes the same files.

- clip.py: `make_tiny_clip` (an open_clip and a transformers CLIP folder), re-exported here.
- families.py: tiny VLMs of the registry's families (`make_tiny_idefics2`, `make_tiny_idefics3`,
  `make_tiny_qwen2_5_vl`) and the full-shape Idefics2 with random weights (`SHAPES`, `build_idefics2`).
- like.py: `make_tiny_like`, tiny VLMs that keep a registry model's real behaviour (`LIKE_NAMES`).
- bpe.py: the tiny VLMs' tokenizers.

models/tiny_vlm.py re-exports the VLM builders, where tests and benchmarks import them.
"""

from cropper_engine.models.tiny.clip import (  # noqa: F401  (re-exported: the names tiny.py had)
    CLIP_MEAN,
    CLIP_STD,
    TINY_EMBED_DIM,
    TINY_IMAGE_SIZE,
    TINY_OPENCLIP_NAME,
    _make_tiny_hf_clip,
    _make_tiny_openclip,
    make_tiny_clip,
    tiny_openclip_config,
)

__all__ = ["TINY_OPENCLIP_NAME", "make_tiny_clip", "tiny_openclip_config"]
