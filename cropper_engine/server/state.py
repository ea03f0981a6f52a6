"""What the lifespan owns, `ServerState` (the config, the engine: a Cropper and its batching
thread, the metrics), and the admission of decoded pixels, `PixelBudget`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

from cropper_engine.config import Config
from cropper_engine.errors import CropperError
from cropper_engine.server.metrics import Metrics

log = logging.getLogger("cropper_engine.server")


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
