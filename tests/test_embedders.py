"""Embedders: the tiny CLIP models (open_clip and transformers), the classical descriptor, saliency.

Hermetic: every test sees empty, offline hub caches (no real weights, no network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cropper_engine.errors import InputError, ModelNotFoundError
from cropper_engine.models.base import Embedder, TensorEmbedder
from cropper_engine.models.classical import CLASSICAL_ID, ClassicalEmbedder
from cropper_engine.models.embedders import SPEC_FORMS, load_embedder, resolve_embedder
from cropper_engine.models.saliency import spectral_residual_saliency


@pytest.fixture(autouse=True)
def _hermetic_hub(tmp_path, monkeypatch):
    """Empty, offline hub caches: what a test sees does not depend on this machine's caches."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine torch's spinning intra-op
    threads made one 6-image batch take 0.4 s instead of 2 ms (measured with the load at 3x cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from cropper_engine.models.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_other_seed(tmp_path_factory):
    from cropper_engine.models.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_seed1"), seed=1)


def _specs(paths) -> dict[str, str]:
    return {
        "open_clip-dir": f"open_clip-dir:{paths['open_clip']}",
        "hf-clip": f"hf-clip:{paths['hf_clip']}",
        "open_clip-file": f"open_clip:cropper-tiny-clip:{paths['open_clip_weights']}",
    }


_LOADED: dict[str, TensorEmbedder] = {}


@pytest.fixture(params=["open_clip-dir", "hf-clip", "open_clip-file"])
def clip_embedder(request, tiny) -> TensorEmbedder:
    spec = _specs(tiny)[request.param]
    if spec not in _LOADED:
        _LOADED[spec] = load_embedder(spec, device="cpu")  # type: ignore[assignment]
    return _LOADED[spec]


def _images(n: int, seed: int = 0, size: tuple[int, int] = (160, 120)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# --- tiny CLIP models -----------------------------------------------------------------------


def test_tiny_builder_layout(tiny):
    oc, hf = tiny["open_clip"], tiny["hf_clip"]
    assert (oc / "open_clip_config.json").is_file() and (oc / "open_clip_model.safetensors").is_file()
    cfg = json.loads((oc / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= cfg.keys()
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in hf.iterdir()}


def test_clip_protocol_shape_and_norm(clip_embedder):
    emb = clip_embedder
    assert isinstance(emb, TensorEmbedder) and isinstance(emb, Embedder)
    assert emb.device == "cpu" and emb.input_size == 64 and emb.dim == 64
    vecs = emb.embed(_images(5))
    assert vecs.shape == (5, emb.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert emb.embed([]).shape == (0, emb.dim)
    desc = emb.describe()
    assert desc["id"] == emb.id and desc["dim"] == emb.dim and desc["input_size"] == 64
    assert desc["resize"] == "shortest-side+center-crop" and len(desc["mean"]) == len(desc["std"]) == 3


def test_clip_batching_and_determinism(clip_embedder):
    images = _images(6, seed=1)
    clip_embedder.batch_size = 4  # two batches, the second one partial
    try:
        batched = clip_embedder.embed(images)
    finally:
        clip_embedder.batch_size = 64
    one_by_one = np.concatenate([clip_embedder.embed([im]) for im in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(clip_embedder.embed(images), clip_embedder.embed(images))


def test_clip_encode_pixels_matches_embed(clip_embedder):
    """The tensor path on the same pixels gives the same vector.

    We resize the way both preprocessors do (Pillow bicubic, shortest side to 64: 160x120 ->
    85x64, then a centre crop at x = 10), so the two paths see identical pixels and differ only
    in float rounding (observed ~1e-7): the tolerance 1e-5 allows for that, nothing more. A
    torch bilinear resize instead would differ by ~1e-2, which is why we do not use one here.
    """
    import torch

    image = _images(1, seed=2)[0]
    ref = clip_embedder.embed([image])
    small = image.resize((85, 64), Image.Resampling.BICUBIC).crop((10, 0, 74, 64))
    pixels = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)[None].float() / 255.0
    out = clip_embedder.encode_pixels(pixels)
    assert out.shape == (1, clip_embedder.dim) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)

    # Another size is resized on the way in; rows stay unit length.
    big = clip_embedder.encode_pixels(torch.rand(3, 3, 96, 96))
    np.testing.assert_allclose(big.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_clip_ids_stable_and_distinct(tiny, tiny_other_seed, tmp_path):
    from cropper_engine.models.tiny import make_tiny_clip

    again = make_tiny_clip(tmp_path / "again", seed=0)  # same seed, another folder
    for kind in ("open_clip-dir", "hf-clip", "open_clip-file"):
        ids = [load_embedder(_specs(p)[kind], device="cpu").id for p in (tiny, again, tiny_other_seed)]
        assert ids[0] == ids[1], kind
        assert ids[0] != ids[2], kind
    file_id = load_embedder(_specs(tiny)["open_clip-file"], device="cpu").id
    prefix, digest = file_id.split("@")
    assert prefix == "open_clip:cropper-tiny-clip:file:open_clip_model.safetensors"
    assert len(digest) == 12 and all(c in "0123456789abcdef" for c in digest)
    assert load_embedder(_specs(tiny)["hf-clip"], device="cpu").id.startswith("hf-clip:hf_clip@")


def test_open_clip_named_config_and_text(tiny):
    from cropper_engine.models.clip import OpenClipEmbedder

    emb = OpenClipEmbedder("cropper-tiny-clip", pretrained=tiny["open_clip_weights"], device="cpu",
                           config_dir=tiny["open_clip"])
    ref = load_embedder(_specs(tiny)["open_clip-dir"], device="cpu")
    images = _images(2, seed=3)
    np.testing.assert_allclose(emb.embed(images), ref.embed(images), atol=1e-6)
    text = emb.encode_text(["a photo of a dog", "a landscape"])
    assert text.shape == (2, 64) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)


def test_open_clip_tag_resolved_from_local_hub_cache(tiny, _hermetic_hub, monkeypatch):
    """A pretrained tag loads from a hub-cache layout (refs/main -> snapshot -> blob) offline."""
    import open_clip

    from cropper_engine.models.clip import OpenClipEmbedder, file_sha256

    weights = tiny["open_clip_weights"]
    sha = file_sha256(weights)
    repo = _hermetic_hub / "hf" / "hub" / "models--cropper--tiny-clip"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    shutil.copy(weights, repo / "blobs" / sha)
    os.symlink(f"../../blobs/{sha}", snap / "open_clip_model.safetensors")
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "cropper-tiny-clip",
                        {"tinytag": {"url": "", "hf_hub": "cropper/tiny-clip/", "quick_gelu": False}})

    emb = OpenClipEmbedder("cropper-tiny-clip", "tinytag", device="cpu", config_dir=tiny["open_clip"])
    assert emb.id == "open_clip:cropper-tiny-clip:tinytag"
    assert file_sha256(snap / "open_clip_model.safetensors") == sha  # taken from the blob's name
    ref = load_embedder(_specs(tiny)["open_clip-dir"], device="cpu")
    np.testing.assert_allclose(emb.embed(_images(2)), ref.embed(_images(2)), atol=1e-6)


def test_missing_weights_raise_model_not_found(_hermetic_hub):
    with pytest.raises(ModelNotFoundError, match=r"huggingface-cli download timm/vit_base_patch32_clip_224\.openai"):
        load_embedder("open_clip:ViT-B-32", device="cpu")
    with pytest.raises(ModelNotFoundError, match="open_clip:ViT-B-32:/path/to/file"):
        load_embedder("open_clip:ViT-B-32:laion2b_s34b_b79k", device="cpu")
    with pytest.raises(ModelNotFoundError, match=r"huggingface-cli download openai/clip-vit-base-patch32"):
        load_embedder("hf-clip:openai/clip-vit-base-patch32", device="cpu")
    with pytest.raises(ModelNotFoundError):
        load_embedder(f"open_clip-dir:{_hermetic_hub}", device="cpu")
    with pytest.raises(ModelNotFoundError):
        load_embedder("open_clip:ViT-B-32:/no/such/checkpoint.pt", device="cpu")
    emb, reason = resolve_embedder("auto", device="cpu")
    assert emb.id == CLASSICAL_ID and "classical" in reason


def test_bad_specs_raise_input_error():
    with pytest.raises(InputError) as info:
        load_embedder("nosuch:thing")
    assert all(form in str(info.value) for form in SPEC_FORMS)
    with pytest.raises(InputError, match="openai"):
        load_embedder("open_clip:ViT-B-32:nosuchtag", device="cpu")
    with pytest.raises(InputError, match="ViT-B-32"):
        load_embedder("open_clip:ViT-B-33", device="cpu")
    with pytest.raises(InputError):
        load_embedder("hf-clip:")
    assert isinstance(load_embedder("classical"), ClassicalEmbedder)


def test_embedders_import_is_light():
    code = (
        "import sys, cropper_engine.models.embedders, cropper_engine.models.clip, "
        "cropper_engine.models.tiny\n"
        "heavy = [m for m in ('torch', 'open_clip', 'transformers', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- classical descriptor -------------------------------------------------------------------


def _scene(seed: int, dx: int = 0, dy: int = 0, gain: float = 1.0) -> Image.Image:
    """A gradient sky with noise and three coloured ellipses; dx, dy shift the view, gain brightens."""
    rng = np.random.default_rng(seed)
    h, w, pad = 240, 320, 16
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, h + 2 * pad)[:, None, None]
    canvas = (top * (1 - t) + bottom * t) * np.ones((1, w + 2 * pad, 1))
    canvas = canvas + rng.normal(0, 6, canvas.shape)
    im = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        cx, cy = rng.uniform(pad, w + pad), rng.uniform(pad, h + pad)
        rx, ry = rng.uniform(15, 60, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    arr = np.asarray(im, dtype=np.float32)[pad + dy: pad + dy + h, pad + dx: pad + dx + w]
    return Image.fromarray(np.clip(arr * gain, 0, 255).astype(np.uint8))


def test_classical_shape_norm_determinism():
    emb = ClassicalEmbedder()
    images = [_scene(s) for s in range(3)]
    vecs = emb.embed(images)
    assert vecs.shape == (3, emb.dim) and vecs.dtype == np.float32 and 256 <= emb.dim <= 512
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs, ClassicalEmbedder().embed(images))
    np.testing.assert_array_equal(vecs[1:2], emb.embed(images[1:2]))
    desc = emb.describe()
    assert desc["id"] == "classical:v1" and desc["dim"] == emb.dim
    assert sum(b["dim"] for b in desc["blocks"].values()) == emb.dim


def test_classical_similar_closer_than_different():
    emb = ClassicalEmbedder()
    n = 8
    base = emb.embed([_scene(s) for s in range(n)])
    shifted = emb.embed([_scene(s, dx=6, dy=4, gain=1.12) for s in range(n)])
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    positive = (base * shifted).sum(axis=1)
    assert (positive > sims.max(axis=1)).all(), (positive, sims.max(axis=1))


def test_classical_inputs_paths_arrays_odd_images(tmp_path):
    emb = ClassicalEmbedder()
    image = _scene(5)
    path = tmp_path / "scene.jpg"
    image.resize((1024, 768), Image.Resampling.BICUBIC).save(path, quality=92)
    from_path, from_pil, from_array = emb.embed([path, image, np.asarray(image)])
    assert float(from_path @ from_pil) > 0.95  # a reduced-scale JPEG decode, not the same pixels
    np.testing.assert_allclose(from_array, from_pil, atol=1e-6)
    odd = [Image.new("RGB", (64, 64), (128, 128, 128)), Image.new("L", (300, 3), 40),
           Image.new("RGBA", (7, 500), (10, 200, 30, 128))]
    vecs = emb.embed(odd)
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InputError):
        emb.embed([object()])


# --- saliency -------------------------------------------------------------------------------


@pytest.mark.parametrize(("cy", "cx"), [(60, 240), (180, 70), (120, 160)])
def test_saliency_peaks_on_bright_blob(cy, cx):
    h, w, r = 240, 320, 20
    yy, xx = np.mgrid[:h, :w]
    gray = np.full((h, w), 20, np.uint8)
    gray[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 230
    sal = spectral_residual_saliency(gray, size=64)
    assert sal.shape == (48, 64) and sal.dtype == np.float32
    assert sal.min() >= 0.0 and sal.max() == pytest.approx(1.0)
    py, px = np.unravel_index(int(sal.argmax()), sal.shape)
    scale = w / 64  # map pixel -> image pixel
    assert np.hypot(py * scale - cy, px * scale - cx) < 2 * r
    # The blob's neighbourhood holds much more saliency than the rest of the map.
    my, mx = np.mgrid[: sal.shape[0], : sal.shape[1]] * scale
    near = np.hypot(my - cy, mx - cx) < 2 * r
    assert sal[near].mean() > 3 * sal[~near].mean()


def test_saliency_flat_and_small_inputs():
    assert not spectral_residual_saliency(np.full((100, 80), 0.5, np.float32)).any()
    small = spectral_residual_saliency(np.random.default_rng(0).random((20, 30)), size=64)
    assert small.shape == (20, 30)  # never upscaled
    with pytest.raises(ValueError):
        spectral_residual_saliency(np.zeros((0, 5)))
