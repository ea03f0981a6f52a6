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
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
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
    d = SHARED_DATA / "fcdb"
    if not (d / "val.jsonl").exists():
        pytest.skip("FCDB data not present")
    return d
