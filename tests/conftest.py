"""Shared fixtures: an isolated environment for every test, tiny models built once per run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test sees the user's caches, config or CROPPER_* settings, and none can reach a hub."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    for name in list(os.environ):
        if name.startswith("CROPPER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))  # the list of fitted models (models/fitted.py)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """`cropper-engine models make-tiny` output: tiny/idefics2 and tiny/clip."""
    from cropper_engine.models.tiny import make_tiny_clip
    from cropper_engine.models.tiny_vlm import make_tiny_idefics2

    out = tmp_path_factory.mktemp("tiny")
    if "vllm" in sys.modules:
        # an in-process vLLM engine rewrites transformers' model classes: build in a fresh process
        code = ("import sys; from pathlib import Path; from cropper_engine.models.tiny import make_tiny_clip; "
                "from cropper_engine.models.tiny_vlm import make_tiny_idefics2; o = Path(sys.argv[1]); "
                "make_tiny_idefics2(o / 'idefics2'); make_tiny_clip(o / 'clip')")
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=300)
        return out
    make_tiny_idefics2(out / "idefics2")
    make_tiny_clip(out / "clip")
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """A few real photos (public domain / CC0, from scikit-image's data) as JPEGs."""
    from cropper_engine.samples import write_samples

    return write_samples(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def fcdb() -> Path:
    """../shared/data/fcdb (the tests that read real data skip without it)."""
    from needs import need_path

    d = SHARED_DATA / "fcdb"
    need_path(d / "val.jsonl", "FCDB (../shared/data/fcdb)")  # a skip here, a failure in CI
    return d


@pytest.fixture(scope="session")
def tiny_clip(tiny_dir):
    """The tiny open_clip model of `tiny_dir`, loaded once."""
    from cropper_engine.models.embedders import load_embedder

    return load_embedder(f"open_clip-dir:{tiny_dir / 'clip' / 'open_clip'}", device="cpu")


@pytest.fixture(scope="session")
def example_index(tmp_path_factory, photos, tiny_clip):
    """An index of the sample photos with made-up ground-truth crops (and MOS), for the loop tests."""
    from PIL import Image

    from cropper_engine.data.example import Example
    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.types import Box

    examples = []
    for p in photos:
        w, h = Image.open(p).size
        crops = [Box(0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h), Box(0, 0, 0.6 * w, 0.6 * h), Box(0.2 * w, 0, w, h)]
        examples.append(Example(p.name, str(p), w, h, crops, [4.2, 3.1, 3.9], None,
                                Box(0.4 * w, 0.4 * h, 0.6 * w, 0.6 * h)))
    out = tmp_path_factory.mktemp("idx") / "index"
    ExampleIndex.build(examples, tiny_clip, out)
    return out


@pytest.fixture
def mediapipe_installed():
    """MediaPipe (the subject extra): a test that needs it skips here without it and fails in CI."""
    from needs import need_module

    return need_module("mediapipe", "the subject extra (MediaPipe)")


def pytest_configure(config):
    """Tell tests/needs.py which markers this run selects (a `-m vllm` run in .venv-vllm lacks the
    other extras: their modules' requirements at import are skipped there, not failed)."""
    import needs

    needs.MARKEXPR = config.getoption("markexpr") or ""
