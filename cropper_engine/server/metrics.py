"""The Prometheus metrics of one app (`Metrics`), fed by the routes and by the engine thread's
batches (`Metrics.on_batch`)."""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("cropper_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("cropper_request_latency_seconds", "Request latency, end to end",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("cropper_stage_seconds", "Time per stage of a crop request "
                               "(queue, prepare, engine stages per job, encode)", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cropper_queue_depth", "Requests waiting for the engine", registry=r)
        self.in_flight = Gauge("cropper_requests_in_flight", "Crop requests being handled", registry=r)
        self.batch_size = Histogram("cropper_batch_size", "Requests per engine batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.batch_seconds = Histogram("cropper_batch_seconds", "Engine time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.results = Counter("cropper_results", "Crops returned, by pipeline", ["pipeline"], registry=r)
        self.fallbacks = Counter("cropper_fallbacks", "Crops where the VLM answer was unusable and the "
                                 "non-VLM proposer took over", registry=r)
        self.rejected = Counter("cropper_rejected", "Requests refused before the engine, by reason",
                                ["reason"], registry=r)
        self.ready = Gauge("cropper_engine_ready", "1 when the engine is loaded", registry=r)
        self.pixels_in_flight = Gauge("cropper_pixels_in_flight", "Decoded pixels held by requests in flight "
                                      "(bounded by server.max_pixels_in_flight)", registry=r)

    def on_batch(self, info: dict[str, Any]) -> None:
        self.batch_size.observe(info["size"])
        self.batch_seconds.observe(info["seconds"])
        self.queue_depth.set(info["depth"])
        for q in info["queue_seconds"]:
            self.stage.labels("queue").observe(q)
        for out in info["outs"]:
            if not isinstance(out, list) or not out:
                continue
            for res in out:
                self.results.labels(res.pipeline).inc()
                if res.pipeline == "vlm-fallback":
                    self.fallbacks.inc()
            for k, v in out[0].timings.items():
                self.stage.labels(k).observe(v)
