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
    edge = _size_value(getattr(getattr(processor, "image_processor", None), "size", None), "longest_edge")
    return int(edge) if edge else None


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
            box = tuple(v * f for v in box)
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
