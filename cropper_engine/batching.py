"""Dynamic batching: many concurrent callers, one engine thread, one `crop_batch` per batch.

Callers (the server's request handlers) `submit` a decoded CropRequest and get a
`concurrent.futures.Future`. One engine thread takes the oldest pending request, gathers more
until the batch holds `max_batch` requests or `batch_wait_ms` have passed since it took the
first, and runs them through `Cropper.crop_batch` in one call; each future receives its own
slot (a list of CropResult) or its own error. While a batch runs, new requests pile up and form
the next batch at once, so the wait only matters when the engine is idle.

Callers coming back: most clients send their next request when the last one is answered. When
a batch of k is answered while the next batch is being gathered, up to k requests are likely
on their way; without waiting for them, 16 such clients split into two cohorts of 8 that take
turns (each batch half full). So while fewer requests have come in since the last answers than
were answered, the gathering goes on past `batch_wait_ms`, up to a tenth of a batch's mean run
time (at most `MAX_EXTRA_WAIT_S`): a few percent of latency for batches up to twice as large.
A lone client (one answered, one back) never waits longer than `batch_wait_ms`.

Safety:
- the pending queue is bounded: `submit` raises `QueueFull` (the server answers 503 with
  Retry-After) instead of letting latency grow without limit;
- a caller that gave up (timeout, disconnect) cancels its future; the thread skips it;
- a batch whose `crop_batch` raises is re-run one request at a time, so one poisonous
  request fails alone; the thread itself never dies on an exception;
- when the VLM backend reports it cannot be reached (`BackendUnavailableError` from
  `generate`, e.g. the external vLLM server is down), the requests of that batch that fell back
  get `VLMUnavailable` (503) instead of a silent non-VLM crop; a backend that says it is down
  (`is_down()`) fails the batch at once without running it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cropper_engine.errors import BackendUnavailableError, CropperError

log = logging.getLogger(__name__)

MAX_EXTRA_WAIT_S = 0.05  # the longest a batch waits for answered callers to come back


class QueueFull(Exception):
    """The pending queue is at its bound; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down (or was never started)."""


class VLMUnavailable(Exception):
    """The VLM backend could not be reached for this request; retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    request: Any
    future: Future
    weight: int
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0


class _VLMWatch:
    """Wraps the cropper's VLM to see the exceptions its `generate` raises during a batch."""

    def __init__(self, vlm: Any) -> None:
        self._vlm = vlm
        self.errors: list[BaseException] = []

    def generate(self, conversations: Any, params: Any) -> Any:
        try:
            return self._vlm.generate(conversations, params)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vlm, name)


def _unavailable(errors: Sequence[BaseException]) -> BaseException | None:
    for exc in errors:
        if isinstance(exc, BackendUnavailableError):
            return exc
    return None


class BatchingEngine:
    """One engine thread in front of a `Cropper` (or anything with its `crop_batch`)."""

    def __init__(self, cropper: Any, *, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 queue_size: int = 64, on_batch: Callable[[dict[str, Any]], None] | None = None,
                 name: str = "cropper-engine") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.cropper = cropper
        self.max_batch = max_batch
        self.batch_wait_s = max(batch_wait_ms, 0.0) / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False
        self._batch_s = 1.0  # moving average of a batch's run time, for Retry-After
        self._answered = 0  # requests of the last batch answered, ...
        self._back = 0  # ... requests submitted since then
        self._answered_t = 0.0
        self.batches = 0
        self.vlm = getattr(cropper, "vlm", None)
        self._watch: _VLMWatch | None = None
        if self.vlm is not None:
            self._watch = _VLMWatch(self.vlm)
            cropper.vlm = self._watch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- callers ------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def busy(self) -> bool:
        return self._busy

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: whole batches ahead x their run time."""
        batches = math.ceil((self.depth + 1) / self.max_batch) + (1 if self._busy else 0)
        return int(min(60, max(1, math.ceil(batches * self._batch_s))))

    def submit(self, request: Any, weight: int = 1) -> Future:
        """Queue one CropRequest; the future gets its list of CropResult or an exception."""
        fut: Future = Future()
        with self._cond:
            if self._stop:
                raise EngineStopped("the engine is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self.retry_after())
            self._pending.append(_Item(request, fut, max(1, weight)))
            self._back += 1
            self._cond.notify()
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, fail the pending ones, wait for the running batch."""
        with self._cond:
            self._stop = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(EngineStopped("the server is shutting down"))
        self._thread.join(timeout)
        if self._watch is not None:
            self.cropper.vlm = self.vlm

    # --- the engine thread ------------------------------------------------------------
    def _take(self) -> list[_Item]:
        """Block for the first request, then gather up to max_batch for batch_wait_s."""
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            batch: list[_Item] = []
            size = 0
            start = time.perf_counter()
            deadline = start + self.batch_wait_s
            # callers answered just now may be coming back (see the module's docstring)
            recent = start - self._answered_t < 1.0
            longest = start + max(self.batch_wait_s, min(MAX_EXTRA_WAIT_S, 0.1 * self._batch_s))
            while True:
                while self._pending and size < self.max_batch:
                    item = self._pending[0]
                    if batch and size + item.weight > self.max_batch:
                        break
                    self._pending.popleft()
                    if item.future.set_running_or_notify_cancel():  # False: the caller gave up
                        batch.append(item)
                        size += item.weight
                if size >= self.max_batch or self._stop or (self._pending and batch):
                    break
                now = time.perf_counter()
                if now < deadline:
                    self._cond.wait(deadline - now)
                elif recent and self._back < self._answered and now < longest:
                    self._cond.wait(longest - now)  # answered callers not all back yet
                else:
                    break
            self._busy = bool(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch: list[_Item] | None = None
            try:
                batch = self._take()
                if not batch:
                    if self._stop:
                        return
                    continue
                self._run_batch(batch)
            except BaseException:  # never let the engine thread die
                log.exception("engine thread: unexpected error (the thread goes on)")
                time.sleep(0.01)
            finally:
                self._busy = False
                batch = None  # not held (with its decoded images) while waiting for the next one

    def _run_batch(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        for item in batch:
            item.t_start = t0
        down = getattr(self.vlm, "is_down", None)
        if down is not None and down():
            wait = int(getattr(self.vlm, "retry_after", lambda: 5)())
            err = VLMUnavailable(f"the VLM server is unreachable ({getattr(self.vlm, 'last_error', '')}); "
                                 f"retry after {wait} s", wait)
            for item in batch:
                item.future.set_exception(err)
            self._report(batch, t0, [err] * len(batch), vlm_down=True)
            return
        outs = self._crop([item.request for item in batch])
        self._batch_s = 0.8 * self._batch_s + 0.2 * (time.perf_counter() - t0)
        with self._cond:
            self._answered, self._back, self._answered_t = len(batch), 0, time.perf_counter()
        for item, out in zip(batch, outs, strict=True):
            if isinstance(out, BaseException):
                item.future.set_exception(out)
            else:
                item.future.set_result(out)
        self._report(batch, t0, outs)

    def _crop(self, requests: list[Any]) -> list[Any]:
        """crop_batch, with the VLM's reachability checked; on a batch-level exception, one by one."""
        if self._watch is not None:
            self._watch.errors.clear()
        try:
            outs: list[Any] = list(self.cropper.crop_batch(requests))
            if len(outs) != len(requests):
                raise RuntimeError(f"crop_batch returned {len(outs)} results for {len(requests)} requests")
        except Exception as exc:
            if len(requests) == 1:
                log.exception("crop_batch failed for one request")
                return [exc if isinstance(exc, CropperError) else InternalError(exc)]
            log.warning("crop_batch failed for a batch of %d (%s: %s); running them one by one",
                        len(requests), type(exc).__name__, exc)
            return [self._crop([r])[0] for r in requests]
        gone = _unavailable(self._watch.errors) if self._watch is not None else None
        if gone is not None:
            wait = int(getattr(self.vlm, "retry_after", lambda: 5)())
            err = VLMUnavailable(f"the VLM server could not be reached ({gone}); retry after {wait} s", wait)
            outs = [err if isinstance(o, list) and any(r.pipeline != "vlm" for r in o) else o for o in outs]
        return outs

    def _report(self, batch: list[_Item], t0: float, outs: list[Any], vlm_down: bool = False) -> None:
        self.batches += 1
        if self.on_batch is None:
            return
        try:
            self.on_batch({
                "size": len(batch), "jobs": sum(i.weight for i in batch), "seconds": time.perf_counter() - t0,
                "queue_seconds": [t0 - i.t_submit for i in batch], "outs": outs, "vlm_down": vlm_down,
                "depth": self.depth,
            })
        except Exception:
            log.exception("on_batch hook failed")


class InternalError(Exception):
    """An unexpected exception inside the engine for one request (a bug, not the input)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
