"""The HTTP service in-process (ASGI, no sockets): the API, bad input, limits, auth, batching."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from needs import need_module
from PIL import Image

need_module("fastapi", "the server extra (FastAPI)", module_level=True)
from fastapi.testclient import TestClient  # noqa: E402

from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.server import create_app  # noqa: E402
from cropper_engine.types import CropRequest  # noqa: E402

ROW_KEYS = {"image", "width", "height", "box", "score", "task", "ratio", "pipeline", "candidates", "timings"}


def cfg(**over):
    base = {"vlm.model": "none", "retrieval.embedder": "classical"}
    return load_config(env={}, overrides={**base, **over})


def jpeg(w=320, h=240, seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A valid PNG header declaring w x h pixels, with almost no data (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(cfg())) as c:
        yield c


def assert_error(r, status, type_=None, text=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if type_:
        assert body["error"]["type"] == type_, body
    if text:
        assert text.lower() in body["error"]["message"].lower(), body
    return body


# --- the API ---------------------------------------------------------------------------------


def test_service_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["pipeline"] == "no-vlm"
    info = client.get("/v1/info").json()
    assert info["ready"] and info["limits"]["max_upload_mb"] == 25.0
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/crop"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "cdn." not in docs.text  # the docs page loads nothing from outside
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_crop_multipart_matches_cli_line(client, photos, tmp_path):
    """The answer has the keys (and, for the same pipeline, the box) of `crop --json`'s line."""
    from click.testing import CliRunner

    from cropper_engine.cli import main

    img = photos[1]
    r = client.post("/v1/crop", files={"image": (img.name, img.read_bytes(), "image/jpeg")},
                    data={"ratio": "16:9"})
    assert r.status_code == 200, r.text
    row = r.json()
    assert set(row) >= ROW_KEYS and row["image"] == img.name
    assert row["task"] == "ratio" and row["ratio"] == "16:9" and row["pipeline"] == "no-vlm"
    x1, y1, x2, y2 = row["box"]
    assert abs((x2 - x1) / (y2 - y1) - 16 / 9) < 0.02
    assert row["candidates"] and "total" in row["timings"]
    res = CliRunner().invoke(main, ["crop", str(img), "--ratio", "16:9", "--json", "--vlm", "none"])
    assert res.exit_code == 0, res.output
    line = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith("{")))
    assert set(line) == set(row)
    assert line["box"] == row["box"] and line["score"] == row["score"]


def test_crop_json_base64_and_several_ratios(client, photos):
    data = base64.b64encode(photos[0].read_bytes()).decode()
    r = client.post("/v1/crop", json={"image": data, "ratio": ["1:1", "4:5"], "id": "abc"})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [x["ratio"] for x in rows] == ["1:1", "4:5"] and all(x["id"] == "abc" for x in rows)
    r = client.post("/v1/crop", json={"image": "data:image/jpeg;base64," + data})
    assert r.status_code == 200 and r.json()["task"] == "free"


def test_crop_subject_mask(client, photos):
    img = Image.open(photos[2])
    w, h = img.size
    m = np.zeros((h, w), np.uint8)
    m[h // 3: h // 2, w // 4: w // 2] = 255
    r = client.post("/v1/crop", files={"image": ("p.jpg", photos[2].read_bytes()),
                                       "mask": ("m.png", png(Image.fromarray(m)))})
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["task"] == "subject"
    sx1, sy1, sx2, sy2 = row["subject_box"]
    x1, y1, x2, y2 = row["box"]
    assert x1 <= sx1 and y1 <= sy1 and x2 >= sx2 and y2 >= sy2


def test_crop_automatic_subject_keeps_the_face(client, photos):
    from cropper_engine.engine.subject import detectors_available

    astronaut = next(p for p in photos if p.name == "astronaut.jpg")
    r = client.post("/v1/crop", files={"image": ("a.jpg", astronaut.read_bytes())},
                    data={"subject": "auto", "ratio": "16:9"})
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["task"] == "ratio" and row["subject"] in ("face", "person", "saliency")
    if detectors_available().get("faces"):
        assert row["subject"] == "face" and row["faces"]
        fx1, fy1, fx2, fy2 = row["faces"][0]["box"]
        x1, y1, x2, y2 = row["box"]
        assert x1 <= fx1 and y1 <= fy1 and x2 >= fx2 and y2 >= fy2  # the face is not cut
    body = {"image": base64.b64encode(astronaut.read_bytes()).decode(), "subject": "100,120"}
    r = client.post("/v1/crop", json=body)
    assert r.status_code == 200 and r.json()["subject"] == "point" and r.json()["task"] == "subject"


def test_bad_subjects(client, photos):
    data = photos[0].read_bytes()
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", data)}, data={"subject": "99999,5"}), 422,
                 text="outside")
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", data)}, data={"subject": "50,50,10,10"}), 422)
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", data)}, data={"subject": "/etc/passwd"}), 422,
                 text="mask")  # never a path on the server's disk
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", data)}, data={"subject": "elephant"}), 422)
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", data)}, data={"keep_faces": "maybe"}), 400)


def test_return_image(client, photos):
    r = client.post("/v1/crop?return=image", files={"image": ("a.jpg", photos[0].read_bytes())},
                    data={"ratio": "1:1"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    x1, y1, x2, y2 = (int(v) for v in r.headers["x-crop-box"].split(","))
    crop = Image.open(io.BytesIO(r.content))
    assert crop.size == (x2 - x1, y2 - y1) and crop.width == crop.height
    assert r.headers["x-crop-size"] == f"{x2 - x1}x{y2 - y1}"  # the crop's, not the image's
    w, h = Image.open(photos[0]).size
    assert r.headers["x-image-size"] == f"{w}x{h}"
    r = client.post("/v1/crop?return=image", files={"image": ("b.png", png(Image.open(photos[1])))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert_error(client.post("/v1/crop?return=image", files={"image": ("a.jpg", photos[0].read_bytes())},
                             data={"ratio": "1:1,4:3"}), 400, "bad_request", "exactly one ratio")
    assert_error(client.post("/v1/crop?return=zip", files={"image": ("a.jpg", photos[0].read_bytes())}),
                 400, "bad_request", "return")


def test_default_pipeline_is_the_crop_command_default(photos):
    """No options: the same pipeline as `cropper-engine crop` with no options."""
    from cropper_engine.engine.loop import Cropper

    default = load_config(env={})
    with TestClient(create_app(default)) as c:
        info = c.get("/v1/info").json()
        ref = Cropper.from_config(load_config(env={}))
        assert info["engine"]["pipeline"] == ref.pipeline
        assert info["engine"]["embedder"] == ref.describe()["embedder"]
        r = c.post("/v1/crop", files={"image": ("x.jpg", photos[3].read_bytes())})
        assert r.status_code == 200
        assert r.json()["box"] == ref.crop(CropRequest(photos[3]))[0].to_json()["box"]


# --- bad input: always a clear 4xx, never a 500, never a dead worker ----------------------------


def test_malformed_requests(client, photos):
    good = photos[0].read_bytes()
    b64 = base64.b64encode(good).decode()
    assert_error(client.post("/v1/crop", content=b"hello", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/v1/crop"), 415)
    assert_error(client.post("/v1/crop", data={"task": "free"}, files={"mask": ("m.png", b"x")}),
                 400, "bad_request", "image")
    assert_error(client.post("/v1/crop", data={"image": "http://169.254.169.254/latest"},
                             files={"dummy": ("d", b"")}), 400)
    assert_error(client.post("/v1/crop", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"}), 400)
    assert_error(client.post("/v1/crop", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "bad_request", "JSON")
    assert_error(client.post("/v1/crop", json=[1, 2]), 400, "bad_request", "object")
    assert_error(client.post("/v1/crop", json={}), 400, "bad_request", "image")
    assert_error(client.post("/v1/crop", json={"image": 12}), 400, "bad_request", "base64 string")
    assert_error(client.post("/v1/crop", json={"image": "@@@not base64@@@"}), 400, "bad_request", "base64")
    assert_error(client.post("/v1/crop", json={"image": b64, "ratios": "1:1"}), 400, "bad_request", "unknown")
    assert_error(client.post("/v1/crop", json={"image": b64, "ratio": 16}), 400, "bad_request", "ratio")
    assert_error(client.post("/v1/crop", json={"image": b64, "task": ["free"]}), 400, "bad_request", "task")
    assert_error(client.post("/v1/crop", files={"image": ("a.jpg", good)}, data={"ratio": ["1:1", "2:3"]}),
                 400, "bad_request", "more than once")
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/crop"), 405)


def test_urls_are_refused_never_fetched(client):
    for url in ("http://127.0.0.1:1/x.jpg", "https://example.com/a.png", "file:///etc/passwd", "//evil/x"):
        assert_error(client.post("/v1/crop", json={"image": url}), 400, "url_refused", "never fetched")
        assert_error(client.post("/v1/crop", data={"image": url}, files={"mask": ("m", b"x")}),
                     400, "url_refused")
    assert_error(client.post("/v1/crop", json={"image": {"url": "http://x/y.jpg"}}), 400, "url_refused")
    assert_error(client.post("/v1/crop", json={"image": "data:image/png,http://x"}), 400)


@pytest.mark.parametrize("ratio", ["0:5", "abc", "1:0", "-1:2", "inf:1", "nan:1", "1:", "100:1", "1e400:1"])
def test_bad_ratios(client, photos, ratio):
    r = client.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())}, data={"ratio": ratio})
    assert_error(r, 422, "invalid_request", "aspect ratio")


def test_bad_tasks_and_masks(client, photos):
    img = photos[0].read_bytes()
    w, h = Image.open(photos[0]).size
    files = {"image": ("a.jpg", img)}
    assert_error(client.post("/v1/crop", files=files, data={"task": "zoom"}), 422, "invalid_request", "free")
    assert_error(client.post("/v1/crop", files=files, data={"task": "ratio"}), 422, "invalid_request", "ratio")
    assert_error(client.post("/v1/crop", files=files, data={"task": "subject"}), 422, "invalid_request", "mask")
    assert_error(client.post("/v1/crop", files=files, data={"task": "free", "ratio": "1:1"}), 422)
    small = png(Image.new("L", (w // 2, h // 2), 255))
    r = client.post("/v1/crop", files={**files, "mask": ("m.png", small)})
    assert_error(r, 422, "invalid_image", f"the mask is {w // 2}x{h // 2} but the image is {w}x{h}")
    assert_error(client.post("/v1/crop", files={**files, "mask": ("m.png", png(Image.new("L", (w, h), 0)))}),
                 422, "invalid_image", "empty")
    assert_error(client.post("/v1/crop", files={**files, "mask": ("m.png", b"not a png")}),
                 422, "invalid_image", "mask")
    assert_error(client.post("/v1/crop", files={**files, "mask": ("m.png", bomb_png())}), 422, "invalid_image")


def test_bad_images(client, photos):
    good = photos[0].read_bytes()
    cases = {
        "text": b"this is not an image",
        "truncated jpeg": good[: len(good) // 3],
        "header only": good[:200],
        "bomb": bomb_png(),
        "zero bytes in base64": b"\0" * 64,
        "gif garbage": b"GIF89a" + b"\x01" * 50,
    }
    for name, data in cases.items():
        r = client.post("/v1/crop", files={"image": ("x.jpg", data)})
        assert r.status_code in (413, 422), (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name
        r = client.post("/v1/crop", json={"image": base64.b64encode(data).decode()})
        assert r.status_code in (413, 422), (name, r.status_code, r.text)
    assert_error(client.post("/v1/crop", files={"image": ("x.jpg", b"")}), 400, "bad_request", "empty")
    # the worker is alive and well after all that
    r = client.post("/v1/crop", files={"image": ("a.jpg", good)})
    assert r.status_code == 200
    assert client.app.state.cropper_state.engine.alive


def test_fuzzed_inputs_never_500(client, photos):
    """Random bytes, strings and field combinations: a 200 or a 4xx with a JSON error, never a 5xx."""
    hypothesis = need_module("hypothesis", "hypothesis (the dev extra)")
    st = hypothesis.strategies
    good = photos[0].read_bytes()

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(image=st.one_of(st.binary(max_size=300), st.just(good), st.builds(lambda n: good[:n],
                                                                                         st.integers(0, 5000))),
                      task=st.one_of(st.none(), st.sampled_from(["free", "ratio", "subject", "x", ""]), st.text()),
                      ratio=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["1:1", "4:3,1:1", "0:0"])),
                      as_json=st.booleans())
    def check(image, task, ratio, as_json):
        if as_json:
            body = {"image": base64.b64encode(image).decode()}
            if task is not None:
                body["task"] = task
            if ratio is not None:
                body["ratio"] = ratio
            r = client.post("/v1/crop", json=body)
        else:
            data = {k: v for k, v in (("task", task), ("ratio", ratio)) if v is not None}
            r = client.post("/v1/crop", files={"image": ("f.bin", image)}, data=data)
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["message"]

    check()
    assert client.app.state.cropper_state.engine.alive


def test_upload_limits():
    big = jpeg(1200, 900, quality=100)
    assert len(big) > 50_000
    with TestClient(create_app(cfg(**{"server.max_upload_mb": 0.04}))) as c:
        assert_error(c.post("/v1/crop", files={"image": ("big.jpg", big)}), 413, "too_large")
        assert_error(c.post("/v1/crop", json={"image": base64.b64encode(big).decode()}), 413, "too_large")

        def chunks():  # no Content-Length: the limit holds while streaming
            for i in range(0, len(big) * 2, 4096):
                yield (big * 2)[i:i + 4096]
        r = c.post("/v1/crop", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "too_large")
        assert c.post("/v1/crop", files={"image": ("s.jpg", jpeg(64, 48))}).status_code == 200
    with TestClient(create_app(cfg(max_pixels=10_000))) as c:
        assert_error(c.post("/v1/crop", files={"image": ("m.jpg", jpeg(200, 100))}), 422, "invalid_image", "limit")


# --- auth ------------------------------------------------------------------------------------


def test_api_key_and_bind_policy(photos):
    from click.testing import CliRunner

    from cropper_engine.cli import main
    from cropper_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="API key"):
        create_app(cfg(**{"server.host": "0.0.0.0"}))
    res = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "0", "--vlm", "none"])
    assert res.exit_code == 1 and "API key" in res.output
    app = create_app(cfg(**{"server.host": "0.0.0.0", "server.api_key": "s3cret"}))
    with TestClient(app) as c:
        files = {"image": ("a.jpg", photos[0].read_bytes())}
        assert_error(c.post("/v1/crop", files=files), 401, "unauthorized")
        assert_error(c.post("/v1/crop", files=files, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/metrics"), 401)
        assert c.post("/v1/crop", files=files, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200


def test_load_failure_is_clear(tmp_path):
    from click.testing import CliRunner

    from cropper_engine.cli import main

    app = create_app(cfg(**{"vlm.model": str(tmp_path / "missing")}))
    with pytest.raises(RuntimeError, match="could not be loaded"), TestClient(app):
        pass
    res = CliRunner().invoke(main, ["serve", "--port", "0", "--vlm", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "could not be loaded" in res.output, res.output
    # the real server prints the reason, not a traceback (uvicorn logs the lifespan's failure text)
    out = subprocess.run([sys.executable, "-m", "cropper_engine.cli", "serve", "--port", "0", "--vlm",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "could not be loaded" in text and "Traceback" not in text, text


def test_no_key_serves_loopback_only():
    """Without an API key a server that was bound elsewhere anyway (uvicorn --factory --host
    0.0.0.0) answers 403 on that address; with a key, the key is what counts."""
    app = create_app(cfg())
    with TestClient(app, base_url="http://192.168.7.20:8000") as c:
        r = c.get("/healthz")
        assert r.status_code == 403 and "without an API key" in r.json()["error"]["message"]
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
    keyed = create_app(cfg(**{"server.api_key": "k"}))
    with TestClient(keyed, base_url="http://192.168.7.20:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/crop", files={"image": ("a.jpg", jpeg(64, 48))}).status_code == 401


def test_background_load_readyz(monkeypatch, photos):
    from cropper_engine.engine import loop

    real = loop.Cropper.from_config.__func__
    gate = threading.Event()

    def slow(cls, c, **kw):
        gate.wait(10)
        return real(cls, c, **kw)

    monkeypatch.setattr(loop.Cropper, "from_config", classmethod(slow))
    with TestClient(create_app(cfg(), load_in_background=True)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert_error(c.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())}), 503, "not_ready")
        gate.set()
        for _ in range(100):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200


# --- batching, queue, timeouts ---------------------------------------------------------------------


class SlowCropper:
    """The real no-VLM engine, slowed down per batch, recording batch sizes; `boom` ids raise."""

    def __init__(self, delay=0.3):
        from cropper_engine.engine.loop import Cropper

        self.inner = Cropper.from_config(cfg())
        self.vlm = None
        self.pipeline = self.inner.pipeline
        self.delay = delay
        self.sizes: list[int] = []

    def crop_batch(self, requests):
        self.sizes.append(len(requests))
        time.sleep(self.delay)
        if any(r.id == "boom" for r in requests):
            raise RuntimeError("boom")
        return self.inner.crop_batch(requests)

    def describe(self):
        return self.inner.describe()

    def close(self):
        pass


def test_dynamic_batching_every_caller_gets_its_own(photos):
    slow = SlowCropper(0.3)
    c_ = cfg(**{"server.max_batch": 8, "server.batch_wait_ms": 20})
    with TestClient(create_app(c_, cropper=slow)) as c:
        def one(i):
            w, h = 200 + 7 * i, 150 + 3 * i  # the size tells whose answer it is
            r = c.post("/v1/crop", files={"image": (f"img{i}.jpg", jpeg(w, h, seed=i))})
            return i, w, h, r

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(one, range(16)))
        for i, w, h, r in results:
            assert r.status_code == 200, r.text
            row = r.json()
            assert (row["image"], row["width"], row["height"]) == (f"img{i}.jpg", w, h)
        assert sum(slow.sizes) == 16 and max(slow.sizes) > 1 and max(slow.sizes) <= 8
        metrics = c.get("/metrics").text
        assert f"cropper_batch_size_count {float(len(slow.sizes))}" in metrics
        assert 'cropper_requests_total{endpoint="crop",status="200"} 16.0' in metrics
        assert 'cropper_stage_seconds_count{stage="queue"} 16.0' in metrics
        assert 'cropper_results_total{pipeline="no-vlm"} 16.0' in metrics


def test_poisoned_batch_fails_alone(photos):
    slow = SlowCropper(0.2)
    with TestClient(create_app(cfg(**{"server.batch_wait_ms": 100}), cropper=slow)) as c:
        def one(i):
            return c.post("/v1/crop", files={"image": ("a.jpg", photos[i % 4].read_bytes())},
                          data={"id": "boom" if i == 2 else f"ok{i}"})

        with ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(one, range(4)))
        assert [r.status_code for r in rs] == [200, 200, 500, 200], [r.text for r in rs]
        assert rs[2].json()["error"]["type"] == "internal"
        assert max(slow.sizes) > 1  # it was batched, then re-run one by one
        assert c.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())}).status_code == 200


def test_queue_full_is_503_with_retry_after(photos):
    slow = SlowCropper(0.5)
    c_ = cfg(**{"server.max_batch": 1, "server.queue_size": 1, "server.batch_wait_ms": 0})
    with TestClient(create_app(c_, cropper=slow)) as c:
        def one(i):
            return c.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())})

        with ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(one, range(6)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        for r in rs:
            if r.status_code == 503:
                assert_error(r, 503, "overloaded", "queue full")
                assert int(r.headers["retry-after"]) >= 1
        assert 'cropper_rejected_total{reason="queue_full"}' in c.get("/metrics").text


def test_request_timeout_is_504_and_engine_survives(photos):
    slow = SlowCropper(1.0)
    with TestClient(create_app(cfg(**{"server.request_timeout_s": 0.2}), cropper=slow)) as c:
        r = c.post("/v1/crop", files={"image": ("a.jpg", photos[0].read_bytes())})
        assert_error(r, 504, "timeout", "0.2 s")
        time.sleep(1.2)
        engine = c.app.state.cropper_state.engine
        assert engine.alive
        slow.delay = 0.0
        fut = engine.submit(CropRequest(str(photos[0])))
        assert fut.result(10)[0].pipeline == "no-vlm"
