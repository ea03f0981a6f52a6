"""A crop request's image, in and out: an upload read into an `Upload` (multipart `parse_form`,
JSON `parse_json_body`), the pixels decoding it will hold (`probe_pixels`), decoded and checked
into a CropRequest (`prepare`), its name made safe (`_filename`), and the crop encoded for
?return=image (`encode_crop`). Images are only ever read from the request body: a URL is refused,
never fetched."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from cropper_engine.errors import InputError
from cropper_engine.server.errors import HTTPError, format_mb, upload_limit

FORM_FIELDS = ("image", "task", "ratio", "mask", "id", "subject", "keep_faces")


_URL = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|//|www\.)", re.IGNORECASE)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Upload:
    image: bytes
    filename: str
    task: str | None = None
    ratio: Any = None  # "W:H", "W:H,W:H" or a list of them
    mask: bytes | None = None
    id: str | None = None
    subject: str | None = None  # auto | face | person | saliency | "x,y" | "x1,y1,x2,y2" (engine/subject/)
    keep_faces: bool | None = None
    mask_filename: str = "mask"


def _bool_field(value: Any, key: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise HTTPError(400, "bad_request", f"'{key}' must be true or false, got {value!r}")


def _b64(value: Any, field: str) -> bytes:
    if isinstance(value, dict) and ("url" in value or "image_url" in value):
        raise HTTPError(400, "url_refused", f"'{field}' looks like a URL object: images are never fetched "
                        "from URLs; send the image bytes (base64 in JSON, or a multipart file upload)")
    if not isinstance(value, str):
        raise HTTPError(400, "bad_request", f"'{field}' must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise HTTPError(400, "bad_request", f"'{field}': only base64 data URLs are accepted "
                            "(data:image/png;base64,...)")
    elif _URL.match(text):
        raise HTTPError(400, "url_refused", f"'{field}' is a URL: images are never fetched from URLs; send "
                        "the image bytes (base64 in JSON, or a multipart file upload)")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "bad_request", f"'{field}' is not valid base64") from None
    if not raw:
        raise HTTPError(400, "bad_request", f"'{field}' is empty")
    return raw


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise HTTPError(400, "bad_request", f"'{key}' must be a string, got {type(v).__name__}")
    return v


def parse_json_body(raw: bytes) -> Upload:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, "bad_request", f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "bad_request", "the JSON body must be an object: "
                        '{"image": "<base64>", "task"?, "ratio"?, "mask"?, "id"?}')
    unknown = sorted(set(data) - set(FORM_FIELDS))
    if unknown:
        raise HTTPError(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; "
                        f"valid fields: {', '.join(FORM_FIELDS)}")
    if "image" not in data:
        raise HTTPError(400, "bad_request", "'image' is required: the image file as base64")
    ratio = data.get("ratio")
    if ratio is not None and not (isinstance(ratio, str) or (isinstance(ratio, list)
                                                               and all(isinstance(r, str) for r in ratio))):
        raise HTTPError(400, "bad_request", "'ratio' must be a string like \"16:9\" (or a list of them)")
    mask = data.get("mask")
    return Upload(_b64(data["image"], "image"), "upload", _opt_str(data, "task"), ratio,
                  _b64(mask, "mask") if mask is not None else None, _opt_str(data, "id"),
                  _opt_str(data, "subject"), _bool_field(data.get("keep_faces"), "keep_faces"))


async def parse_form(request: Any, max_bytes: int, limit_mb: float) -> Upload:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=2, max_fields=8, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise HTTPError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    except StarletteHTTPException as exc:  # what Starlette makes of a MultiPartException inside an app
        if exc.status_code != 400:
            raise
        raise HTTPError(400, "bad_request", f"malformed multipart body: {exc.detail}") from None
    try:
        keys = [k for k, _ in form.multi_items()]
        unknown = sorted(set(keys) - set(FORM_FIELDS))
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; "
                            f"valid fields: {', '.join(FORM_FIELDS)}")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise HTTPError(400, "bad_request", f"field(s) given more than once: {', '.join(dup)} "
                            "(several ratios go in one field: ratio=1:1,16:9)")

        async def file_field(name: str) -> tuple[bytes, str] | None:
            v = form.get(name)
            if v is None:
                return None
            if not isinstance(v, UploadFile):
                if _URL.match(v):
                    raise HTTPError(400, "url_refused", f"'{name}' is a URL: images are never fetched from "
                                    "URLs; upload the file itself")
                raise HTTPError(400, "bad_request", f"'{name}' must be a file upload (multipart file part)")
            data = await v.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPError(413, "too_large", f"'{name}' is over the limit of {upload_limit(limit_mb)}")
            if not data:
                raise HTTPError(400, "bad_request", f"'{name}' is an empty file")
            return data, v.filename or "upload"

        def text_field(name: str) -> str | None:
            v = form.get(name)
            if v is None:
                return None
            if not isinstance(v, str):
                raise HTTPError(400, "bad_request", f"'{name}' must be a text field, not a file")
            return v

        image = await file_field("image")
        if image is None:
            raise HTTPError(400, "bad_request", "'image' is required: a file part named image")
        mask = await file_field("mask")
        return Upload(image[0], image[1], text_field("task"), text_field("ratio"),
                      mask[0] if mask else None, text_field("id"), text_field("subject") or None,
                      _bool_field(text_field("keep_faces"), "keep_faces"), mask[1] if mask else "mask")
    finally:
        await form.close()


def prepare(upload: Upload, max_pixels: int, max_bytes: int, limit_mb: float | None = None,
            draft_side: Any = None) -> tuple[Any, int]:
    """Decode and check an upload (on a worker thread): a CropRequest and its job count.
    `draft_side(subject)`: the engine's `Cropper.draft_side`, how large a decode it needs (a large
    JPEG is decoded small for the box, at full size only for return=image)."""
    import numpy as np

    from cropper_engine.engine.subject import SubjectSpec, require_detectors
    from cropper_engine.imageio import load_mask, open_image
    from cropper_engine.types import CropRequest, Task, parse_ratios

    if len(upload.image) > max_bytes:
        limit = upload_limit(limit_mb) if limit_mb is not None else format_mb(max_bytes)
        raise HTTPError(413, "too_large", f"the image is {format_mb(len(upload.image))}, over the limit of "
                        f"{limit}")
    ratios = parse_ratios(upload.ratio, "ratio")  # the library's, the CLI's and the manifests' reading
    if len(ratios) > 16:
        raise InputError(f"{len(ratios)} ratios in one request; at most 16")
    spec = SubjectSpec.parse(upload.subject) if upload.subject else None
    if spec is not None and spec.kind == "mask":  # never a path on this server's disk
        raise InputError("subject: send a mask as the 'mask' file field, not a path; subject takes auto, "
                         "face, person, saliency, x,y or x1,y1,x2,y2")
    task = Task.parse(upload.task) if upload.task else (
        Task.RATIO if ratios else Task.SUBJECT if upload.mask is not None or spec is not None else Task.FREE)
    if task is Task.RATIO and not ratios:
        raise InputError("the ratio task needs a ratio, e.g. ratio=16:9")
    if task is not Task.RATIO and ratios:
        raise InputError(f"a ratio only applies to the ratio task (not {task.value})")
    if task is Task.SUBJECT and upload.mask is None and spec is None:
        raise InputError("the subject task needs a mask (a white-on-black image of the image's size) or a "
                         "subject: auto, face, person, saliency, x,y or x1,y1,x2,y2")
    if task is Task.FREE and upload.mask is not None:
        raise InputError("a mask applies to the subject task, or with a ratio to every ratio's crop (the subject "
                         "kept inside); not to the free-form task")
    side = draft_side(spec) if draft_side is not None else None
    loaded = open_image(upload.image, max_pixels, name=upload.filename, draft_side=side)
    if spec is not None:
        spec.check(*loaded.size)  # a point outside the image, a box that misses it: 422 now
    require_detectors(spec, upload.keep_faces)
    mask = None
    if upload.mask is not None:  # the images' pixel limit and messages (imageio.load_mask)
        mask = np.ascontiguousarray(load_mask(upload.mask, loaded.size, max_pixels,
                                              name=f"the mask {upload.mask_filename}"))
    req = CropRequest(loaded, task, ratios, mask, upload.id, subject=spec, keep_faces=upload.keep_faces)
    return req, max(1, len(ratios))


def probe_pixels(upload: Upload, max_pixels: int) -> int:
    """The pixels that decoding an upload will hold (image and mask), from their headers only;
    a header that cannot be read counts 0 (`prepare` then names the problem)."""
    from cropper_engine.imageio import probe_pixels as header_pixels

    # pixels charged by bytes per pixel (a 16-bit or alpha image holds more); an unreadable header
    # counts 0: prepare refuses it without decoding
    return sum(min(header_pixels(data, max_pixels), max_pixels + 1) for data in (upload.image, upload.mask) if data)


def _filename(name: str) -> str:
    name = Path(name.replace("\\", "/")).name
    return _SAFE_NAME.sub("_", name)[:120] or "upload"


def encode_crop(result: Any) -> tuple[bytes, str]:
    """The chosen crop of the decoded upload (at full size: a JPEG decoded small for its box is
    decoded again whole), in the upload's format where it is a common one; a HEIC or AVIF photo's
    as JPEG."""
    from cropper_engine.imageio import AVIF_SUFFIXES, HEIF_SUFFIXES

    loaded = result.loaded
    fmt = "PNG"
    suffix = Path(loaded.path).suffix.lower()
    if suffix in (".jpg", ".jpeg", *HEIF_SUFFIXES, *AVIF_SUFFIXES) or loaded.format in ("HEIF", "AVIF"):
        fmt = "JPEG"
    elif suffix == ".webp":
        fmt = "WEBP"
    crop = loaded.image.crop(tuple(result.box.as_int()))
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
    if loaded.icc_profile:
        kw["icc_profile"] = loaded.icc_profile
    crop.save(buf, fmt, **kw)
    return buf.getvalue(), {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[fmt]
