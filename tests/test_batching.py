"""The dynamic batcher (cropper_engine/batching.py) with a test double for the engine: closed-loop
callers are waited for, a lone caller is not. The batcher's clock is controlled by the test and
each batch runs until the test answers it, so what is checked is the order of events (who is in
which batch at which clock time), never how long anything took: the outcome is the same on a
busy machine."""

from __future__ import annotations

import threading
import time
import types

import pytest

import cropper_engine.batching as batching
from cropper_engine.batching import BatchingEngine

LONG = 30.0  # a bound on real waits, so a broken batcher fails instead of hanging (never reached)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(batching, "time", types.SimpleNamespace(perf_counter=c, sleep=time.sleep))
    return c


class GatedCropper:
    """Test double: records each batch and holds it until the test answers it."""

    vlm = None

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self._started = threading.Semaphore(0)
        self._answer = threading.Semaphore(0)

    def crop_batch(self, requests):
        self.batches.append(list(requests))
        self._started.release()
        assert self._answer.acquire(timeout=LONG), "the test never answered the batch"
        return [[r] for r in requests]

    def started(self) -> list[str]:
        """Wait for the next batch to start; returns it."""
        assert self._started.acquire(timeout=LONG), f"no batch started; batches so far {self.batches}"
        return self.batches[-1]

    def answer(self) -> None:
        self._answer.release()


def taken(engine: BatchingEngine) -> None:
    """Wait until the engine thread has taken every pending request into the batch it gathers."""
    end = time.monotonic() + LONG
    while engine.depth and time.monotonic() < end:
        time.sleep(0.001)
    assert engine.depth == 0


def not_started(crop: GatedCropper, n: int) -> None:
    """No new batch starts while the test waits (a batch that starts early fails the test; on a
    slow machine this can only miss a bug, never flag a correct batcher)."""
    time.sleep(0.05)
    assert len(crop.batches) == n, crop.batches


def submit(engine: BatchingEngine, names: list[str]) -> list:
    return [engine.submit(n) for n in names]


def answered(crop: GatedCropper, futures: list) -> None:
    crop.answer()
    for f in futures:
        f.result(timeout=LONG)


def test_answered_callers_are_waited_for(clock):
    """A batch of 4 is answered; its callers come back one after another. Past `batch_wait_ms` but
    within the extra wait, the batcher keeps gathering until all 4 are back: batches of 4, not a
    batch of 1 and then one of 3 (two cohorts taking turns)."""
    crop = GatedCropper()
    engine = BatchingEngine(crop, max_batch=4, batch_wait_ms=5, queue_size=64)
    try:
        first = submit(engine, ["a0", "b0", "c0", "d0"])
        assert crop.started() == ["a0", "b0", "c0", "d0"]  # full: runs at once
        answered(crop, first)
        again = submit(engine, ["a1"])  # the first caller is back
        taken(engine)
        clock.t += 0.02  # past batch_wait_ms (5 ms), within the extra wait for answered callers (50 ms)
        not_started(crop, 1)
        again += submit(engine, ["b1", "c1"])
        not_started(crop, 1)
        again += submit(engine, ["d1"])
        assert crop.started() == ["a1", "b1", "c1", "d1"]
        answered(crop, again)
    finally:
        engine.stop()


def test_the_wait_for_answered_callers_is_bounded(clock):
    """Callers that do not come back within the extra wait are not waited for."""
    crop = GatedCropper()
    engine = BatchingEngine(crop, max_batch=4, batch_wait_ms=5, queue_size=64)
    try:
        first = submit(engine, ["a0", "b0", "c0", "d0"])
        crop.started()
        answered(crop, first)
        late = submit(engine, ["a1"])
        taken(engine)
        clock.t += batching.MAX_EXTRA_WAIT_S + 0.001  # past the longest wait
        assert crop.started() == ["a1"]
        answered(crop, late)
    finally:
        engine.stop()


def test_cohorts_without_the_wait(clock, monkeypatch):
    """The same callers with the wait for answered callers turned off (the first check can fail):
    the one caller back by the end of batch_wait_ms goes alone, the others form the next batch."""
    monkeypatch.setattr(batching, "MAX_EXTRA_WAIT_S", 0.0)
    crop = GatedCropper()
    engine = BatchingEngine(crop, max_batch=4, batch_wait_ms=5, queue_size=64)
    try:
        first = submit(engine, ["a0", "b0", "c0", "d0"])
        crop.started()
        answered(crop, first)
        alone = submit(engine, ["a1"])
        taken(engine)
        clock.t += 0.006
        assert crop.started() == ["a1"]
        rest = submit(engine, ["b1", "c1", "d1"])
        crop.answer()
        alone[0].result(timeout=LONG)
        clock.t += 0.006
        assert crop.started() == ["b1", "c1", "d1"]
        answered(crop, rest)
    finally:
        engine.stop()


def test_a_lone_caller_waits_no_longer_than_batch_wait(clock):
    """One caller, answered and back: its request goes once batch_wait_ms (5 ms) have passed on
    the batcher's clock, never held for the longer wait for callers (nobody else is coming)."""
    crop = GatedCropper()
    engine = BatchingEngine(crop, max_batch=16, batch_wait_ms=5, queue_size=64)
    try:
        for k in range(3):
            futs = submit(engine, [f"a{k}"])
            taken(engine)
            if k == 0:  # nothing answered before: only batch_wait_ms
                not_started(crop, 0)
            clock.t += 0.0051
            assert crop.started() == [f"a{k}"]
            answered(crop, futs)
    finally:
        engine.stop()
