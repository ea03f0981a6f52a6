"""The ASGI guards around the app, before any parsing: `check_bind` (no host beyond loopback
without an API key; a usable key and limits), `LoopbackOrKey` (checks the address really bound),
`BodyLimit` (the body-size limit), `BodyDeadline` (server.body_timeout_s), `OneTraceback` (an
unexpected error is one logged traceback and a plain 500) and `CleanStartupFailure` (a start-up
that fails is one line)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from cropper_engine.config import Config
from cropper_engine.errors import ConfigError
from cropper_engine.server.errors import (
    INTERNAL_MESSAGE,
    BodyTimeout,
    BodyTooLarge,
    _peer,
    error_response,
    format_mb,
    upload_limit,
)

log = logging.getLogger("cropper_engine.server")


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
