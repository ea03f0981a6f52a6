"""Preparing conversation images for a VLM: shrink once, on the CPU, to what the model reads.

Large photos are resized with PIL to the processor's longest edge before the processor sees
them, so its own (slower, per-call) resize has nothing left to do; recurring images (examples,
by uuid) are shrunk once; a candidate crop (an ImagePart with a box) is cut and resized in one
step from a proxy of its image at twice the model's resolution. Both backends use the same
fitter, so they feed the model the same pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from cropper_engine.models.base import ImagePart


def _size_value(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def max_pixels(processor: Any) -> int | None:
    """The pixel budget of a processor that resizes by area (Qwen2-VL / Qwen2.5-VL: images keep
    their aspect and are scaled to at most `max_pixels`, which its `size` calls "longest_edge")."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or not (hasattr(ip, "merge_size") and hasattr(ip, "temporal_patch_size")):
        return None
    budget = getattr(ip, "max_pixels", None) or _size_value(getattr(ip, "size", None), "longest_edge")
    return int(budget) if budget else None


def longest_edge(processor: Any) -> int | None:
    """The longest image edge a HF processor resizes to (None if it has no such bound)."""
    if max_pixels(processor) is not None:  # its "longest_edge" is a number of pixels
        return None
    ip = getattr(processor, "image_processor", None)
    tile = _size_value(getattr(ip, "max_image_size", None), "longest_edge")
    if tile and getattr(ip, "do_image_splitting", True) is False:  # Idefics3 without tiles: one image of a tile
        return int(tile)
    edge = _size_value(getattr(ip, "size", None), "longest_edge")
    return int(edge) if edge else None


def apply_processor_settings(processor: Any, settings: dict[str, Any] | None) -> dict[str, Any]:
    """Set the engine's per-model settings on a loaded HF processor (registry.PROCESSOR_SETTINGS):
    `do_image_splitting` where the image processor has it, `max_pixels` as a pixel budget where
    it resizes by area (never raised above the processor's own). Returns what was applied, which
    is what vLLM gets as `mm_processor_kwargs`."""
    ip = getattr(processor, "image_processor", None)
    applied: dict[str, Any] = {}
    if ip is None or not settings:
        return applied
    if "do_image_splitting" in settings and hasattr(ip, "do_image_splitting"):
        ip.do_image_splitting = bool(settings["do_image_splitting"])
        applied["do_image_splitting"] = ip.do_image_splitting
    budget = settings.get("max_pixels")
    current = max_pixels(processor)
    if budget and current is not None:
        budget = min(int(budget), current)
        size = getattr(ip, "size", None)
        if isinstance(size, dict):
            ip.size = {**size, "longest_edge": budget}
        elif size is not None:
            size.longest_edge = budget
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = budget
        applied["max_pixels"] = budget
    return applied


# Image shapes the tokens per image are measured at: square, landscape, portrait, panoramas;
# large enough to reach any pixel budget the engine sets.
_PROBE_SHAPES = ((1024, 1024), (1024, 576), (576, 1024), (2048, 512), (512, 2048))


def measure_image_tokens(processor: Any) -> int:
    """The most prompt tokens one image takes with this processor at its current settings: the
    processor's expansion of its image token, measured by running it (not read from a table).
    Processors whose count depends on the image's size (Qwen2.5-VL) give their largest."""
    from PIL import Image

    token = str(getattr(processor, "image_token", None) or "<image>")
    tok = processor.tokenizer
    base = len(tok([token])["input_ids"][0])
    most = 0
    for w, h in _PROBE_SHAPES:
        out = processor(text=[token], images=[[Image.new("RGB", (w, h), (127, 127, 127))]])
        most = max(most, len(out["input_ids"][0]) - base + 1)
        if max_pixels(processor) is None and getattr(getattr(processor, "image_processor", None),
                                                     "do_image_splitting", False) is False:
            break  # a fixed number per image
    return most


def template_writes_bos(processor: Any) -> bool:
    """Whether the chat template itself starts the prompt with the tokenizer's BOS (then the
    tokenizer must not add another). Idefics2's writes none: the BOS comes from the tokenizer."""
    bos = getattr(getattr(processor, "tokenizer", None), "bos_token", None)
    if not bos:
        return False
    try:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # no template: the caller finds out when it renders
        return False
    return str(text).startswith(str(bos))


class PromptCounter:
    """Prompt tokens of a conversation without pixels: the chat template's text tokenized, each
    image counted at `measure_image_tokens` (exact for a fixed count per image, an upper bound
    for Qwen2.5-VL). For the token budget (engine/budget.py)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.image_tokens = measure_image_tokens(processor)
        self.add_special_tokens = not template_writes_bos(processor)

    def __call__(self, conversation: Any) -> int:
        messages, n_images = [], 0
        for msg in conversation:
            content: list[dict[str, Any]] = []
            for part in msg.content:
                if isinstance(part, ImagePart):
                    content.append({"type": "image"})
                    n_images += 1
                else:
                    content.append({"type": "text", "text": str(part)})
            messages.append({"role": msg.role, "content": content or [{"type": "text", "text": ""}]})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.processor.tokenizer([text], add_special_tokens=self.add_special_tokens)["input_ids"][0]
        return len(ids) + n_images * (self.image_tokens - 1)


class ImageFitter:
    def __init__(self, edge: int | None, capacity: int = 512, max_pixels: int | None = None) -> None:
        self.edge = edge
        self.max_pixels = max_pixels  # an area bound as well (or instead), for processors that resize by area
        self.capacity = capacity
        self._fitted: OrderedDict[str, Any] = OrderedDict()
        self._proxies: OrderedDict[int, tuple[Any, Any, float]] = OrderedDict()

    def __call__(self, part: ImagePart) -> Any:
        w, h = part.size
        s = self.edge / max(w, h) if self.edge else 1.0
        if self.max_pixels and w * h > self.max_pixels:
            s = min(s, (self.max_pixels / (w * h)) ** 0.5)
        if s >= 1.0:
            return part.pil()
        if part.uuid and part.uuid in self._fitted:
            self._fitted.move_to_end(part.uuid)
            return self._fitted[part.uuid]
        from PIL import Image

        src, box = part.image, part.box
        if box is not None:  # a region: cut it from a proxy at twice the model's resolution
            src, f = self._proxy(part.image)
            # the proxy's sides are rounded: a region reaching the image's edge can land a fraction
            # of a pixel outside it, which PIL refuses
            x1, y1, x2, y2 = (v * f for v in box)
            box = (max(0.0, x1), max(0.0, y1), min(x2, src.width), min(y2, src.height))
        out = src.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR,
                         box=box, reducing_gap=2.0)
        if part.uuid:
            self._fitted[part.uuid] = out
            if len(self._fitted) > self.capacity:
                self._fitted.popitem(last=False)
        return out

    def _proxy(self, image: Any) -> tuple[Any, float]:
        """The image shrunk to twice the longest edge (once per image), and the scale."""
        key = id(image)
        hit = self._proxies.get(key)
        if hit is not None and hit[0] is image:
            return hit[1], hit[2]
        edge = 2 * (self.edge or max(image.size))
        f = min(1.0, edge / max(image.size))
        proxy = image if f >= 1.0 else image.resize(
            (max(1, round(image.width * f)), max(1, round(image.height * f))), reducing_gap=2.0)
        self._proxies[key] = (image, proxy, f)
        if len(self._proxies) > 64:
            self._proxies.popitem(last=False)
        return proxy, f
