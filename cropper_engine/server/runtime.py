"""How the server runs under uvicorn: `header_timeout_protocol`, uvicorn's h11 protocol with the
request-header and send time-outs it lacks, and `return_freed_memory`, glibc giving the memory of
large decodes back to the system."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from typing import Any

from cropper_engine.config import ServerConfig
from cropper_engine.server.errors import _peer, format_mb

log = logging.getLogger("cropper_engine.server")


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
