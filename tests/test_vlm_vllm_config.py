"""What VLLMBackend reads without vLLM running: the block size when none was asked for (from the
built engine, guarded by getattr) and the image edge from a model folder's processor config."""

import json
from types import SimpleNamespace

from cropper_engine.models.vlm_vllm import _engine_block_size, _processor_edge


def test_block_size_from_vllm_config():
    llm = SimpleNamespace(llm_engine=SimpleNamespace(
        vllm_config=SimpleNamespace(cache_config=SimpleNamespace(block_size=128))))
    assert _engine_block_size(llm) == 128


def test_block_size_from_older_cache_config():
    llm = SimpleNamespace(llm_engine=SimpleNamespace(cache_config=SimpleNamespace(block_size=16)))
    assert _engine_block_size(llm) == 16


def test_block_size_unknown_is_none():
    assert _engine_block_size(object()) is None
    assert _engine_block_size(SimpleNamespace(llm_engine=SimpleNamespace(
        vllm_config=SimpleNamespace(cache_config=SimpleNamespace(block_size=None))))) is None


def test_processor_edge_from_the_model_folder(tmp_path):
    idefics = tmp_path / "idefics2"
    idefics.mkdir()
    (idefics / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 980, "shortest_edge": 378}, "do_image_splitting": False}))
    assert _processor_edge(idefics) == 980
    qwen = tmp_path / "qwen"  # its "longest_edge" is a pixel budget, not an edge
    qwen.mkdir()
    (qwen / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 12845056, "shortest_edge": 3136}, "merge_size": 2, "temporal_patch_size": 2}))
    assert _processor_edge(qwen) is None
    assert _processor_edge(tmp_path / "missing") is None


def test_settings_without_a_processor_keep_the_smaller_pixel_budget(tmp_path):
    """Where the processor cannot be built in vLLM's venv (Qwen2.5-VL's needs torchvision), the
    engine's settings still reach vLLM, the pixel budget never raised above the model's own."""
    from cropper_engine.models.vlm_vllm import _settings_without_processor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 12544, "shortest_edge": 3136}, "merge_size": 2, "temporal_patch_size": 2}))
    assert _settings_without_processor(tmp_path, {"max_pixels": 200704}) == {"max_pixels": 12544}
    assert _settings_without_processor(tmp_path, {"do_image_splitting": False}) == {"do_image_splitting": False}
    assert _settings_without_processor(tmp_path, None) is None


def test_fitter_cuts_a_region_that_reaches_the_image_edge():
    """A candidate touching the query's right or bottom edge is cut from the rounded proxy without
    PIL refusing the box (it did for about half of all image sizes: the whole round's VLM call failed)."""
    from PIL import Image

    from cropper_engine.models.base import ImagePart
    from cropper_engine.models.images import ImageFitter

    fit = ImageFitter(112)
    for w in range(300, 1100, 7):
        im = Image.new("RGB", (w, 333))
        out = fit(ImagePart(im, None, (0, 0, w, 333)))
        assert max(out.size) == 112
