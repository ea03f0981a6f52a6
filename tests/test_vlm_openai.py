"""The openai backend: request format, retries, timeouts, the down state, concurrency, the loop on
it, and (slow) a real `vllm.entrypoints.openai.api_server` from .venv-vllm serving the tiny Idefics2."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from needs import need_module
from PIL import Image

httpx = need_module("httpx", "the server extra (httpx)", module_level=True)

from cropper_engine.engine.grammar import BoxGrammar  # noqa: E402
from cropper_engine.models.base import GenerationParams, ImagePart, Message  # noqa: E402
from cropper_engine.models.vlm_openai import (  # noqa: E402
    OpenAIBackend,
    OpenAIClientConfig,
    VLMRequestError,
    VLMUnavailableError,
)

ROOT = Path(__file__).resolve().parents[1]
import vllm_server as vllm_server_proc  # noqa: E402

VLLM_PY = vllm_server_proc.VLLM_PY
BOX = " (4.5, 100, 120, 880, 900)"


def conversation(n_examples=2):
    ex = Image.new("RGB", (300, 200), (200, 10, 10))
    q = Image.new("RGB", (640, 480), (10, 200, 10))
    parts: list = ["Crop these."]
    for i in range(n_examples):
        parts += [ImagePart(ex, f"ex-{i}"), "\n(4, 1, 1, 1000, 1000)\n"]
    parts += [ImagePart(q, "q-1"), "\nQuery.\n", ImagePart(q, None, (10, 20, 300, 400)), "\nAnswer:"]
    return [Message("user", parts)]


def completion(n, text=BOX, prompt_tokens=50):
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 7 * n, "total_tokens": 0,
                      "prompt_tokens_details": {"cached_tokens": 16}}}


class FakeServer:
    """An httpx MockTransport that answers like vLLM and records what it was sent."""

    def __init__(self, fail=(), model="tiny", delay=0.0, entry=None):
        self.fail = list(fail)  # per chat request (and /models call when model=""): an HTTP status or "connect"
        self.bodies: list[dict] = []
        self.calls = 0
        self.model_calls = 0
        self.model = model
        self.entry = entry or {}  # more of the /models entry (root, max_model_len)
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, request):
        if request.url.path.endswith("/models") and self.model:  # the client's look at the served model
            with self._lock:
                self.model_calls += 1
            return httpx.Response(200, json={"object": "list", "data": [{"id": self.model, **self.entry}]})
        with self._lock:
            self.calls += 1
            step = self.fail.pop(0) if self.fail else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if step == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            if isinstance(step, int):
                return httpx.Response(step, json={"error": {"message": f"status {step}"}})
            if request.url.path.endswith("/models"):
                return httpx.Response(200, json={"object": "list", "data": [{"id": self.model}]})
            body = json.loads(request.content)
            if isinstance(step, str):  # a 400 with this message
                return httpx.Response(400, json={"error": {"message": step}})
            self.bodies.append(body)
            return httpx.Response(200, json=completion(body.get("n", 1)))
        finally:
            with self._lock:
                self.in_flight -= 1


def backend(fake, **kw):
    conf = {"base_url": "http://vlm.test/v1", "backoff_s": 0.01, "cooldown_s": 0.3, **kw}
    return OpenAIBackend(OpenAIClientConfig(**conf), transport=httpx.MockTransport(fake))


def params(n=3, grammar=True):
    return GenerationParams(n=n, max_new_tokens=40, temperature=0.05, seed=7,
                            grammar=BoxGrammar() if grammar else None)


def test_request_format_data_urls_uuids_structured_outputs():
    fake = FakeServer()
    vlm = backend(fake, longest_edge=112)
    gens = vlm.generate([conversation()], params())
    assert gens[0].texts == [BOX] * 3 and gens[0].prompt_tokens == 50 and gens[0].cached_tokens == 16
    body = fake.bodies[0]
    assert body["model"] == "tiny" and body["n"] == 3 and body["max_tokens"] == 40 and body["seed"] == 7
    assert body["structured_outputs"] == {"regex": BoxGrammar().regex()}
    assert re.fullmatch(BoxGrammar().regex(), BOX)
    content = body["messages"][0]["content"]
    images = [p for p in content if p["type"] == "image_url"]
    assert len(images) == 4
    for p in images:  # data URLs only, never a remote URL
        url = p["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert max(im.size) <= 112  # fitted to the model's longest edge before sending
    assert [p.get("uuid") for p in images] == ["ex-0", "ex-1", "q-1", None]
    assert next(p["text"] for p in content if p["type"] == "text") == "Crop these."
    # recurring images are encoded once
    vlm.generate([conversation()], params())
    assert fake.bodies[1]["messages"] == fake.bodies[0]["messages"]
    assert "structured_outputs" not in backend(FakeServer()).body(conversation(), params(grammar=False), "m")


def test_model_named_by_the_server_or_the_config(tmp_path):
    fake = FakeServer(model="served-name")
    vlm = backend(fake)
    vlm.generate([conversation(0)], params())
    assert fake.bodies[0]["model"] == "served-name" and "served-name" in vlm.id
    from cropper_engine.config import load_config

    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": "mantis-8b-idefics2",
                                         "vlm.base_url": "http://x:1/v1", "vlm.api_key": "k"})
    b = OpenAIBackend.from_config(cfg, transport=httpx.MockTransport(FakeServer()))
    assert b.config.model == "TIGER-Lab/Mantis-8B-Idefics2" and b._http.headers["authorization"] == "Bearer k"
    with pytest.raises(Exception, match="http"):
        OpenAIBackend(OpenAIClientConfig(base_url="ftp://x"))


def test_retries_then_success():
    fake = FakeServer(fail=["connect", 503])
    vlm = backend(fake)
    gens = vlm.generate([conversation(0)], params())
    assert gens[0].texts == [BOX] * 3
    assert vlm.stats["retries"] == 2 and not vlm.is_down()


class FakeClock:
    """A controllable clock for the backend's cooldown and backoff (`time.monotonic`, `time.sleep`)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def test_unreachable_marks_down_fails_fast_then_recovers(monkeypatch):
    import types

    from cropper_engine.models import vlm_openai

    clock = FakeClock()
    monkeypatch.setattr(vlm_openai, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    fake = FakeServer(fail=["connect"] * 3 + [502] * 3)
    vlm = backend(fake, max_retries=2)  # cooldown 0.3 s
    with pytest.raises(VLMUnavailableError, match="after 3 attempts"):
        vlm.generate([conversation(0)], params())
    assert fake.calls == 3 and len(clock.slept) == 2  # backed off between the attempts, not after the last
    assert vlm.is_down() and vlm.retry_after() >= 1
    calls = fake.calls
    clock.t += 0.29
    with pytest.raises(VLMUnavailableError):  # within the cooldown: no request at all
        vlm.generate([conversation(0)], params())
    assert fake.calls == calls and vlm.is_down()
    clock.t += 0.02  # the cooldown is over
    assert not vlm.is_down()
    with pytest.raises(VLMUnavailableError, match="502"):  # tried again: still failing
        vlm.generate([conversation(0)], params())
    assert fake.calls == calls + 3 and vlm.is_down()
    clock.t += 0.31
    assert vlm.generate([conversation(0)], params())[0].texts  # back
    assert not vlm.is_down()


def test_client_errors_are_not_retried_and_structured_outputs_fall_back():
    fake = FakeServer(fail=[404])
    vlm = backend(fake, model="nope")
    with pytest.raises(VLMRequestError, match="404"):
        vlm.generate([conversation(0)], params())
    assert fake.calls == 1 and not vlm.is_down()
    fake = FakeServer(fail=["unknown field structured_outputs"])
    vlm = backend(fake, model="m")
    assert vlm.generate([conversation(0)], params())[0].texts
    assert "structured_outputs" not in fake.bodies[0]
    vlm.generate([conversation(0)], params())
    assert "structured_outputs" not in fake.bodies[1] and vlm.describe()["structured_outputs"] is False


def test_concurrency_bound():
    fake = FakeServer(delay=0.2)
    vlm = backend(fake, model="m", concurrency=4)
    t = time.perf_counter()
    gens = vlm.generate([conversation(0) for _ in range(8)], params(n=2))
    dt = time.perf_counter() - t
    assert len(gens) == 8 and all(g.texts == [BOX] * 2 for g in gens)
    assert fake.max_in_flight == 4 and 0.35 < dt < 1.5


def test_partial_failure_keeps_the_others():
    fake = FakeServer(fail=["context too long"])
    vlm = backend(fake, model="m", concurrency=1)
    gens = vlm.generate([conversation(0), conversation(0)], params())
    assert gens[0].texts == [] and gens[1].texts == [BOX] * 3


class _Slow(BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(1.0)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_read_timeout_is_retried_then_unavailable():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        vlm = OpenAIBackend(OpenAIClientConfig(base_url=f"http://127.0.0.1:{srv.server_port}/v1", model="m",
                                               timeout_s=0.2, max_retries=1, backoff_s=0.01))
        t = time.perf_counter()
        with pytest.raises(VLMUnavailableError, match="Timeout"):
            vlm.generate([conversation(0)], params())
        assert time.perf_counter() - t < 1.5 and vlm.stats["requests"] == 2
        vlm.close()
    finally:
        srv.shutdown()


def test_loop_on_openai_backend_and_build(photos):
    """The whole loop through `vlm.backend = openai` (a fake server): every row is `vlm`."""
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.types import CropRequest

    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": "auto",
                                         "retrieval.embedder": "classical", "vlm.candidates": 3, "vlm.rounds": 1})
    fake = FakeServer()
    vlm = OpenAIBackend.from_config(cfg, transport=httpx.MockTransport(fake))
    cropper = Cropper.from_config(cfg, vlm=vlm)
    outs = cropper.crop_batch([CropRequest(photos[0]), CropRequest(photos[1], "ratio", ["4:3"])])
    rows = [r for o in outs for r in o]
    assert [r.pipeline for r in rows] == ["vlm", "vlm"], [r.notes for r in rows]
    assert len(fake.bodies) == 4  # 2 jobs x (round 0 + 1 refinement)
    built = Cropper.from_config(cfg)  # build.py's path to this backend
    assert built.vlm.id.startswith("openai:") and built.describe()["pipeline"] == "vlm"
    built.close()


# --- the engine's processor settings as vLLM's per-request mm_processor_kwargs ----------------

# vLLM 0.32's answer to a server started without --trust-request-mm-kwargs
VLLM_REFUSES_MM_KWARGS = ("Per-request mm_processor_kwargs are disabled by default because they can change "
                          "multimodal preprocessing resource usage. Start the server with --trust-request-mm-kwargs "
                          "only when clients are trusted.")


def _from_config(model, fake, **over):
    from cropper_engine.config import load_config

    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": model,
                                         "vlm.base_url": "http://vlm.test/v1", **over})
    return OpenAIBackend.from_config(cfg, transport=httpx.MockTransport(fake))


@pytest.mark.parametrize("name", ["mantis-8b-idefics2", "idefics2-8b", "idefics3-8b", "smolvlm-instruct",
                                  "qwen2.5-vl-7b"])
def test_every_request_carries_the_registry_settings_without_local_files(name):
    """No model files here (the test's HF cache is empty): a registry name or hub id gives its
    family's settings, sent with every request (Qwen2.5-VL's pixel budget also shrinks the images)."""
    from cropper_engine.models.registry import MODELS, PROCESSOR_SETTINGS

    spec = MODELS[name]
    for model in (name, spec.hub_id):
        fake = FakeServer(model=spec.hub_id, entry={"max_model_len": 4096})
        vlm = _from_config(model, fake)
        assert vlm._counter is None  # nothing here to count with
        vlm.generate([conversation(1), conversation(0)], params())
        assert len(fake.bodies) == 2
        for body in fake.bodies:
            assert body["mm_processor_kwargs"] == PROCESSOR_SETTINGS[spec.family]
            assert body["model"] == spec.hub_id
            # the BOS: Idefics3's and SmolVLM's templates write it, Idefics2's does not (Qwen has none)
            assert body["add_special_tokens"] is (spec.family != "idefics3")
        d = vlm.describe()
        assert d["mm_processor_kwargs"] == PROCESSOR_SETTINGS[spec.family]
        assert "registry" in d["mm_processor_kwargs_source"]
        assert vlm.context_length == 4096 == d["server_context"]  # the server's max_model_len
        if spec.family == "qwen2_5_vl":  # the 640 x 480 query shrunk to the budget before it is sent
            urls = [p["image_url"]["url"] for p in fake.bodies[0]["messages"][0]["content"] if p["type"] == "image_url"]
            sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls]
            assert max(w * h for w, h in sizes) <= 256 * 28 * 28 < 640 * 480
        vlm.close()


@pytest.mark.parametrize("entry,family", [
    ({"id": "HuggingFaceM4/Idefics3-8B-Llama3"}, "idefics3"),
    ({"id": "served", "root": "/hf/hub/models--HuggingFaceM4--idefics2-8b/snapshots/0123abc"}, "idefics2"),
    ({"id": "/models/Qwen2.5-VL-7B-Instruct", "root": "/models/Qwen2.5-VL-7B-Instruct"}, "qwen2_5_vl"),
    ({"id": "HuggingFaceTB/SmolVLM-256M-Instruct"}, "idefics3"),
], ids=["hub-id", "cache-root", "folder", "family-word"])
def test_settings_from_the_servers_models_entry(entry, family):
    """vlm.model auto, nothing here: the server's /models entry (id, root) names the family."""
    from cropper_engine.models.registry import PROCESSOR_SETTINGS

    fake = FakeServer(model=entry["id"], entry={**entry, "max_model_len": 2048})
    vlm = _from_config("auto", fake)
    assert vlm.mm_processor_kwargs is None  # not known before the server is asked
    vlm.generate([conversation(0)], params())
    vlm.generate([conversation(0)], params())
    assert [b["mm_processor_kwargs"] for b in fake.bodies] == [PROCESSOR_SETTINGS[family]] * 2
    assert [b["add_special_tokens"] for b in fake.bodies] == [family != "idefics3"] * 2
    assert fake.model_calls == 1  # the server's entry is read once
    assert vlm.context_length == 2048 and "server's model" in vlm.describe()["mm_processor_kwargs_source"]


def test_no_settings_known_is_said_and_nothing_is_sent(caplog):
    fake = FakeServer(model="my-llava", entry={"root": "/srv/llava-1.6"})
    vlm = _from_config("auto", fake)
    with caplog.at_level("WARNING", logger="cropper_engine.models.vlm_openai"):
        vlm.generate([conversation(0)], params())
    assert "mm_processor_kwargs" not in fake.bodies[0]
    assert vlm.describe()["mm_processor_kwargs"] is None
    said = [r.getMessage() for r in caplog.records if "no processor settings known" in r.getMessage()]
    assert len(said) == 1 and "'my-llava'" in said[0] and "/srv/llava-1.6" in said[0]


def test_a_local_processor_gives_the_settings_and_the_server_caps_the_context(tiny_dir):
    """Model files here: the settings the engine applies to the processor; the server's max_model_len
    lowers the budget's context (the model's own is larger)."""
    fake = FakeServer(model=str(tiny_dir / "idefics2"), entry={"max_model_len": 300})
    vlm = _from_config(str(tiny_dir / "idefics2"), fake)
    assert vlm._counter is not None and vlm.context_length > 300
    assert vlm.mm_processor_kwargs == {"do_image_splitting": False}  # before any request
    assert "processor here" in vlm.describe()["mm_processor_kwargs_source"]
    vlm.generate([conversation(0)], params())
    assert fake.bodies[0]["mm_processor_kwargs"] == {"do_image_splitting": False}
    assert vlm.context_length == 300 == vlm.server_context


def test_a_server_refusing_mm_processor_kwargs_is_asked_without_them_once(caplog):
    """vLLM without --trust-request-mm-kwargs answers 400 naming the field: the request is sent again
    without it, and no later request carries it; the log says so once, with how to serve."""
    fake = FakeServer(model="HuggingFaceM4/idefics2-8b", fail=[VLLM_REFUSES_MM_KWARGS])
    vlm = _from_config("idefics2-8b", fake, **{"vlm.batch_size": 1})
    with caplog.at_level("WARNING", logger="cropper_engine.models.vlm_openai"):
        gens = vlm.generate([conversation(0), conversation(1)], params())
        vlm.generate([conversation(0)], params())
    assert all(g.texts == [BOX] * 3 for g in gens)
    assert fake.calls == 4 and len(fake.bodies) == 3  # one refused, then three without the field
    assert all("mm_processor_kwargs" not in b for b in fake.bodies)
    assert all(b["structured_outputs"] and b["add_special_tokens"] for b in fake.bodies)  # the rest kept
    d = vlm.describe()
    assert d["mm_processor_kwargs"] is None and "trust-request-mm-kwargs" in d["mm_processor_kwargs_refused"]
    said = [r.getMessage() for r in caplog.records if "refuses per-request mm_processor_kwargs" in r.getMessage()]
    assert len(said) == 1 and """--mm-processor-kwargs '{"do_image_splitting": false}'""" in said[0]
    # another 400 is not taken for a refusal of the field
    fake = FakeServer(model="HuggingFaceM4/idefics2-8b", fail=["This model's maximum context length is 8192"])
    vlm = _from_config("idefics2-8b", fake)
    with pytest.raises(VLMRequestError, match="maximum context"):
        vlm.generate([conversation(0)], params())
    assert vlm.mm_processor_kwargs == {"do_image_splitting": False}


def test_settings_can_be_turned_off_or_given():
    fake = FakeServer(model="HuggingFaceM4/idefics2-8b")
    vlm = backend(fake, model="HuggingFaceM4/idefics2-8b", send_mm_kwargs=False)
    vlm.generate([conversation(0)], params())
    assert "mm_processor_kwargs" not in fake.bodies[0]
    vlm = backend(fake, model="x", mm_processor_kwargs={"max_pixels": 1000}, mm_source="a test")
    assert vlm.body(conversation(0), params(), "x")["mm_processor_kwargs"] == {"max_pixels": 1000}


# --- a real vLLM OpenAI-compatible server (slow) ---------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, tmp_path_factory):
    port = vllm_server_proc.free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    proc = vllm_server_proc.start_up(tiny_dir / "idefics2", port, log)  # skips here, fails in CI, if not up
    try:
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        vllm_server_proc.stop(proc)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_vllm_server(vllm_server, tiny_dir, photos):
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.types import CropRequest

    url, _ = vllm_server
    vlm = OpenAIBackend(OpenAIClientConfig(base_url=url, model=str(tiny_dir / "idefics2"), longest_edge=112,
                                           timeout_s=120))
    assert vlm.health()
    gens = vlm.generate([conversation(2), conversation(1)], params(n=3))
    grammar = BoxGrammar()
    for g in gens:
        assert len(g.texts) == 3 and g.prompt_tokens > 0 and g.generated_tokens > 0
        assert all(re.fullmatch(grammar.regex(), t) for t in g.texts), g.texts  # structured outputs held
    assert vlm.describe()["structured_outputs"] is True
    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": str(tiny_dir / "idefics2"),
                                         "vlm.base_url": url, "retrieval.embedder": "classical",
                                         "vlm.candidates": 3, "vlm.rounds": 1})
    cropper = Cropper.from_config(cfg)
    outs = cropper.crop_batch([CropRequest(photos[0]), CropRequest(photos[1], "ratio", ["16:9"])])
    rows = [r for o in outs for r in o]
    assert [r.pipeline for r in rows] == ["vlm", "vlm"], [r.notes for r in rows]
    assert all(r.extra["tokens"]["generated"] > 0 for r in rows)
    cropper.close()
    vlm.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_vllm_server_gets_the_in_process_prompt_token_ids(vllm_server, tiny_dir, caplog):
    """vLLM's chat endpoint tokenizes with add_special_tokens=False by default and the Idefics2
    template writes no <s>: the client asks for it, so the server's prompt token ids are the
    transformers backend's, BOS included (without it they lack exactly the BOS). This server runs
    with vLLM's defaults, which refuse per-request mm_processor_kwargs: the client's first request
    is refused, asked again without them, and the log says how to serve."""
    from cropper_engine.config import load_config
    from cropper_engine.models.vlm_transformers import TransformersVLM

    url, _ = vllm_server
    cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": str(tiny_dir / "idefics2"),
                                         "vlm.base_url": url})
    vlm = OpenAIBackend.from_config(cfg)
    local = TransformersVLM(str(tiny_dir / "idefics2"), device="cpu")
    conv = conversation(2)
    ours = local._inputs([conv])["input_ids"][0].tolist()
    assert vlm.mm_processor_kwargs == {"do_image_splitting": False}  # from the processor here
    with caplog.at_level("WARNING", logger="cropper_engine.models.vlm_openai"):
        gens = vlm.generate([conv], params(n=1))
    assert gens[0].prompt_tokens == len(ours)
    assert "--trust-request-mm-kwargs" in vlm.describe()["mm_processor_kwargs_refused"]
    assert any("refuses per-request mm_processor_kwargs" in r.getMessage() for r in caplog.records)
    assert vlm.mm_processor_kwargs is None
    assert ours[0] == local.tokenizer.bos_token_id
    body = {**vlm.body(conv, params(n=1), vlm.model), "return_token_ids": True, "max_tokens": 2}
    theirs = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()["prompt_token_ids"]
    assert theirs == ours
    assert vlm.prompt_token_estimate(conv) == len(ours) and vlm.context_length
    without = httpx.post(f"{url}/chat/completions", json={**body, "add_special_tokens": False},
                         timeout=120).json()["prompt_token_ids"]
    assert without == ours[1:]
    vlm.close()
