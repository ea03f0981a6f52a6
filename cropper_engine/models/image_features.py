"""Prompt inputs and cached image features for the transformers backend (a mixin of `TransformersVLM`).

A conversation becomes its prompt text (the processor's chat template) and its images fitted to the
model (`render`, `_inputs`). Where the model takes image features computed apart (Idefics2 /
Idefics3 style), they go through the vision tower a chunk at a time and are kept in an LRU by image
uuid, so a recurring image (a retrieved example, a refinement round's query) is encoded once; the
prompts' token ids then come from their text alone (`_prepare`), and the features fill their image
tokens (`_feature_kwargs`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from cropper_engine.errors import InputError
from cropper_engine.models.base import Conversation, ImagePart
from cropper_engine.models.hf_compat import encoder_keyword, encoder_kwargs, image_features

logger = logging.getLogger(__name__)


def _conversation_to_chat(conversation: Conversation,
                          fit: Any = None) -> tuple[list[dict[str, Any]], list[Any]]:
    messages, images = [], []
    for msg in conversation:
        content: list[dict[str, Any]] = []
        for part in msg.content:
            if isinstance(part, ImagePart):
                content.append({"type": "image"})
                images.append(fit(part) if fit else part.pil())
            elif isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                raise InputError(f"a message part must be text or an ImagePart, got {type(part).__name__}")
        if not content:
            content.append({"type": "text", "text": ""})
        messages.append({"role": msg.role, "content": content})
    return messages, images


class ImageFeatureMixin:
    """The prompt inputs and image feature cache of `TransformersVLM`, which provides `processor`,
    `tokenizer`, `model`, `device`, `dtype`, `_fit`, `_counter`, `_rope_index`, the cache's state
    (`_features`, `_feature_mode`, `_image_text`, `feature_cache_size`, `vision_chunk`,
    `image_cache_hits`, `image_cache_misses`), `_tick` and `_image_token_id`."""

    def render(self, conversation: Conversation) -> tuple[str, list[Any]]:
        """The prompt text (chat template applied, generation prompt added) and its images in order."""
        messages, images = _conversation_to_chat(conversation, self._fit)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, images

    def _render_text(self, conversation: Conversation) -> str:
        """The prompt text alone: no image is fitted (cached features stand in for them)."""
        messages, _ = _conversation_to_chat(conversation, lambda part: None)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, conversations: Sequence[Conversation]) -> Any:
        texts, images = [], []
        for conv in conversations:
            text, imgs = self.render(conv)
            texts.append(text)
            images.append(imgs)
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "padding_side": "left",
                                  "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
        return self.processor(**kwargs, add_special_tokens=self._counter.add_special_tokens)

    def _features_supported(self) -> bool:
        """Whether image features can be computed apart and fed back (Idefics2 / Idefics3 style)."""
        if self._feature_mode is None:
            key = encoder_keyword(self.model)
            ip = getattr(self.processor, "image_processor", None)
            ok = (key and hasattr(self.model, "get_image_features") and ip is not None
                  and not getattr(ip, "do_image_splitting", False)
                  and getattr(self.processor, "image_token", None) is not None
                  and self._rope_index is None)  # mrope: a prompt's positions depend on its images
            if ok:
                ok = self._init_image_text()
            self._feature_mode = key if ok else ""
        return bool(self._feature_mode)

    def _init_image_text(self) -> bool:
        """How a prompt's image placeholder becomes the model's image tokens without pixels.

        Idefics2's processor expands `<image>` in text alone; Idefics3's expands it only when given
        the images (its tokens name the tiles). With splitting off an image is one tile, so its
        tokens are the processor's own replacement for a 0 x 0 grid, the same for every image.
        """
        self._image_text = None
        token = str(self.processor.image_token)
        try:
            self.processor(text=[token], return_tensors="pt")
            return True
        except ValueError:  # "found <image> tokens in the text but no images were passed"
            pass
        try:
            text = self.processor.replace_image_token({"rows": [[0]], "cols": [[0]]}, 0)
        except (AttributeError, TypeError, KeyError, IndexError) as e:
            logger.info("image features are not cached: the processor expands images only with pixels (%s)", e)
            return False
        if not isinstance(text, str) or token not in text:
            return False
        self._image_text = text
        return True

    def _image_features(self, parts: list[ImagePart]) -> Any:
        """Pooled image features [n_images, tokens, hidden] in order; recurring images (by uuid)
        come from an LRU cache, the others go through the vision tower in one batch."""
        import torch

        todo: dict[int, Any] = {}
        keys = []
        for i, part in enumerate(parts):
            key = part.uuid if part.uuid and part.uuid in self._features else None
            if key is None:
                dup = next((j for j, q in todo.items() if part.uuid and q.uuid == part.uuid), None)
                if dup is None:
                    todo[i] = part
                key = ("new", dup if dup is not None else i)
            keys.append(key)
        new: dict[int, Any] = {}
        for c in range(0, len(todo), self.vision_chunk):  # a chunk at a time: bounded activations
            order = list(todo)[c: c + self.vision_chunk]
            pix = self.processor.image_processor([[self._fit(todo[i])] for i in order], return_tensors="pt")
            pv = pix["pixel_values"].to(self.device, self.dtype)
            pam = pix.get("pixel_attention_mask")
            t0 = time.perf_counter()
            feats = image_features(self.model, pv, pam.to(self.device) if pam is not None else None)
            self._tick("vision", t0)
            for k, i in enumerate(order):
                new[i] = feats[k]
                if parts[i].uuid:
                    self._features[parts[i].uuid] = feats[k]
                    if len(self._features) > self.feature_cache_size:
                        self._features.popitem(last=False)
        rows = []
        for key in keys:
            if isinstance(key, tuple):
                rows.append(new[key[1]])
            else:
                self._features.move_to_end(key)
                rows.append(self._features[key])
        self.image_cache_hits += sum(1 for k in keys if not isinstance(k, tuple))
        self.image_cache_misses += len(todo)
        return torch.stack(rows)

    def _prepare(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        """Model inputs: token ids from the processor (text only) plus cached image features.

        Private keys: "_feats" (all images' features, row-major) and "_counts" (images per row).
        """
        texts, parts, counts, uuids = [], [], [], []
        for conv in conversations:
            texts.append(self._render_text(conv))
            row = [p for m in conv for p in m.content if isinstance(p, ImagePart)]
            parts.extend(row)
            counts.append(len(row))
            uuids.append([p.uuid for p in row])
        if self._image_text is not None:
            token = str(self.processor.image_token)
            texts = [t.replace(token, self._image_text) for t in texts]
            inputs = dict(self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                                         add_special_tokens=self._counter.add_special_tokens))
        else:
            inputs = dict(self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt",
                                         add_special_tokens=self._counter.add_special_tokens))
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        inputs["_feats"] = self._image_features(parts) if parts else None
        inputs["_counts"] = counts
        inputs["_uuids"] = uuids
        return inputs

    def _feature_kwargs(self, ids: Any, feats: Any) -> dict[str, Any]:
        """The model's keyword for the image features of the prompts `ids` [B, T]; the features
        must fill the prompts' image tokens exactly (a mismatch on CUDA is a device-side assert
        that leaves the GPU unusable, so it is caught here first)."""
        token = self._image_token_id()
        n_tokens = int((ids == token).sum()) if token is not None else 0
        n_feats = 0 if feats is None else int(feats.shape[0] * feats.shape[1])
        if n_tokens != n_feats:
            raise RuntimeError(f"{n_feats} image feature vectors for {n_tokens} image tokens in the prompts")
        return encoder_kwargs(self._feature_mode or "", feats)
