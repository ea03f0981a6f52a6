"""A vLLM general plugin that lets vLLM's Transformers modeling backend serve Idefics2 models
(HuggingFaceM4/idefics2-8b, TIGER-Lab/Mantis-8B-Idefics2, the tiny test model).

vLLM (0.32, 0.33) has no native Idefics2 model and falls back to its Transformers backend
(`TransformersMultiModalForCausalLM`), which asks the HF processor three things that transformers'
Idefics2Processor (5.19 - 5.24) cannot answer:

- `_get_num_multimodal_tokens(image_sizes, **kw)`: tokens and image-processor rows per image
  (memory profiling, and which rows of `pixel_values` belong to which image);
- `replace_image_token(image_inputs, image_idx, **kw)`: the full placeholder text of one image;
- `__call__(..., return_text_replacement_offsets=True)`: where each placeholder sits, from which
  the backend reads each image's replacement text (`ProcessorMixin.__call__` builds it from
  `replace_image_token`; Idefics2's own `__call__` predates that machinery).

One image's placeholder is `<fake_token_around_image>` + image_seq_len x `<image>` +
`<fake_token_around_image>` per crop (1 crop, or 5 with image splitting: 4 quarters + the whole),
adjacent crops sharing one fake token, as Idefics2Processor writes it: image_seq_len*n + n + 1 tokens.

`register()` is the entry point (group `vllm.general_plugins`, so vLLM runs it in every process it
spawns). It patches only what is missing, never twice, and nothing when vLLM registers a model of its
own for Idefics2 or transformers' Idefics2Processor already implements `replace_image_token`.
Without `return_text_replacement_offsets` the processor's original `__call__` runs, so transformers
users see no change. Set CROPPER_VLLM_PLUGIN=0 to turn the plugin off (or list the plugins vLLM may
load in VLLM_PLUGINS).

Token ids then match transformers' exactly (tests/test_vllm_plugin.py), given three things the
caller provides: `LLM.chat(..., tokenization_kwargs={"add_special_tokens": True})` (the Idefics2
chat template writes no `<s>`, the processor adds one); text after every image that starts with a
newline or a space (Idefics2Processor inserts a space before a word glued to an image, vLLM does
not); no two images back to back (Idefics2Processor lets them share one fake token, vLLM expands
each image on its own). Image splitting must be set for the engine (the model's processor config or
`LLM(mm_processor_kwargs={"do_image_splitting": ...})`), not per request: vLLM counts each image's
pixel rows with the engine's settings.

Importing this module is cheap (nothing but the standard library) and works without vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURE = "Idefics2ForConditionalGeneration"
_MARK = "_cropper_vllm_plugin"  # set on every function this module adds
_LEGACY_CALL = "_cropper_legacy_call"  # the processor's own __call__, kept on the class


def register() -> None:
    """vLLM general-plugin entry point: make Idefics2Processor usable by the Transformers backend."""
    if os.environ.get("CROPPER_VLLM_PLUGIN", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if vllm_has_native_idefics2():
        logger.debug("vLLM implements %s itself; the Idefics2 processor patch is not needed", ARCHITECTURE)
        return
    try:
        patch_idefics2_processor()
    except Exception:  # a plugin must never take vLLM down with it
        logger.exception("cropper_engine: could not patch Idefics2Processor for vLLM")


def vllm_has_native_idefics2() -> bool:
    """Whether vLLM (if installed) has its own model for Idefics2 (in-tree or registered by a plugin)."""
    try:
        from vllm.model_executor.models.registry import ModelRegistry
    except Exception:  # no vLLM, or one without this module
        return False
    try:
        return ARCHITECTURE in ModelRegistry.get_supported_archs()
    except Exception:
        return False


def patch_idefics2_processor(processor_cls: type | None = None) -> list[str]:
    """Add the missing methods to Idefics2Processor (or `processor_cls`); return the names added.

    Idempotent: a second call adds nothing. Returns [] when transformers is absent or already
    provides everything.
    """
    if processor_cls is None:
        try:
            from transformers import Idefics2Processor as processor_cls
        except Exception:  # no transformers, or one without Idefics2
            return []
    added: list[str] = []
    if not hasattr(processor_cls, "_get_num_multimodal_tokens"):
        processor_cls._get_num_multimodal_tokens = _get_num_multimodal_tokens
        added.append("_get_num_multimodal_tokens")
    if _origin(processor_cls, "replace_image_token") == "ProcessorMixin":
        # Only the offsets machinery of ProcessorMixin.__call__ calls replace_image_token, so the two
        # go together: a processor that defines its own replace_image_token reports offsets already.
        processor_cls.replace_image_token = _replace_image_token
        added.append("replace_image_token")
        # The processor's own __call__ (Idefics2Processor's, or a parent's) knows nothing of offsets;
        # ProcessorMixin's does, and needs no wrapper.
        if _origin(processor_cls, "__call__") == "native":
            setattr(processor_cls, _LEGACY_CALL, processor_cls.__call__)
            processor_cls.__call__ = _call
            added.append("__call__")
    if added:
        logger.info("cropper_engine: added %s to %s for vLLM's Transformers backend",
                    ", ".join(added), processor_cls.__name__)
    return added


def is_patched(processor_cls: type | None = None) -> bool:
    if processor_cls is None:
        try:
            from transformers import Idefics2Processor as processor_cls
        except Exception:
            return False
    return any(getattr(processor_cls.__dict__.get(name), _MARK, False)
               for name in ("_get_num_multimodal_tokens", "replace_image_token", "__call__"))


def _origin(cls: type, name: str) -> str | None:
    """Who provides `cls.name`: "ProcessorMixin" (whose replace_image_token only raises
    NotImplementedError), "plugin" (added here), "native" (transformers' own), or None."""
    mixin = next((k for k in cls.__mro__ if k.__name__ == "ProcessorMixin"), None)
    for klass in cls.__mro__:
        if name in klass.__dict__:
            fn = klass.__dict__[name]
            if getattr(fn, _MARK, False):
                return "plugin"
            return "ProcessorMixin" if mixin is not None and fn is mixin.__dict__.get(name) else "native"
    return None


# --- the methods added to Idefics2Processor --------------------------------------------


def _num_crops(processor: Any, kwargs: dict[str, Any]) -> int:
    """Crops per image: 5 (4 quarters + the whole image) with image splitting, else 1."""
    split = kwargs.get("do_image_splitting")
    if split is None:
        images_kwargs = kwargs.get("images_kwargs")
        if isinstance(images_kwargs, dict):
            split = images_kwargs.get("do_image_splitting")
    if split is None:
        split = getattr(processor.image_processor, "do_image_splitting", False)
    return 5 if split else 1


def image_placeholder(processor: Any, num_crops: int) -> str:
    """One image's expanded text, as Idefics2Processor writes it (adjacent crops share a fake token)."""
    fake, image = processor.fake_image_token, processor.image_token
    return fake + (image * processor.image_seq_len + fake) * num_crops


def _get_num_multimodal_tokens(self: Any, image_sizes: Any = None, **kwargs: Any) -> Any:
    """Placeholder tokens and pixel rows per image: image_seq_len*n + n + 1 tokens, n rows
    (n = 5 crops with image splitting, else 1), whatever the image size."""
    from transformers.processing_utils import MultiModalData

    if image_sizes is None:
        return MultiModalData()
    n = _num_crops(self, kwargs)
    tokens = self.image_seq_len * n + n + 1
    return MultiModalData(num_image_tokens=[tokens] * len(image_sizes),
                          num_image_patches=[n] * len(image_sizes))


def _replace_image_token(self: Any, image_inputs: Any, image_idx: int, **kwargs: Any) -> str:
    return image_placeholder(self, _num_crops(self, kwargs))


def _call(self: Any, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
    """With `return_text_replacement_offsets`, ProcessorMixin's __call__ (each `<image>` replaced by
    its own placeholder, offsets reported); otherwise Idefics2Processor's own __call__, unchanged."""
    if kwargs.get("return_text_replacement_offsets"):
        from transformers.processing_utils import ProcessorMixin

        return ProcessorMixin.__call__(self, images=images, text=text, **kwargs)
    legacy = getattr(type(self), _LEGACY_CALL)
    return legacy(self, images=images, text=text, **kwargs)


for _fn in (_get_num_multimodal_tokens, _replace_image_token, _call):
    setattr(_fn, _MARK, True)
_call.__name__ = _call.__qualname__ = "__call__"
_replace_image_token.__name__ = _replace_image_token.__qualname__ = "replace_image_token"
_get_num_multimodal_tokens.__name__ = _get_num_multimodal_tokens.__qualname__ = "_get_num_multimodal_tokens"

__all__ = ["ARCHITECTURE", "image_placeholder", "is_patched", "patch_idefics2_processor", "register",
           "vllm_has_native_idefics2"]
