"""What the transformers backend reads off a loaded model, and its CPU attention.

`sliding_window` (Mistral's window: Idefics2 / Mantis) and `window_mask`, the 4D mask that applies
it; `_rope_index_fn` (multimodal rotary positions: Qwen2-VL / Qwen2.5-VL); `_sdpa_gqa`, registered
as `GQA_ATTENTION` by `_use_gqa_attention`: SDPA that reads grouped K/V heads in place (the CPU).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def sliding_window(model: Any) -> int | None:
    """The text model's sliding attention window when every layer uses it (Mistral: Idefics2,
    Mantis), None when none does; NotImplementedError for a model that mixes both."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    types = getattr(text, "layer_types", None)
    if types and any(t != "sliding_attention" for t in types):
        raise NotImplementedError(f"layers of mixed attention types ({sorted(set(types))})")
    return int(window)


def window_mask(key_mask: Any, q_len: int, window: int) -> Any:
    """A 4D boolean mask [B, 1, q_len, K] for a sliding window: the last `q_len` columns of
    `key_mask` [B, K] (1 = a real token) are the queries; a query sees the real keys at positions
    p - window < k <= p, positions counted over real tokens only (padding between a stored prefix
    and the rest is no distance). A padding query sees itself (a row of no key gives NaN)."""
    import torch

    real = key_mask.bool()
    k = key_mask.shape[1]
    pos = real.long().cumsum(-1) - 1
    qpos = pos[:, -q_len:, None]
    vis = real[:, None, :] & (pos[:, None, :] <= qpos) & (pos[:, None, :] > qpos - window)
    own = torch.zeros((q_len, k), dtype=torch.bool, device=key_mask.device)
    dev = key_mask.device
    own[torch.arange(q_len, device=dev), torch.arange(k - q_len, k, device=dev)] = True
    return torch.where(real[:, -q_len:, None], vis, own[None])[:, None]


def _rope_index_fn(model: Any) -> Any:
    """For a model with multimodal rotary positions (it has `get_rope_index`, as Qwen2-VL and
    Qwen2.5-VL do), a function (ids, mask, processor outputs) -> 3-D position ids [3, B, T];
    None for a model with ordinary 1-D positions."""
    import inspect

    inner = getattr(model, "model", None)
    fn = getattr(model, "get_rope_index", None) or getattr(inner, "get_rope_index", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters

    def rope_index(ids: Any, mask: Any, extra: dict[str, Any]) -> Any:
        kwargs = {k: extra[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
                  if k in params and extra.get(k) is not None}
        if "mm_token_type_ids" in params and "mm_token_type_ids" not in kwargs:
            image_token = getattr(model.config, "image_token_id", None)
            kwargs["mm_token_type_ids"] = (ids == image_token).int()
        return fn(input_ids=ids, attention_mask=mask, **kwargs)[0]

    return rope_index


GQA_ATTENTION = "cropper_sdpa_gqa"


def _sdpa_gqa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """SDPA that lets torch read grouped K/V heads in place (enable_gqa) even with a mask.

    transformers' own sdpa path copies K and V once per query group (`repeat_kv`) whenever a mask
    is present, i.e. at every decode step of a padded batch: on the CPU that copy of the whole KV
    cache costs more than the attention itself. On CUDA a masked GQA call falls back to the math
    kernel, so this is used on the CPU only. Anything unusual goes to the stock function.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups <= 1 or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None \
            or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _use_gqa_attention(model: Any) -> bool:
    """Route the model's attention through `_sdpa_gqa` (CPU); False when this transformers can't."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa)
        AttentionMaskInterface.register(GQA_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # sdpa's masks
        model.set_attn_implementation(GQA_ATTENTION)
        return True
    except (ImportError, AttributeError, ValueError, TypeError, KeyError) as e:
        logger.info("keeping the stock attention (%s)", e)
        return False
