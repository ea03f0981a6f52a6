"""VLLMBackend's block size when none was asked for: read from the built engine, guarded by getattr."""

from types import SimpleNamespace

from cropper_engine.models.vlm_vllm import _engine_block_size


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
