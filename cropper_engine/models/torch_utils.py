"""torch helpers the CLIP embedders share: the device, the dtype, the hub's offline mode while
loading, and images or pixel tensors made ready for a model. torch is imported inside the
functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from cropper_engine.errors import BackendUnavailableError, InputError


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, fp32, fp16, bf16")
    return names[dtype]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub offline mode while loading (a guard: we only pass local paths anyway)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    constants: Any = None
    old = None
    try:
        import huggingface_hub.constants as constants

        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _as_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if hasattr(image, "working"):  # cropper_engine.imageio.LoadedImage: its decode (reduced for a large JPEG)
        return image.working
    if isinstance(image, np.ndarray):
        from cropper_engine.imageio import open_image

        return open_image(image).image
    raise InputError(f"cannot embed a {type(image).__name__}; pass PIL images")


def _prepare_pixels(pixels: Any, size: int, mean: Any, std: Any, device: str, dtype: Any) -> Any:
    """[N,3,H,W] 0..1 -> normalised [N,3,size,size] on device (resized bilinearly if needed)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(pixels)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"pixels must be a [N, 3, {size}, {size}] tensor, got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - mean) / std
    return x.to(dtype)
