"""The HTTP service: `create_app(config)` builds an ASGI app whose lifespan owns one engine.

    POST /v1/crop      multipart (image, task, ratio, mask, id) or JSON (base64 image);
                       answers a results.jsonl line, or the cropped image with ?return=image
    GET  /v1/info      the pipeline, its models and the limits
    GET  /healthz      alive;  GET /readyz: models loaded (and an external VLM reachable)
    GET  /metrics      Prometheus: requests, latency per stage, queue depth, batch sizes, fallbacks
    GET  /             a page to try it;  /docs, /openapi.json: the API

Requests are decoded and checked on the event loop's thread pool (pre), cropped in batches by
one engine thread (`batching.BatchingEngine`, core), and encoded back on the pool (post). Every
bad input is a 4xx with a JSON body `{"error": {"type", "message"}}`; a full queue, a loading
engine or an unreachable VLM server are 503 with Retry-After; a request over its time is 504.
Images are only ever read from the request body: a URL is refused, never fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from cropper_engine.config import Config, ServerConfig, load_config
from cropper_engine.errors import ConfigError, CropperError, ImageError, InputError
from cropper_engine.imageio import format_pixels, with_image_notes

log = logging.getLogger("cropper_engine.server")

STATIC_DIR = Path(__file__).with_name("static")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FORM_FIELDS = ("image", "task", "ratio", "mask", "id", "subject", "keep_faces")
SUBJECT_DOC = ("The subject without a mask: auto (faces, else persons, else the salient region), face, person, "
               "saliency, X,Y (a focal point, px) or X1,Y1,X2,Y2 (a box, px); not a file path.")
KEEP_FACES_DOC = ("No crop cuts through a detected face [default: the server's loop.keep_faces; auto: on where "
                  "a face detector is installed].")
_URL = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|//|www\.)", re.IGNORECASE)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --- errors --------------------------------------------------------------------------------


class HTTPError(Exception):
    """An answer other than 200: status, a short machine-readable type and a message."""

    def __init__(self, status: int, type_: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.retry_after = status, type_, message, retry_after


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive within server.body_timeout_s of its headers."""


INTERNAL_MESSAGE = "internal error: the server could not handle this request (a fault of the server, logged there)"
STARLETTE_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_response(status: int, type_: str, message: str, retry_after: int | None = None) -> Any:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(cfg: Config) -> None:
    """Binding anywhere but loopback needs an API key; the key and the limits must be usable."""
    s = cfg.server
    if s.api_key and s.api_key != s.api_key.strip():
        what = "is blank" if not s.api_key.strip() else "has spaces around it"
        raise ConfigError(f"the API key {what}: no request could send it (a Bearer token is trimmed); "
                          "set a key of visible characters, e.g. CROPPER_SERVER_API_KEY=$(openssl rand -hex 16)")
    for key in ("header_timeout_s", "body_timeout_s", "send_timeout_s", "request_timeout_s", "decode_wait_s",
                "max_pixels_in_flight", "max_upload_mb", "max_batch", "queue_size"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"server.{key} must be positive, got {getattr(s, key)}")
    if not is_loopback(cfg.server.host) and not cfg.server.api_key:
        raise ConfigError(
            f"binding {cfg.server.host} exposes the service beyond this machine: set an API key "
            "(--api-key KEY, CROPPER_SERVER_API_KEY or server.api_key) or bind 127.0.0.1")


# --- the body-size limit (pure ASGI, before any parsing) -----------------------------------------

MB = 1024 * 1024  # server.max_upload_mb counts these: every size and limit is reported in them


def format_mb(n: int) -> str:
    """A size in bytes in the unit of server.max_upload_mb: 26214400 -> '25.0 MB'."""
    v = n / MB
    return f"{v:.1f} MB" if v >= 10 else f"{v:.3g} MB"


def upload_limit(limit_mb: float) -> str:
    """The limit as it was set: 25 -> '25 MB (server.max_upload_mb)'."""
    return f"{limit_mb:g} MB (server.max_upload_mb)"


class BodyLimit:
    """Refuse request bodies above `max_bytes`: at once from Content-Length, else while streaming.
    `limit_mb` is the upload limit it was derived from (a body may be larger: base64, a mask)."""

    def __init__(self, app: Any, max_bytes: int, limit_mb: float) -> None:
        self.app, self.max_bytes, self.limit_mb = app, max_bytes, limit_mb

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    n = -1
                if n < 0 or n > self.max_bytes:
                    msg = (f"the request body is {format_mb(n)}, more than an upload limit of "
                           f"{upload_limit(self.limit_mb)} allows" if n >= 0 else "bad Content-Length header")
                    resp = error_response(413 if n >= 0 else 400, "too_large" if n >= 0 else "bad_request", msg)
                    await resp(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"the request body is over {format_mb(self.max_bytes)}, more than an "
                                       f"upload limit of {upload_limit(self.limit_mb)} allows")
            return msg

        await self.app(scope, limited, send)


class BodyDeadline:
    """The whole request body must arrive within `seconds` of the headers: a client that sends
    half a body and stops gets a 408 and its connection closed, instead of holding a worker."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def timed() -> Any:
            nonlocal complete
            if complete:  # the body is in: what follows is a wait for a disconnect, unbounded here
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {self.seconds:g} s "
                                  "(server.body_timeout_s)") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                complete = True
            return msg

        await self.app(scope, timed, send)


def header_timeout_protocol(seconds: float, send_timeout_s: float | None = None) -> type:
    """uvicorn's h11 protocol, with the two time-outs uvicorn lacks, each one log line:

    - a connection whose request headers do not all arrive within `seconds` (from its opening,
      or from the end of its previous response) is closed: uvicorn alone waits for them forever;
    - a client that does not take its answer is dropped: once part of an answer waits in the
      server's buffer (the kernel's buffers for the socket are full: the client reads too little),
      the client has `send_timeout_s` to take all of it, however it trickles; else the connection
      is aborted and the buffer, the whole answer, freed. uvicorn alone holds both for as long as
      the client keeps the socket open, and a closed one until its buffer drains.

    `send_timeout_s` None: the served app's own server.send_timeout_s when it is one of
    `create_app`'s, else the default. For `uvicorn.run(..., http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    given = send_timeout_s

    class HeaderTimeoutH11(H11Protocol):
        header_timeout_s = seconds
        send_timeout_s_given = given
        _header_timer: Any = None
        _send_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # pause (and arm the send timer) at any byte the kernel would not take, resume at none
            transport.set_write_buffer_limits(high=0)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._cancel_send_timer()
            super().connection_lost(exc)

        @property
        def send_timeout_s(self) -> float:
            if self.send_timeout_s_given is not None:
                return self.send_timeout_s_given
            state = getattr(getattr(getattr(self.config, "app", None), "state", None), "cropper_state", None)
            return state.cfg.server.send_timeout_s if state is not None else ServerConfig.send_timeout_s

        def pause_writing(self) -> None:  # some of an answer waits: the client is not taking it
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_late)

        def resume_writing(self) -> None:  # it took all of it
            super().resume_writing()
            self._cancel_send_timer()

        def _cancel_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_late(self) -> None:
            self._send_timer = None
            left = self.transport.get_write_buffer_size()
            log.info("dropped the connection from %s: it did not take its answer within %g s "
                     "(server.send_timeout_s; %s not taken)", _peer(self.client), self.send_timeout_s,
                     format_mb(left))
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset: the kernel drops what it holds for the client too
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()  # close() would wait for the buffer to drain: forever

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are complete
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # the next request's headers are due in their turn

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            partial = bool(self.conn.trailing_data[0])  # some of a request came (else: an idle socket)
            (log.info if partial else log.debug)(
                "closed a connection from %s: its request headers did not arrive within %g s "
                "(server.header_timeout_s)", _peer(self.client), self.header_timeout_s)
            self.transport.close()

    return HeaderTimeoutH11


def return_freed_memory() -> None:
    """glibc only (elsewhere nothing): large blocks (a decoded image's) are always mmap'd, so
    freeing them gives the memory back to the system. By default glibc raises that threshold
    after the first such free, and the next decodes' blocks then stay in the process's heaps,
    resident long after the request (GBs after a burst of large uploads)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)  # fixed at 1 MiB: no dynamic raise
    except (OSError, AttributeError):
        pass


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


class OneTraceback:
    """An unexpected exception anywhere in the app is one logged traceback and a 500 with a
    stable JSON message that names nothing inside the server. (Starlette's own handler for
    `Exception` answers, then re-raises for uvicorn to log the same traceback a second time.)"""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("500 for %s on %s %s: unexpected error", _peer(scope.get("client")),
                          scope.get("method"), scope.get("path"))
            if not started:
                await error_response(500, "internal", INTERNAL_MESSAGE)(scope, receive, send)
            # else the answer was cut short: uvicorn closes the connection


class CleanStartupFailure:
    """A start-up that fails (the engine could not load) is reported by the server in one line:
    Starlette sends the traceback as the lifespan's failure message, which uvicorn would print."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_clean(message: Any) -> None:
            if message.get("type") == "lifespan.startup.failed" and self.state.load_error:
                message = {**message, "message": ""}  # the reason is logged once, by ServerState
            await send(message)

        await self.app(scope, receive, send_clean)


class LoopbackOrKey:
    """No API key: requests are served only on a loopback address. `create_app` refuses to be
    configured for another host without a key, but a server started some other way (uvicorn
    --factory --host 0.0.0.0) binds where it is told: this checks the address it really got."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        server = scope.get("server") if scope["type"] in ("http", "websocket") else None
        host = server[0] if server else None
        if host and not is_loopback(host) and _is_ip(host):
            resp = error_response(
                403, "forbidden", f"this server listens on {host} without an API key: set one "
                "(CROPPER_SERVER_API_KEY or server.api_key) or bind 127.0.0.1")
            if scope["type"] == "http":
                await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# --- metrics ---------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("cropper_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("cropper_request_latency_seconds", "Request latency, end to end",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("cropper_stage_seconds", "Time per stage of a crop request "
                               "(queue, prepare, engine stages per job, encode)", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cropper_queue_depth", "Requests waiting for the engine", registry=r)
        self.in_flight = Gauge("cropper_requests_in_flight", "Crop requests being handled", registry=r)
        self.batch_size = Histogram("cropper_batch_size", "Requests per engine batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.batch_seconds = Histogram("cropper_batch_seconds", "Engine time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.results = Counter("cropper_results", "Crops returned, by pipeline", ["pipeline"], registry=r)
        self.fallbacks = Counter("cropper_fallbacks", "Crops where the VLM answer was unusable and the "
                                 "non-VLM proposer took over", registry=r)
        self.rejected = Counter("cropper_rejected", "Requests refused before the engine, by reason",
                                ["reason"], registry=r)
        self.ready = Gauge("cropper_engine_ready", "1 when the engine is loaded", registry=r)
        self.pixels_in_flight = Gauge("cropper_pixels_in_flight", "Decoded pixels held by requests in flight "
                                      "(bounded by server.max_pixels_in_flight)", registry=r)

    def on_batch(self, info: dict[str, Any]) -> None:
        self.batch_size.observe(info["size"])
        self.batch_seconds.observe(info["seconds"])
        self.queue_depth.set(info["depth"])
        for q in info["queue_seconds"]:
            self.stage.labels("queue").observe(q)
        for out in info["outs"]:
            if not isinstance(out, list) or not out:
                continue
            for res in out:
                self.results.labels(res.pipeline).inc()
                if res.pipeline == "vlm-fallback":
                    self.fallbacks.inc()
            for k, v in out[0].timings.items():
                self.stage.labels(k).observe(v)


# --- request parsing -------------------------------------------------------------------------


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


class PixelBudget:
    """Decoded pixels held at once by the requests in flight (from decode to answer), at most
    `total`; requests wait for their share in arrival order. One larger than the whole budget
    runs alone. Used on the event loop's thread only."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int, timeout: float) -> None:
        """Wait for `n` pixels; TimeoutError after `timeout` s. A wait that ends otherwise than
        by its grant (a time-out, a cancel) holds nothing, even when the grant came meanwhile."""
        if n <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        self._wake()
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as the wait gave up: given back
            else:
                fut.cancel()  # _wake skips it
            raise

    def release(self, n: int) -> None:
        if n > 0:
            self.used -= n
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used and self.used + n > self.total:
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)


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


# --- the app ---------------------------------------------------------------------------------


class ServerState:
    """What the lifespan owns: the config, the engine (Cropper + batching thread), the metrics."""

    def __init__(self, cfg: Config, cropper: Any = None) -> None:
        self.cfg = cfg
        self.cropper = cropper
        self.owns_cropper = cropper is None
        self.engine: Any = None
        self.metrics = Metrics()
        self.budget = PixelBudget(cfg.server.max_pixels_in_flight)
        self.load_error: str | None = None
        self.loading = False
        self.started = time.time()
        self._vlm_health: tuple[float, bool] = (0.0, True)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def start(self) -> None:
        """Build the engine (blocking); records the error instead of raising."""
        from cropper_engine.batching import BatchingEngine

        self.loading = True
        try:
            if self.cropper is None:
                import dataclasses

                from cropper_engine.engine.loop import Cropper

                # one engine batch of the server (up to max_batch requests) is one VLM call per round
                vlm = dataclasses.replace(self.cfg.vlm, batch_size=max(self.cfg.vlm.batch_size,
                                                                       self.cfg.server.max_batch))
                self.cropper = Cropper.from_config(dataclasses.replace(self.cfg, vlm=vlm))
            from cropper_engine.batch import warm_face_detector

            warm_face_detector(self.cropper)  # not inside the first batch: see warm_face_detector
            s = self.cfg.server
            self.engine = BatchingEngine(self.cropper, max_batch=s.max_batch, batch_wait_ms=s.batch_wait_ms,
                                         queue_size=s.queue_size, on_batch=self.metrics.on_batch)
            self.metrics.ready.set(1)
            info = self.cropper.describe()
            log.info("engine ready: %s", info["reasons"].get("pipeline", info["pipeline"]))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CropperError) else str(exc)
            log.error("the engine could not be loaded: %s", self.load_error)
        finally:
            self.loading = False

    def stop(self) -> None:
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.stop()
        if self.owns_cropper and self.cropper is not None:
            with contextlib.suppress(Exception):
                self.cropper.close()

    def vlm_reachable(self) -> bool:
        """For /readyz: an external VLM (openai backend) answering; cached 2 s."""
        vlm = getattr(self.engine, "vlm", None)
        health = getattr(vlm, "health", None)
        if health is None:
            return True
        down = getattr(vlm, "is_down", None)
        if down is not None and down():  # a request found it unreachable moments ago
            return False
        t, ok = self._vlm_health
        if time.monotonic() - t > 2.0:
            ok = bool(health())
            self._vlm_health = (time.monotonic(), ok)
        return ok


def create_app(config: Config | None = None, *, cropper: Any = None, load_in_background: bool = False) -> Any:
    """The ASGI app. `cropper`: an engine built elsewhere (tests; the caller keeps owning it).

    By default the lifespan loads the engine before the server accepts requests and a load
    failure stops the start-up; with `load_in_background` the server answers at once (/readyz
    503 until the engine is loaded).
    """
    cfg = config if config is not None else load_config()
    check_bind(cfg)
    s = cfg.server
    max_image_bytes = int(s.max_upload_mb * MB)
    max_body = int(max_image_bytes * 4 / 3) + 1024 * 1024  # base64 in JSON, multipart overhead, a mask
    state = ServerState(cfg, cropper)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        app.state.startup_error = None
        if load_in_background:
            threading.Thread(target=state.start, name="cropper-load", daemon=True).start()
        else:
            await asyncio.to_thread(state.start)
            if state.load_error:
                app.state.startup_error = state.load_error
                raise RuntimeError(f"the engine could not be loaded: {state.load_error}")
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    kw: dict[str, Any] = {
        "title": "cropper-engine", "version": _version(), "lifespan": lifespan,
        "description": "Image cropping with a vision-language model through in-context learning. "
                       "Images are uploaded (multipart) or sent as base64 (JSON); never fetched from URLs.",
    }
    try:
        from fastapi_offline import FastAPIOffline  # the docs page without a CDN

        app = FastAPIOffline(**kw)
    except ImportError:
        app = FastAPI(docs_url=None, redoc_url=None, **kw)
    app.state.cropper_state = state
    app.state.startup_error = None
    app.add_middleware(BodyLimit, max_bytes=max_body, limit_mb=s.max_upload_mb)
    app.add_middleware(BodyDeadline, seconds=s.body_timeout_s)
    if not s.api_key:
        app.add_middleware(LoopbackOrKey)
    app.add_middleware(CleanStartupFailure, state=state)
    app.add_middleware(OneTraceback)  # the outermost of ours: it sees what all the others raise
    m = state.metrics

    # --- errors -> JSON ---------------------------------------------------------------------
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Any:
        return error_response(exc.status, exc.type, exc.message, exc.retry_after)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Any:
        return error_response(413, "too_large", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(400, "bad_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, STARLETTE_KINDS.get(exc.status_code, "error"), str(exc.detail))

    def authorize(request: Request) -> None:
        if not s.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise HTTPError(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>")

    # --- the API ------------------------------------------------------------------------------
    crop_body = {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "The image file."},
                    "task": {"type": "string", "enum": ["free", "subject", "ratio"],
                             "description": "Default: ratio if a ratio is given, subject if a mask is, else free."},
                    "ratio": {"type": "string", "example": "16:9",
                              "description": "W:H; several comma-separated give one crop each."},
                    "mask": {"type": "string", "format": "binary",
                             "description": "Subject mask (white on black) of the image's size."},
                    "id": {"type": "string", "description": "Your id; an index example of this id is not "
                                                            "retrieved."},
                    "subject": {"type": "string", "example": "auto", "description": SUBJECT_DOC},
                    "keep_faces": {"type": "boolean", "description": KEEP_FACES_DOC}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image"], "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "description": "The image file as base64 (or a base64 data URL)."},
                    "task": {"type": "string", "enum": ["free", "subject", "ratio"]},
                    "ratio": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "mask": {"type": "string", "description": "The mask image file as base64."},
                    "id": {"type": "string"},
                    "subject": {"type": "string", "description": SUBJECT_DOC},
                    "keep_faces": {"type": "boolean", "description": KEEP_FACES_DOC}}}},
        }},
        "responses": {
            "200": {"description": "A results.jsonl line (several ratios: {\"results\": [lines]}), "
                                   "or the cropped image with ?return=image",
                    "content": {"image/jpeg": {}, "image/png": {}}},
            "400": {"description": "Malformed request"}, "401": {"description": "Missing or wrong API key"},
            "413": {"description": "Upload over the limit"}, "415": {"description": "Unsupported content type"},
            "422": {"description": "Not a usable image, mask, ratio or task"},
            "503": {"description": "Queue full, engine loading or VLM server unreachable (Retry-After)"},
            "504": {"description": "The request took longer than the server's request timeout"},
        },
    }

    @app.post("/v1/crop", openapi_extra=crop_body, summary="Crop one image", tags=["crop"])
    async def crop(request: Request, return_: str = Query("json", alias="return", pattern="^(json|image)$",
                                                          description="json (default) or image")) -> Any:
        t0 = time.perf_counter()
        status = 499  # cancelled: the server is stopping
        m.in_flight.inc()
        try:
            # every outcome is an answer here, so /metrics counts the status the client got
            try:
                resp = await _crop(request, return_)
            except HTTPError as exc:
                resp = error_response(exc.status, exc.type, exc.message, exc.retry_after)
            except StarletteHTTPException as exc:
                resp = error_response(exc.status_code, STARLETTE_KINDS.get(exc.status_code, "error"),
                                      str(exc.detail))
            except BodyTooLarge as exc:
                resp = error_response(413, "too_large", str(exc))
            except ImageError as exc:  # wherever it was raised: the upload's fault, and named
                resp = error_response(422, "invalid_image", str(exc))
            except Exception:  # a fault of the server: one traceback, and nothing of it in the answer
                log.exception("500 for %s on /v1/crop: unexpected error", _peer(request.client))
                resp = error_response(500, "internal", INTERNAL_MESSAGE)
            status = resp.status_code
            return resp
        finally:
            m.in_flight.dec()
            m.requests.labels("crop", str(status)).inc()
            m.latency.labels("crop").observe(time.perf_counter() - t0)
            if state.engine is not None:
                m.queue_depth.set(state.engine.depth)

    async def _crop(request: Request, return_: str) -> Any:
        authorize(request)
        if not state.ready:
            m.rejected.labels("not_ready").inc()
            msg = (f"the engine could not be loaded: {state.load_error}" if state.load_error
                   else "the engine is loading; retry shortly")
            raise HTTPError(503, "not_ready", msg, None if state.load_error else 5)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        t = time.perf_counter()
        from starlette.requests import ClientDisconnect

        try:
            if ctype == "multipart/form-data":
                upload = await parse_form(request, max_image_bytes, s.max_upload_mb)
            elif ctype == "application/json":
                upload = parse_json_body(await request.body())
            else:
                raise HTTPError(415, "unsupported_media_type",
                                "send multipart/form-data (fields image, task, ratio, mask) or "
                                "application/json ({\"image\": \"<base64>\", ...})")
        except BodyTooLarge as exc:
            raise HTTPError(413, "too_large", str(exc)) from None
        except BodyTimeout as exc:
            m.rejected.labels("body_timeout").inc()
            log.info("408 for %s: %s", _peer(request.client), exc)
            raise HTTPError(408, "timeout", str(exc)) from None
        except ClientDisconnect:
            m.rejected.labels("client_gone").inc()
            log.info("client %s went away before its upload was complete", _peer(request.client))
            raise HTTPError(499, "client_closed", "the client went away mid-upload") from None
        upload.filename = _filename(upload.filename)
        # decoded pixels in flight are bounded: a request waits (in arrival order) for its share
        pixels = await asyncio.to_thread(probe_pixels, upload, cfg.max_pixels)
        await _acquire_budget(request, upload, pixels)
        m.pixels_in_flight.set(state.budget.used)
        try:
            return await _crop_decoded(request, return_, upload, t)
        finally:
            state.budget.release(pixels)
            m.pixels_in_flight.set(state.budget.used)

    async def _acquire_budget(request: Request, upload: Upload, pixels: int) -> None:
        """Wait for `pixels` of the budget; a client that leaves meanwhile is dropped at once
        (499), never decoded; one that waits past server.decode_wait_s gets a 503."""
        if pixels <= 0:
            return
        acquire = asyncio.ensure_future(state.budget.acquire(pixels, s.decode_wait_s))
        gone = asyncio.ensure_future(_disconnected(request))
        granted = False
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and not gone.cancelled() and gone.exception() is None:
                m.rejected.labels("client_gone").inc()
                log.info("client %s went away while %s waited for the pixel budget; dropped undecoded",
                         _peer(request.client), upload.filename)
                raise HTTPError(499, "client_closed", "the client went away")
            try:
                acquire.result()
            except TimeoutError:
                m.rejected.labels("pixel_budget").inc()
                raise HTTPError(503, "overloaded", "the server is busy decoding other large images (its budget "
                                f"is {format_pixels(s.max_pixels_in_flight)} in flight); retry shortly", 5) from None
            granted = True
        finally:
            gone.cancel()
            if not granted:
                if not acquire.done():
                    acquire.cancel()  # PixelBudget.acquire gives back a share granted as it is cancelled
                elif not acquire.cancelled() and acquire.exception() is None:
                    state.budget.release(pixels)  # granted as the client left

    async def _crop_decoded(request: Request, return_: str, upload: Upload, t: float) -> Any:
        try:
            req, weight = await asyncio.to_thread(prepare, upload, cfg.max_pixels, max_image_bytes, s.max_upload_mb,
                                                  getattr(state.cropper, "draft_side", None))
        except ImageError as exc:
            raise HTTPError(422, "invalid_image", str(exc)) from None
        except CropperError as exc:
            raise HTTPError(422, "invalid_request", str(exc)) from None
        if return_ == "image" and weight > 1:
            raise HTTPError(400, "bad_request", "return=image needs exactly one ratio")
        m.stage.labels("prepare").observe(time.perf_counter() - t)

        from cropper_engine.batching import EngineStopped, InternalError, QueueFull, VLMUnavailable

        try:
            fut = state.engine.submit(req, weight)
        except QueueFull as exc:
            m.rejected.labels("queue_full").inc()
            raise HTTPError(503, "overloaded", str(exc), exc.retry_after) from None
        except EngineStopped as exc:
            raise HTTPError(503, "not_ready", str(exc), 5) from None
        m.queue_depth.set(state.engine.depth)
        try:
            out = await _wait(request, asyncio.wrap_future(fut), s.request_timeout_s)
        except TimeoutError:
            fut.cancel()
            m.rejected.labels("timeout").inc()
            raise HTTPError(504, "timeout", f"the crop took longer than the server's limit of "
                            f"{s.request_timeout_s:g} s (queue depth {state.engine.depth})") from None
        except VLMUnavailable as exc:
            m.rejected.labels("vlm_unavailable").inc()
            raise HTTPError(503, "vlm_unavailable", str(exc), exc.retry_after) from None
        except EngineStopped as exc:
            raise HTTPError(503, "not_ready", str(exc), 5) from None
        except ImageError as exc:
            raise HTTPError(422, "invalid_image", str(exc)) from None
        except CropperError as exc:
            raise HTTPError(422, "invalid_request", str(exc)) from None
        except InternalError:  # its traceback is logged by the engine thread, once
            raise HTTPError(500, "internal", INTERNAL_MESSAGE) from None
        rows = []
        for r in out:
            row = with_image_notes(r.to_json(), r.loaded)
            row["image"] = upload.filename
            if upload.id is not None:
                row["id"] = upload.id
            rows.append(row)
        if return_ == "image":
            t = time.perf_counter()
            data, mime = await asyncio.to_thread(encode_crop, out[0])
            m.stage.labels("encode").observe(time.perf_counter() - t)
            row = rows[0]
            x1, y1, x2, y2 = row["box"]
            return Response(data, media_type=mime, headers={
                "X-Crop-Box": ",".join(str(v) for v in row["box"]), "X-Crop-Score": str(row["score"]),
                "X-Crop-Pipeline": row["pipeline"], "X-Crop-Size": f"{x2 - x1}x{y2 - y1}",
                "X-Image-Size": f"{row['width']}x{row['height']}",
                "Content-Disposition": f'inline; filename="crop-{upload.filename}"'})
        return JSONResponse(rows[0] if len(rows) == 1 else {"results": rows})

    async def _wait(request: Request, fut: Any, timeout: float) -> Any:
        """The engine's answer; gives up (cancelling it) at the timeout or when the client leaves."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({fut, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            fut.cancel()
            if gone in done:
                m.rejected.labels("client_gone").inc()
                raise HTTPError(499, "client_closed", "the client went away")
            raise TimeoutError
        finally:
            gone.cancel()

    @app.get("/v1/info", tags=["service"], summary="The pipeline, its models and the limits")
    async def info(request: Request) -> Any:
        authorize(request)
        d: dict[str, Any] = {
            "ready": state.ready, "loading": state.loading, "error": state.load_error,
            "limits": {"max_upload_mb": s.max_upload_mb, "max_pixels": cfg.max_pixels,
                       "max_pixels_in_flight": s.max_pixels_in_flight, "header_timeout_s": s.header_timeout_s,
                       "body_timeout_s": s.body_timeout_s, "send_timeout_s": s.send_timeout_s,
                       "request_timeout_s": s.request_timeout_s,
                       "max_batch": s.max_batch, "queue_size": s.queue_size},
            "tasks": ["free", "subject", "ratio"],
        }
        if state.cropper is not None:
            with contextlib.suppress(Exception):
                d["engine"] = state.cropper.describe()
        return JSONResponse(json.loads(json.dumps(d, default=str)))

    @app.get("/healthz", tags=["service"], summary="Alive")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], summary="Ready: models loaded (and an external VLM reachable)")
    async def readyz() -> Any:
        if not state.ready:
            reason = state.load_error or ("loading" if state.engine is None else "engine thread stopped")
            return error_response(503, "not_ready", reason, None if state.load_error else 5)
        if not await asyncio.to_thread(state.vlm_reachable):
            return error_response(503, "vlm_unavailable", "the VLM server does not answer: "
                                  f"{getattr(state.engine.vlm, 'last_error', '')}", 5)
        return {"status": "ready", "pipeline": state.cropper.pipeline, "queue_depth": state.engine.depth}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics")
    async def metrics(request: Request) -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        authorize(request)
        if state.engine is not None:
            m.queue_depth.set(state.engine.depth)
        return PlainTextResponse(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    # --- the page ------------------------------------------------------------------------------
    page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                   "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(STATIC_DIR / "index.html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _disconnected(request: Any) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cropper-engine")
    except Exception:
        return "0"


def app_factory() -> Any:
    """For `uvicorn --factory cropper_engine.server:app_factory` (config from CROPPER_* / CROPPER_CONFIG)."""
    return create_app(load_config())

