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
each image on its own).

Image splitting may be set for the engine (the model's processor config, `--mm-processor-kwargs` or
`LLM(mm_processor_kwargs=...)`) or per request (`mm_processor_kwargs` in a chat request; a server
takes those only when started with `--trust-request-mm-kwargs`). vLLM 0.32's Transformers backend
counts each image's rows of pixel data with the engine's settings alone
(`MultiModalProcessor._get_num_patches_per_image` merges `{}`, not the request's kwargs), so a
request that turns splitting off on a model whose processor splits was refused ("returned 1 row(s)
of image data for 3 image(s), which cannot be split into the [5, 5, 5] row(s) per image").
`patch_vllm_transformers_backend()` (also run by `register()`) makes that count see the request's
kwargs, for processors this module patched only; without per-request kwargs vLLM's own code runs.

Importing this module is cheap (nothing but the standard library) and works without vLLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURE = "Idefics2ForConditionalGeneration"
_MARK = "_cropper_vllm_plugin"  # set on every function this module adds
_LEGACY_CALL = "_cropper_legacy_call"  # the processor's own __call__, kept on the class
# The mm_processor_kwargs of the request vLLM's Transformers backend is processing (set around its
# `_apply_hf_processor_main`, read by its per-image row count): None outside one
_REQUEST_MM_KWARGS: ContextVar[Mapping[str, Any] | None] = ContextVar("cropper_request_mm_kwargs", default=None)


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
    try:
        patch_vllm_transformers_backend()
    except Exception:
        logger.exception("cropper_engine: could not let vLLM's Transformers backend see per-request "
                         "mm_processor_kwargs")


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


def patch_vllm_transformers_backend(processor_cls: type | None = None) -> list[str]:
    """Let vLLM's Transformers backend (`MultiModalProcessor`, or `processor_cls`) count each image's
    rows of pixel data with the request's `mm_processor_kwargs` merged over the engine's, as the HF
    processor that made those rows saw them; return the names replaced.

    Only for processors this module patched (Idefics2Processor): for any other, and for a request
    without kwargs, vLLM's own count runs. Idempotent; [] without vLLM or where vLLM's processor
    lacks `_apply_hf_processor_main` / `_get_num_patches_per_image` (another design: nothing to fix).
    """
    if processor_cls is None:
        try:
            from vllm.model_executor.models.transformers.multimodal import MultiModalProcessor as processor_cls
        except Exception:  # no vLLM, or one without this backend
            return []
    main = processor_cls.__dict__.get("_apply_hf_processor_main")
    count = processor_cls.__dict__.get("_get_num_patches_per_image")
    if main is None or count is None or getattr(main, _MARK, False) or getattr(count, _MARK, False):
        return []

    def _apply_hf_processor_main(self: Any, mm_items: Any, hf_kwargs: Mapping[str, Any]) -> Any:
        token = _REQUEST_MM_KWARGS.set(hf_kwargs)
        try:
            return main(self, mm_items=mm_items, hf_kwargs=hf_kwargs)
        finally:
            _REQUEST_MM_KWARGS.reset(token)

    def _get_num_patches_per_image(self: Any, mm_data: Mapping[str, object]) -> list[int] | None:
        request = _REQUEST_MM_KWARGS.get()
        processor = self.info.get_hf_processor()
        if not request or not getattr(getattr(type(processor), "_get_num_multimodal_tokens", None), _MARK, False):
            return count(self, mm_data)
        images = mm_data.get("images")
        if not isinstance(images, Iterable) or not images:
            return None
        sizes = [(image.height, image.width) for image in images]
        # what vLLM's own count does, with the request's kwargs instead of none
        merged = self.info.ctx.get_merged_mm_kwargs(request)
        return list(processor._get_num_multimodal_tokens(image_sizes=sizes, **merged)["num_image_patches"])

    for fn in (_apply_hf_processor_main, _get_num_patches_per_image):
        setattr(fn, _MARK, True)
        fn.__qualname__ = f"{processor_cls.__name__}.{fn.__name__}"
        setattr(processor_cls, fn.__name__, fn)
    names = ["_apply_hf_processor_main", "_get_num_patches_per_image"]
    logger.info("cropper_engine: vLLM's %s counts image rows with per-request mm_processor_kwargs (%s)",
                processor_cls.__name__, ", ".join(names))
    return names


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

__all__ = ["ARCHITECTURE", "image_placeholder", "is_patched", "patch_idefics2_processor",
           "patch_vllm_transformers_backend", "register", "vllm_has_native_idefics2"]
