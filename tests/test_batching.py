"""The dynamic batcher (cropper_engine/batching.py) with a test double for the engine: closed-loop
callers are waited for, a lone caller is not."""

from __future__ import annotations

import statistics
import threading
import time

from cropper_engine.batching import BatchingEngine


class TimedCropper:
    """Test double: each batch takes `delay` seconds; records batch sizes and start times."""

    vlm = None

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sizes: list[int] = []

    def crop_batch(self, requests):
        self.sizes.append(len(requests))
        time.sleep(self.delay)
        return [[r] for r in requests]


def closed_loop(engine: BatchingEngine, clients: int, seconds: float, think_s: float) -> list[float]:
    """`clients` callers, each sending its next request `think_s` after its answer; returns
    each request's wait from submit to answer."""
    waits: list[float] = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            engine.submit(f"{k}-{i}").result(timeout=10)
            with lock:
                waits.append(time.perf_counter() - t0)
            i += 1
            time.sleep(think_s * (0.5 + (k % 4) / 4))  # callers come back staggered

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return waits


def test_answered_callers_are_waited_for():
    """16 closed-loop callers fill batches of 16 instead of taking turns in two cohorts of 8."""
    crop = TimedCropper(0.4)
    engine = BatchingEngine(crop, max_batch=16, batch_wait_ms=5, queue_size=64)
    try:
        closed_loop(engine, clients=16, seconds=4.0, think_s=0.012)
    finally:
        engine.stop()
    steady = crop.sizes[2:-1]  # the first batches form as the callers start; the last as they stop
    assert steady and statistics.mean(steady) >= 14, crop.sizes


def test_cohorts_without_the_wait():
    """The same callers with the wait for answered callers turned off (the check above can fail):
    batches split in cohorts."""
    import cropper_engine.batching as batching

    crop = TimedCropper(0.4)
    old = batching.MAX_EXTRA_WAIT_S
    batching.MAX_EXTRA_WAIT_S = 0.0
    engine = BatchingEngine(crop, max_batch=16, batch_wait_ms=5, queue_size=64)
    try:
        closed_loop(engine, clients=16, seconds=4.0, think_s=0.012)
    finally:
        engine.stop()
        batching.MAX_EXTRA_WAIT_S = old
    assert statistics.mean(crop.sizes[2:-1]) < 12, crop.sizes


def test_a_lone_caller_waits_no_longer_than_batch_wait():
    crop = TimedCropper(0.05)
    engine = BatchingEngine(crop, max_batch=16, batch_wait_ms=5, queue_size=64)
    try:
        waits = closed_loop(engine, clients=1, seconds=1.0, think_s=0.01)
    finally:
        engine.stop()
    assert set(crop.sizes) == {1}
    # each answer: the 5 ms gathering + the 50 ms batch, never the longer wait for callers
    assert statistics.median(waits) < 0.05 + 0.005 + 0.02, statistics.median(waits)
