"""cropper-engine: local image cropping with open VLMs through in-context learning.

Only light imports here, so `cropper-engine --help` stays instant.
"""

from cropper_engine.errors import CropperError, ImageError, InputError
from cropper_engine.types import Box, Candidate, CropRequest, CropResult, Ratio, Task

__version__ = "0.1.0"

__all__ = [
    "Box",
    "Candidate",
    "CropRequest",
    "CropResult",
    "CropperError",
    "ImageError",
    "InputError",
    "Ratio",
    "Task",
    "__version__",
]
