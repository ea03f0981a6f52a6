"""The routes of an app of `create_app`: POST /v1/crop (the upload read, its share of the pixel
budget, `prepare`, the engine, the answer as a results.jsonl line or the cropped image), GET
/v1/info, /healthz, /readyz, /metrics, and the page (/ and /static/). `add_routes(app, state)`
adds them; their handlers share the app's `ServerState`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from cropper_engine.errors import CropperError, ImageError
from cropper_engine.imageio import format_pixels, with_image_notes
from cropper_engine.server.errors import (
    INTERNAL_MESSAGE,
    MB,
    STARLETTE_KINDS,
    BodyTimeout,
    BodyTooLarge,
    HTTPError,
    _peer,
    error_response,
)
from cropper_engine.server.openapi import crop_body
from cropper_engine.server.state import ServerState
from cropper_engine.server.uploads import (
    Upload,
    _filename,
    encode_crop,
    parse_form,
    parse_json_body,
    prepare,
    probe_pixels,
)

log = logging.getLogger("cropper_engine.server")


STATIC_DIR = Path(__file__).parent.with_name("static")


def add_routes(app: Any, state: ServerState) -> None:
    """The API and the page, on `app`; they answer from `state` (its config, engine, metrics)."""
    cfg = state.cfg
    s = cfg.server
    max_image_bytes = int(s.max_upload_mb * MB)
    m = state.metrics

    def authorize(request: Request) -> None:
        if not s.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise HTTPError(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>")

    # --- the API ------------------------------------------------------------------------------
    @app.post("/v1/crop", openapi_extra=crop_body(), summary="Crop one image", tags=["crop"])
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


async def _disconnected(request: Any) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
