"""The few exceptions the library raises; each message names the problem and the fix."""


class CropperError(Exception):
    """Base class: a problem the user can act on (the CLI prints it without a traceback)."""


class InputError(CropperError, ValueError):
    """A bad argument, option, ratio, mask or request."""


class ImageError(CropperError):
    """An image that cannot be read: missing, corrupt, truncated, too large or not an image."""


class AnnotationError(CropperError):
    """A dataset annotation file or record that cannot be used."""


class ConfigError(CropperError):
    """A bad configuration file, environment variable or option value."""


class ModelNotFoundError(CropperError):
    """Weights or a model folder that are not on this machine."""


class ExampleIndexError(CropperError):
    """An example index that is missing, damaged, or built with another embedder."""


class BackendUnavailableError(CropperError):
    """A backend whose packages or hardware are not present here."""


__all__ = [
    "AnnotationError",
    "BackendUnavailableError",
    "ConfigError",
    "CropperError",
    "ExampleIndexError",
    "ImageError",
    "InputError",
    "ModelNotFoundError",
]
