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

The modules: app.py (`create_app`, `app_factory`: the app, its lifespan, errors as JSON),
routes.py (the handlers and the page, `add_routes`), openapi.py (/v1/crop's body), errors.py
(`HTTPError`, `error_response`, sizes in messages), middleware.py (the ASGI guards: loopback or
key, body size and deadline, one traceback per 500), runtime.py (uvicorn's protocol with the
header and send time-outs, `return_freed_memory`), metrics.py, uploads.py (`Upload`, parsing,
`prepare`, `probe_pixels`, `encode_crop`), state.py (`ServerState`, `PixelBudget`). This package
re-exports every name server.py had (patch a name where its code looks it up: `prepare` in
routes.py).
"""

from __future__ import annotations

from cropper_engine.server.app import _version, app_factory, create_app  # noqa: F401  (re-exported)
from cropper_engine.server.errors import (  # noqa: F401  (re-exported: the names server.py had)
    INTERNAL_MESSAGE,
    MB,
    STARLETTE_KINDS,
    BodyTimeout,
    BodyTooLarge,
    HTTPError,
    _peer,
    error_response,
    format_mb,
    upload_limit,
)
from cropper_engine.server.metrics import LATENCY_BUCKETS, Metrics  # noqa: F401  (re-exported)
from cropper_engine.server.middleware import (  # noqa: F401  (re-exported: the names server.py had)
    BodyDeadline,
    BodyLimit,
    CleanStartupFailure,
    LoopbackOrKey,
    OneTraceback,
    _is_ip,
    check_bind,
    is_loopback,
)
from cropper_engine.server.openapi import KEEP_FACES_DOC, SUBJECT_DOC  # noqa: F401  (re-exported)
from cropper_engine.server.routes import STATIC_DIR, _disconnected, add_routes, log  # noqa: F401  (re-exported)
from cropper_engine.server.runtime import header_timeout_protocol, return_freed_memory
from cropper_engine.server.state import PixelBudget, ServerState
from cropper_engine.server.uploads import (  # noqa: F401  (re-exported: the names server.py had)
    _SAFE_NAME,
    _URL,
    FORM_FIELDS,
    Upload,
    _b64,
    _bool_field,
    _filename,
    _opt_str,
    encode_crop,
    parse_form,
    parse_json_body,
    prepare,
    probe_pixels,
)

__all__ = ["PixelBudget", "ServerState", "app_factory", "create_app", "header_timeout_protocol",
           "return_freed_memory"]

