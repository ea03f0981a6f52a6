"""The Python library: `from cropper_engine import Cropper`.

    from cropper_engine import Cropper

    cropper = Cropper()                                   # the best pipeline this machine has
    crop = cropper.crop("photo.jpg", ratio="16:9")
    print(crop.box, crop.score, crop.pipeline)            # CropBox(x1=..., y1=..., x2=..., y2=...) ...
    crop.image(size=(1280, 720)).save("photo_16x9.jpg")   # the cropped pixels, upright, ICC profile kept

Importing is light (no torch, no models): the engine is built on the first crop (or `load()`),
once, with the same choices as `cropper-engine crop` (`--vlm auto`: the VLM only where its weights
and a GPU are here, else the no-VLM default). Options mean what the command line's flags mean;
errors are the package's exceptions (`cropper_engine.errors`) with the command line's messages.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, overload

from cropper_engine.errors import CropperError, ImageError, InputError
from cropper_engine.types import Candidate, CropRequest, CropResult, Ratio, Task, parse_ratios

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from PIL import Image

    from cropper_engine.config import Config

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray"
RatioInput: TypeAlias = "str | Ratio | float"


class CropBox(NamedTuple):
    """A crop in pixels of the upright image: left, top, right, bottom (right and bottom are
    the edges: the crop is `x2 - x1` pixels wide). Unpacks as `x1, y1, x2, y2 = crop.box`."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


class Crop:
    """One crop of one image (and one ratio): where, how good, how it was found, and the pixels.

    >>> crop = Cropper().crop("photo.jpg", ratio="1:1")          # doctest: +SKIP
    >>> crop.box, round(crop.score, 2), crop.pipeline              # doctest: +SKIP
    (CropBox(x1=212, y1=0, x2=812, y2=600), 0.81, 'no-vlm')
    >>> crop.image(size=(256, 256)).size                           # doctest: +SKIP
    (256, 256)
    """

    def __init__(self, result: CropResult, size: tuple[int, int] | None = None) -> None:
        self.result = result
        self.size = size

    @property
    def box(self) -> CropBox:
        """x1, y1, x2, y2 in pixels of the upright image (as results.jsonl's `box`)."""
        return CropBox(*self.result.box.as_int())

    @property
    def score(self) -> float:
        return float(self.result.score)

    @property
    def pipeline(self) -> str:
        """vlm, vlm-fallback or no-vlm (the README's "What it is")."""
        return self.result.pipeline

    @property
    def ratio(self) -> Ratio | None:
        return self.result.ratio

    @property
    def task(self) -> Task:
        return self.result.task

    @property
    def candidates(self) -> list[Candidate]:
        """Every candidate considered (each with .box in pixels, .score, .scores, .round, .source)."""
        return self.result.candidates

    @property
    def notes(self) -> list[str]:
        """What the engine wants you to know about this crop (e.g. a face it could not keep whole)."""
        return self.result.notes

    @property
    def width(self) -> int:
        """The source image's upright width (the crop's is `box.width`)."""
        return self.result.width

    @property
    def height(self) -> int:
        return self.result.height

    def to_json(self) -> dict[str, Any]:
        """The crop as a results.jsonl line of `cropper-engine crop`."""
        return self.result.to_json()

    def image(self, size: tuple[int, int] | str | None = None) -> Image.Image:
        """The cropped pixels as an RGB PIL image: upright (EXIF rotation applied), the source's
        ICC profile in `.info["icc_profile"]`, shrunk to fit `size` (W, H or "WxH"; default: the
        `size` given to `crop`) keeping its ratio, never enlarged (as `--size`).

        The box of a large JPEG is found on a reduced decode; the full image is decoded here, on
        the first call, and kept for the image's other crops (its other ratios)."""
        from PIL import Image

        loaded = self.result.loaded
        if loaded is None:  # pragma: no cover - a result always carries its decoded image
            raise ImageError(f"{self.result.image}: the decoded image is no longer held")
        out = loaded.image.crop(tuple(self.result.box.as_int()))
        fit = _parse_size(size) if size is not None else self.size
        if fit and (out.width > fit[0] or out.height > fit[1]):
            out.thumbnail(fit, Image.Resampling.LANCZOS)
        if loaded.icc_profile:
            out.info["icc_profile"] = loaded.icc_profile
        return out

    def save(self, path: str | os.PathLike[str], size: tuple[int, int] | str | None = None,
             quality: int = 95) -> Path:
        """Write the crop (format from the suffix; JPEG at `quality`, no chroma subsampling; ICC
        profile kept) and return its path."""
        img = self.image(size)
        p = Path(path)
        kw: dict[str, Any] = {}
        if img.info.get("icc_profile"):
            kw["icc_profile"] = img.info["icc_profile"]
        if p.suffix.lower() in (".jpg", ".jpeg"):
            kw.update(quality=quality, subsampling=0)
        img.save(p, **kw)
        return p

    def __repr__(self) -> str:
        what = str(self.ratio) if self.ratio else self.task.value
        return f"Crop({self.box}, {what}, score={self.score:.3f}, pipeline={self.pipeline!r})"


def _parse_size(size: tuple[int, int] | str | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, str):
        a, sep, b = size.lower().partition("x")
        try:
            w, h = int(a), int(b)
        except ValueError:
            raise InputError(f"bad size {size!r}: write it as WxH in pixels, e.g. 1080x1080") from None
        if not sep:
            raise InputError(f"bad size {size!r}: write it as WxH in pixels, e.g. 1080x1080")
    else:
        try:
            w, h = (int(v) for v in size)
        except (TypeError, ValueError):
            raise InputError(f"bad size {size!r}: give (width, height) in pixels, e.g. (1080, 1080)") from None
    if w <= 0 or h <= 0:
        raise InputError(f"bad size {size!r}: width and height must be positive")
    return w, h


def _ratios(ratio: RatioInput | Sequence[RatioInput] | None) -> tuple[list[Ratio], bool]:
    """The ratios (`types.parse_ratios`: the command line's, the manifests' and the server's
    reading), and whether several were asked for (a comma list or a list: the answer is a list)."""
    ratios = parse_ratios(ratio)
    several = isinstance(ratio, (list, tuple)) or (isinstance(ratio, str) and len(ratios) > 1)
    return ratios, several


def _image_name(image: Any) -> str | None:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return None


def _check_image(image: Any) -> None:
    """Refuse what cannot be an image before anything runs: None, a number, a path with a NUL
    byte, an array or PIL image with no pixels (an ImageError or InputError naming the fix)."""
    import numpy as np

    if image is None:
        raise InputError("image is None: give a path, the bytes of an image file, a PIL image or an H x W x 3 "
                         "uint8 array")
    if isinstance(image, (bool, int, float, complex)):
        raise InputError(f"image {image!r} ({type(image).__name__}) is not an image: give a path, the bytes of an "
                         "image file, a PIL image or an H x W x 3 uint8 array")
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if (b"\0" if isinstance(text, bytes) else "\0") in text:
            raise InputError(f"image path {text[:80]!r} contains a NUL character, which no file name can: pass "
                             "a file's contents as bytes, not as a path")
        if not text:
            raise InputError("image path is empty: give the path of an image file")
        return
    if isinstance(image, np.ndarray) and image.ndim >= 2 and min(image.shape[:2]) <= 0:
        raise ImageError(f"the image array has no pixels (shape {image.shape}): an image needs at least 1 x 1 pixel")
    size = getattr(image, "size", None) if hasattr(image, "mode") and hasattr(image, "getbands") else None
    if isinstance(size, tuple) and len(size) == 2 and min(size) <= 0:
        raise ImageError(f"the PIL image has no pixels ({size[0]}x{size[1]}): an image needs at least 1 x 1 pixel")
    if isinstance(image, (bytes, bytearray, memoryview)) and len(image) == 0:
        raise ImageError("the image bytes are empty (0 bytes): give the contents of an image file")


def _as_source(image: Any) -> Any:
    if isinstance(image, memoryview):
        return image.tobytes()
    if isinstance(image, bytearray):
        return bytes(image)
    if isinstance(image, os.PathLike):
        return os.fspath(image)
    return image


def make_request(image: Any, ratio: RatioInput | Sequence[RatioInput] | None = None, *,
                 task: str | Task | None = None, mask: Any = None, subject: Any = None,
                 keep_faces: bool | None = None, id: str | None = None) -> tuple[CropRequest, bool]:
    """A CropRequest with the command line's rules (the task inferred from ratio / mask /
    subject, and the same refusals), and whether the answer is a list (several ratios)."""
    from cropper_engine.types import SubjectSpec

    _check_image(image)
    ratios, several = _ratios(ratio)
    spec = SubjectSpec.parse(subject) if subject is not None else None
    if spec is not None and mask is not None:
        raise InputError("mask and subject both name the subject: give one (subject='MASK.png' works too)")
    t = Task.parse(task) if task else (Task.RATIO if ratios else Task.SUBJECT if mask is not None or spec else
                                       Task.FREE)
    if t is Task.RATIO and not ratios:
        raise InputError("task='ratio' needs ratio='W:H' (e.g. ratio='4:3' or ratio=['1:1', '16:9'])")
    if t is not Task.RATIO and ratios:
        raise InputError(f"ratio only applies to the ratio task (not {t.value})")
    if t is Task.SUBJECT and mask is None and spec is None:
        raise InputError("task='subject' needs mask= (a white-on-black subject mask: path, PIL image or array) or "
                         "subject='auto' | 'face' | 'person' | 'saliency' | 'X,Y' | 'X1,Y1,X2,Y2'")
    if t is Task.FREE and spec is not None:
        raise InputError("subject applies to the subject task, or with ratio= to every ratio's crop; "
                         "not to task='free' (keep_faces does)")
    if isinstance(mask, (str, os.PathLike)):
        mask = os.fspath(mask)
    elif isinstance(mask, (bytearray, memoryview)):
        mask = bytes(mask)
    src = _as_source(image)
    req = CropRequest(src, t, ratios, mask, id=id if id is not None else _image_name(src), subject=spec,
                      keep_faces=keep_faces)
    return req, several


class Cropper:
    """Crop images from Python with the engine behind `cropper-engine crop`.

    Build it once and reuse it (the models load on the first crop and stay loaded):

    >>> from cropper_engine import Cropper
    >>> cropper = Cropper()                               # defaults; a config file / CROPPER_* env apply
    >>> cropper = Cropper(vlm="none")                     # keyword overrides: the no-VLM default
    >>> cropper = Cropper("cropper.toml", index="idx/")   # a TOML config, then overrides  # doctest: +SKIP
    >>> cropper = Cropper(default_model="my_model/")      # a model of `cropper-engine fit`  # doctest: +SKIP

    Keyword overrides: `vlm`, `backend`, `index`, `embedder`, `default_model`, `keep_faces`
    ("auto" | "on" | "off"), `batch_size`, and any other config key as a dotted name in
    `overrides={"vlm.candidates": 4}`. `config` is a Config, the path of a TOML file, or None
    (then `CROPPER_CONFIG` if set); the environment's `CROPPER_*` variables apply as on the
    command line, the overrides last.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None, *, vlm: str | None = None,
                 backend: str | None = None, index: str | os.PathLike[str] | None = None,
                 embedder: str | None = None, default_model: str | os.PathLike[str] | None = None,
                 keep_faces: str | bool | None = None, batch_size: int | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        from cropper_engine.config import Config, load_config

        flat: dict[str, Any] = {
            "vlm.model": vlm, "vlm.backend": backend, "index": os.fspath(index) if index is not None else None,
            "retrieval.embedder": embedder, "vlm.batch_size": batch_size,
            "default_model": os.fspath(default_model) if default_model is not None else None,
            "loop.keep_faces": {True: "on", False: "off"}.get(keep_faces, keep_faces)  # type: ignore[arg-type]
            if keep_faces is not None else None,
            **dict(overrides or {}),
        }
        if isinstance(config, Config):
            from cropper_engine.config import _merge, dotted_to_tree, validate

            cfg = _merge(config, dotted_to_tree(flat))
            validate(cfg)
        else:
            cfg = load_config(os.fspath(config) if config is not None else None, overrides=flat)
        self.config: Config = cfg
        self._engine: Any = None

    # -- the engine -------------------------------------------------------------------------

    def load(self) -> Cropper:
        """Build the engine now (else the first crop does): resolve and load the models."""
        if self._engine is None:
            from cropper_engine.engine.loop import Cropper as Engine

            self._engine = Engine.from_config(self.config)
        return self

    @property
    def engine(self) -> Any:
        """The underlying `cropper_engine.engine.loop.Cropper` (built on first use)."""
        return self.load()._engine

    def describe(self) -> dict[str, Any]:
        """Which pipeline, embedder, index and scorer are in use, and why (as `crop` prints)."""
        return self.engine.describe()

    def close(self) -> None:
        """Release the models (a VLM's memory); the next crop loads them again."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Cropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cropping -----------------------------------------------------------------------------

    @overload
    def crop(self, image: ImageInput, ratio: list[RatioInput] | tuple[RatioInput, ...], *,
             task: str | Task | None = ...,
             mask: Any = ..., subject: Any = ..., size: tuple[int, int] | str | None = ...,
             keep_faces: bool | None = ..., id: str | None = ...) -> list[Crop]: ...

    @overload
    def crop(self, image: ImageInput, ratio: str | Ratio | float | None = ..., *, task: str | Task | None = ...,
             mask: Any = ..., subject: Any = ..., size: tuple[int, int] | str | None = ...,
             keep_faces: bool | None = ..., id: str | None = ...) -> Crop: ...

    def crop(self, image: ImageInput, ratio: RatioInput | Sequence[RatioInput] | None = None, *,
             task: str | Task | None = None, mask: Any = None, subject: Any = None,
             size: tuple[int, int] | str | None = None, keep_faces: bool | None = None,
             id: str | None = None) -> Crop | list[Crop]:
        """Crop one image.

        image: a path, a PIL image, a numpy array (H x W x 3 uint8, RGB) or the bytes of an image file.
        ratio: "16:9" (also a Ratio or a number, width / height) gives one Crop; several ("1:1,16:9"
            or a list) give a list of Crops, one per ratio, in order. Implies task="ratio".
        task: "free" | "subject" | "ratio"; inferred as on the command line when not given.
        mask: the subject (white on black, the image's size): a path, PIL image or array.
        subject: "auto" | "face" | "person" | "saliency" | "X,Y" | "X1,Y1,X2,Y2" | a mask path:
            the subject task's subject, or with ratio= a subject every crop keeps.
        size: (W, H) or "WxH": `Crop.image()` shrinks the crop to fit it (never enlarges).
        keep_faces: no crop cuts through a detected face (default: the config's loop.keep_faces).

        >>> crop = Cropper().crop("photo.jpg", ratio="4:5")                 # doctest: +SKIP
        >>> crops = Cropper().crop("photo.jpg", ratio=["1:1", "16:9"])      # doctest: +SKIP

        Raises InputError (bad options), ImageError (an image that cannot be read) or another
        CropperError, with the command line's messages.
        """
        req, several = make_request(image, ratio, task=task, mask=mask, subject=subject, keep_faces=keep_faces,
                                    id=id)
        fit = _parse_size(size)
        out = self.engine.crop_batch([req])[0]
        if isinstance(out, CropperError):
            raise out
        crops = [Crop(r, fit) for r in out]
        return crops if several else crops[0]

    def crop_many(self, images: Iterable[ImageInput | Mapping[str, Any]],
                  ratio: RatioInput | Sequence[RatioInput] | None = None, *, task: str | Task | None = None,
                  mask: Any = None, subject: Any = None, size: tuple[int, int] | str | None = None,
                  keep_faces: bool | None = None, batch_size: int | None = None,
                  ) -> Iterator[Crop | list[Crop] | CropperError]:
        """Crop many images, `batch_size` at a time (default: the config's vlm.batch_size, 8),
        yielding one answer per input, in order, as soon as its batch is done: a Crop (a list
        for several ratios), or the CropperError that image got (a missing file, a corrupt
        image, a bad option): an error never stops the stream. The input is read lazily (a
        generator over a million paths is fine); only one batch of images is held at a time.

        An item is an image (as for `crop`) or a dict {"image": ..., "ratio"?, "task"?, "mask"?,
        "subject"?, "keep_faces"?, "id"?} whose keys override the call's options for that image.

        >>> for path, crop in zip(paths, cropper.crop_many(paths, ratio="1:1")):   # doctest: +SKIP
        ...     if isinstance(crop, CropperError):
        ...         print("skipped", path, crop)
        ...     else:
        ...         crop.image().save(f"thumbs/{crop.box.x1}.jpg")
        """
        fit = _parse_size(size)
        n = batch_size or self.config.vlm.batch_size
        if n < 1:
            raise InputError(f"batch_size must be 1 or more, got {n}")
        base = {"ratio": ratio, "task": task, "mask": mask, "subject": subject, "keep_faces": keep_faces}
        it = iter(images)
        while True:
            chunk = list(itertools.islice(it, n))
            if not chunk:
                return
            slots: list[Any] = []
            todo: list[tuple[int, CropRequest, bool]] = []
            for k, item in enumerate(chunk):
                opts = dict(base)
                if isinstance(item, Mapping):
                    if "image" not in item:
                        slots.append(InputError(f"item {item!r} has no 'image' key"))
                        continue
                    unknown = set(item) - {"image", "ratio", "task", "mask", "subject", "keep_faces", "id"}
                    if unknown:
                        slots.append(InputError(f"unknown key(s) {', '.join(sorted(unknown))} in an item; valid: "
                                                "image, ratio, task, mask, subject, keep_faces, id"))
                        continue
                    opts.update({key: v for key, v in item.items() if key != "image"})
                    item = item["image"]
                try:
                    req, several = make_request(item, **opts)
                except CropperError as exc:
                    slots.append(exc)
                    continue
                slots.append(None)
                todo.append((k, req, several))
            if todo:
                outs = self._crop_each([r for _, r, _ in todo])
                for (k, _, several), out in zip(todo, outs, strict=True):
                    if isinstance(out, CropperError):
                        slots[k] = out
                    else:
                        crops = [Crop(r, fit) for r in out]
                        slots[k] = crops if several else crops[0]
            yield from slots

    def _crop_each(self, requests: list[CropRequest]) -> list[Any]:
        """The engine's answers for a batch; where the batch as a whole raises (an engine fault on
        one image), each request again alone, so that only the one that fails gets an error and
        the others their crops: a stream never ends on one item."""
        try:
            return list(self.engine.crop_batch(requests))
        except Exception as exc:  # any fault of one item must not end the stream
            if len(requests) > 1:
                return [self._crop_each([r])[0] for r in requests]
            if isinstance(exc, CropperError):
                return [exc]
            what = requests[0].id or "this image"
            err = CropperError(f"{what}: the engine failed on it ({type(exc).__name__}: {exc}); the other images "
                               "went on. Please report it with the image")
            err.__cause__ = exc
            return [err]


__all__ = ["Crop", "CropBox", "Cropper", "make_request"]
