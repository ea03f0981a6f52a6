"""Tiny random models for tests and benchmarks, built offline in seconds; importing this package loads
no torch (the builders import it when they run).

- clip.py: `make_tiny_clip` (an open_clip and a transformers CLIP folder), re-exported here.
- The tiny VLMs: models/tiny_vlm.py.
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
