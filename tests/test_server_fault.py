"""The service in front of an external OpenAI-compatible VLM server that goes away and comes back:
503 with Retry-After while it is gone (fast, no hanging), /readyz says so, and it recovers.
The upstream here is a small fake on a real loopback socket; test_server_load.py does the same
against a real vLLM server."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from needs import need_module

need_module("fastapi", "the server extra (FastAPI)", module_level=True)
uvicorn = need_module("uvicorn", "the server extra (uvicorn)", module_level=True)
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.engine.loop import Cropper  # noqa: E402
from cropper_engine.models.vlm_openai import OpenAIBackend, OpenAIClientConfig  # noqa: E402
from cropper_engine.server import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_vlm_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        n = body.get("n", 1)
        return {"choices": [{"index": i, "message": {"role": "assistant", "content": f" (4, {100 + i}, 100, 900, 880)"}}
                            for i in range(n)], "usage": {"prompt_tokens": 10, "completion_tokens": 5 * n}}

    return app


class Upstream:
    def __init__(self, port: int) -> None:
        self.port = port
        self.server = None
        self.thread = None

    def start(self) -> None:
        self.server = uvicorn.Server(uvicorn.Config(fake_vlm_app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.02)
        raise AssertionError("fake upstream did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class FakeClock:
    """The backend's clock (`time.monotonic` for its cooldown, `time.sleep` for its backoff), moved
    by the test: the cooldown ends when the test says, however slow the machine."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_upstream_down_gives_503_then_recovers(photos, monkeypatch):
    import types

    from cropper_engine.models import vlm_openai

    clock = FakeClock()
    monkeypatch.setattr(vlm_openai, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    port = free_port()
    up = Upstream(port)
    up.start()
    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.base_url": f"http://127.0.0.1:{port}/v1",
                                         "retrieval.embedder": "classical", "vlm.candidates": 3, "vlm.rounds": 1})
    vlm = OpenAIBackend(OpenAIClientConfig(base_url=f"http://127.0.0.1:{port}/v1", model="fake", timeout_s=5,
                                           backoff_s=0.05, cooldown_s=1.0))
    cropper = Cropper.from_config(cfg, vlm=vlm)
    files = {"image": ("a.jpg", photos[0].read_bytes())}
    try:
        with TestClient(create_app(cfg, cropper=cropper)) as c:
            r = c.post("/v1/crop", files=files)
            assert r.status_code == 200 and r.json()["pipeline"] == "vlm", r.text
            assert c.get("/readyz").status_code == 200

            up.stop()
            sent = vlm.stats["requests"]
            r = c.post("/v1/crop", files=files)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "vlm_unavailable" and int(r.headers["retry-after"]) >= 1
            # bounded: one request's attempts (1 + max_retries), then the backend is marked down
            assert vlm.stats["requests"] - sent == 1 + vlm.config.max_retries and vlm.is_down()
            sent = vlm.stats["requests"]
            r = c.post("/v1/crop", files=files)  # known down: refused at once, the engine not even run
            assert r.status_code == 503 and vlm.stats["requests"] == sent
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200

            up.start()
            clock.t += vlm.config.cooldown_s  # the cooldown is over: the next request tries the server again
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = c.post("/v1/crop", files=files)
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["pipeline"] == "vlm", r.text
            time.sleep(2.1)  # the readiness cache
            assert c.get("/readyz").status_code == 200
            metrics = c.get("/metrics").text
            assert 'cropper_rejected_total{reason="vlm_unavailable"}' in metrics
    finally:
        up.stop()
        vlm.close()
