"""CLIP image embedders (open_clip and transformers) that only ever read local files.

Weights come from a local file or folder, or from a hub cache already on this machine (the
Hugging Face cache, open_clip's URL cache): nothing is downloaded. Missing weights raise
ModelNotFoundError at once, with the command that fetches them on a machine with internet.

torch, open_clip and transformers are imported inside the functions that use them: importing
this module is cheap (the "auto" embedder checks the caches without torch).

The embedders live beside it: open_clip in clip_openclip.py, transformers CLIP in clip_hf.py,
the torch helpers they share in torch_utils.py, the cache lookups and the weights' fingerprints
in hub_cache.py. This module re-exports every name it had.
"""

from __future__ import annotations

from cropper_engine.models.clip_hf import (  # noqa: F401  (re-exported: the names clip.py had)
    _HF_VOLATILE,
    HFClipEmbedder,
    _hf_weight_files,
    _resolve_hf_dir,
)
from cropper_engine.models.clip_openclip import (  # noqa: F401  (re-exported: the names clip.py had)
    _OPENCLIP_WEIGHT_FILES,
    _RESIZE_NAMES,
    _VIT_B_32_OPENAI_HF,
    _VIT_B_32_OPENAI_URL_FILE,
    DEFAULT_OPENCLIP_MODEL,
    DEFAULT_OPENCLIP_TAG,
    OpenClipEmbedder,
    _dir_id,
    _dir_weights,
    _import_open_clip,
    _missing_tag_message,
    default_openclip_weights,
    find_openclip_tag_weights,
    openclip_url_cache_dir,
)
from cropper_engine.models.hub_cache import (  # noqa: F401  (re-exported: the names clip.py had)
    _SHA_CACHE,
    _canonical_json,
    _fingerprint,
    file_sha256,
    find_in_hf_cache,
    hf_hub_cache_dir,
)
from cropper_engine.models.torch_utils import (  # noqa: F401  (re-exported: the names clip.py had)
    _as_pil,
    _prepare_pixels,
    _torch_dtype,
    hub_offline,
    resolve_device,
)

__all__ = [
    "HFClipEmbedder",
    "OpenClipEmbedder",
    "default_openclip_weights",
    "file_sha256",
    "find_in_hf_cache",
    "find_openclip_tag_weights",
    "hf_hub_cache_dir",
    "resolve_device",
]
