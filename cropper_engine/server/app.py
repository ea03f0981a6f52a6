"""The app: `create_app(config)` assembles the FastAPI app (its lifespan owns one engine, the
guards of middleware.py, errors as JSON, the routes and the page of routes.py); `app_factory`
builds it from the environment for `uvicorn --factory cropper_engine.server:app_factory`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cropper_engine.config import Config, load_config
from cropper_engine.server.errors import (
    MB,
    STARLETTE_KINDS,
    BodyTooLarge,
    HTTPError,
    error_response,
)
from cropper_engine.server.middleware import (
    BodyDeadline,
    BodyLimit,
    CleanStartupFailure,
    LoopbackOrKey,
    OneTraceback,
    check_bind,
)
from cropper_engine.server.routes import add_routes
from cropper_engine.server.state import ServerState


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

    add_routes(app, state)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cropper-engine")
    except Exception:
        return "0"


def app_factory() -> Any:
    """For `uvicorn --factory cropper_engine.server:app_factory` (config from CROPPER_* / CROPPER_CONFIG)."""
    return create_app(load_config())
