"""What an answer other than 200 is: `HTTPError` (a status, a short machine-readable type, a
message, maybe Retry-After) and `error_response`, its JSON body `{"error": {"type", "message"}}`;
the exceptions of the body guards (`BodyTooLarge`, `BodyTimeout`); sizes in the unit of
server.max_upload_mb for the messages (`format_mb`, `upload_limit`); a client in a log line (`_peer`)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


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


MB = 1024 * 1024  # server.max_upload_mb counts these: every size and limit is reported in them


def format_mb(n: int) -> str:
    """A size in bytes in the unit of server.max_upload_mb: 26214400 -> '25.0 MB'."""
    v = n / MB
    return f"{v:.1f} MB" if v >= 10 else f"{v:.3g} MB"


def upload_limit(limit_mb: float) -> str:
    """The limit as it was set: 25 -> '25 MB (server.max_upload_mb)'."""
    return f"{limit_mb:g} MB (server.max_upload_mb)"


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
