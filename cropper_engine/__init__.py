"""cropper-engine: local image cropping with open VLMs through in-context learning.

    from cropper_engine import Cropper

    cropper = Cropper()                               # models load on the first crop
    crop = cropper.crop("photo.jpg", ratio="16:9")    # path, PIL image, numpy array or bytes
    crop.box, crop.score, crop.pipeline               # pixels (x1, y1, x2, y2), 0..1, how it was found
    crop.image().save("photo_16x9.jpg")               # the cropped pixels, upright, ICC profile kept

Only light imports here (no torch, no models), so `import cropper_engine` and `cropper-engine
--help` stay instant. See `Cropper` (cropper_engine/api.py) and docs/python.md.
"""

from typing import TYPE_CHECKING, Any

from cropper_engine.errors import (
    AnnotationError,
    BackendUnavailableError,
    ConfigError,
    CropperError,
    ExampleIndexError,
    ImageError,
    InputError,
    ModelNotFoundError,
)
from cropper_engine.types import Box, Candidate, CropRequest, CropResult, Ratio, Task

if TYPE_CHECKING:  # imported on first use (below), so the command line starts without them
    from cropper_engine.api import Crop, CropBox, Cropper

__version__ = "0.1.0"
_LAZY = {"Crop", "CropBox", "Cropper"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cropper_engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'cropper_engine' has no attribute {name!r}")

__all__ = [
    "AnnotationError",
    "BackendUnavailableError",
    "Box",
    "Candidate",
    "ConfigError",
    "Crop",
    "CropBox",
    "CropRequest",
    "CropResult",
    "Cropper",
    "CropperError",
    "ExampleIndexError",
    "ImageError",
    "InputError",
    "ModelNotFoundError",
    "Ratio",
    "Task",
    "__version__",
]
