"""The registry's real-model facts the engine relies on: memory from the real config (and
`--vlm auto` refusing a GPU too small), tokens per image measured from a local snapshot, pinned
revisions, and the chat template shipped for snapshots that lack one."""

from __future__ import annotations

import json
import shutil

import pytest

from cropper_engine.config import load_config
from cropper_engine.models import registry


def _idefics2_8b_config():
    """Idefics2-8B / Mantis-8B-Idefics2's published shape (tiny_vlm.SHAPES["8b"]), Mistral's
    sliding window included."""
    from transformers import Idefics2Config

    from cropper_engine.models.tiny_vlm import SHAPES

    spec = SHAPES["8b"]
    text = dict(model_type="mistral", vocab_size=spec["vocab_size"], rms_norm_eps=1e-5, **spec["text"])
    return Idefics2Config(vision_config=dict(spec["vision"]), perceiver_config=dict(spec["perceiver"]),
                          text_config=text, image_token_id=32001, tie_word_embeddings=False)


def test_memory_from_the_real_config():
    config = _idefics2_8b_config()
    params = registry.count_parameters(config)
    assert 8.2e9 < params < 8.6e9  # ~8.4B: 16.8 GB of bf16 weights alone
    one = registry.memory_need(config, 8192, 1, "transformers", {"do_image_splitting": False}, params=params)
    eight = registry.memory_need(config, 8192, 8, "transformers", {"do_image_splitting": False}, params=params)
    assert one.weights == pytest.approx(2 * params / 1e9)
    # Mistral-7B: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes = 128 KiB a token
    assert registry.kv_bytes_per_token(config) == 32 * 8 * 128 * 2 * 2
    # the slab: the prompt and 256 answer slots; the store: the prompt
    assert eight.kv == pytest.approx(8 * one.kv) and one.kv == pytest.approx(131072 * (8192 + 256) / 1e9)
    assert one.prefix_store == pytest.approx(131072 * 8192 / 1e9)
    assert one.total > 20.0 and eight.total > 40.0  # the old rule said 20 GB for either
    assert "weights 16.8" in eight.describe() and "8 prompt(s) x 8192 tokens" in eight.describe()
    vllm = registry.memory_need(config, 8192, 8, "vllm", {"do_image_splitting": False}, params=params)
    assert vllm.prefix_store == 0 and vllm.kv == pytest.approx(one.prefix_store)


def _cache_snapshot(tmp_path, monkeypatch, hub_id, files_from=None, config=None, commit="a" * 40):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    if files_from is not None:
        shutil.copytree(files_from, snap)
    else:
        snap.mkdir(parents=True)
        config.save_pretrained(snap)
        (snap / "model.safetensors").write_bytes(b"")  # weights "present": never loaded here
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_vlm_auto_refuses_a_gpu_that_cannot_hold_it(tmp_path, monkeypatch):
    from cropper_engine.engine import build

    _cache_snapshot(tmp_path, monkeypatch, "TIGER-Lab/Mantis-8B-Idefics2", config=_idefics2_8b_config())
    cfg = load_config(env={}, overrides={"vlm.backend": "transformers"})
    monkeypatch.setattr(registry, "gpu_memory_gb", lambda: 24.0)
    reasons: dict[str, str] = {}
    assert build._vlm(cfg, reasons) is None
    assert reasons["pipeline"].startswith("no-vlm: mantis-8b-idefics2 is here but needs a GPU with ~")
    assert "24.0 GB free for transformers" in reasons["pipeline"] and "weights 16.8" in reasons["pipeline"]
    monkeypatch.setattr(registry, "gpu_memory_gb", lambda: 0.0)
    assert build._vlm(cfg, reasons) is None and "no GPU" in reasons["pipeline"]
    loaded = []
    monkeypatch.setattr(registry, "gpu_memory_gb", lambda: 141.0)  # an H200
    monkeypatch.setattr(build, "load_vlm", lambda cfg, resolved, reasons: loaded.append(resolved) or "vlm")
    assert build._vlm(cfg, reasons) == "vlm" and loaded[0].spec.name == "mantis-8b-idefics2"


def test_models_list_measures_tokens_of_a_local_snapshot(tmp_path, monkeypatch, tiny_dir):
    snap = _cache_snapshot(tmp_path, monkeypatch, "TIGER-Lab/Mantis-8B-Idefics2", files_from=tiny_dir / "idefics2")
    rows = {r["name"]: r for r in registry.list_models()}
    mantis = rows["mantis-8b-idefics2"]
    assert mantis["local"] and mantis["path"] == str(snap) and mantis["snapshot"] == snap.name
    assert mantis["image_tokens"] == 10  # the tiny's processor, measured: <fake> + 8 latents + <fake>
    assert mantis["processor_settings"] == {"do_image_splitting": False}
    assert rows["idefics2-8b"]["image_tokens"] is None  # not here: never a hand-written number
    qwen = rows["qwen2.5-vl-7b"]
    assert qwen["revision"] and len(qwen["revision"]) == 40 and "cited" in qwen["revision_source"]
    assert mantis["revision"] is None and "not pinned" in mantis["revision_source"]


def test_a_pinned_revision_is_preferred_and_named_in_the_fix(tmp_path, monkeypatch, tiny_dir):
    qwen = registry.MODELS["qwen2.5-vl-7b"]
    other = _cache_snapshot(tmp_path, monkeypatch, qwen.hub_id, files_from=tiny_dir / "idefics2")
    assert registry.cached_snapshot(qwen.hub_id, qwen.revision) == other  # only main is here
    pinned = _cache_snapshot(tmp_path, monkeypatch, qwen.hub_id, files_from=tiny_dir / "idefics2",
                             commit=qwen.revision)
    (other.parent.parent / "refs" / "main").write_text(other.name)
    assert registry.cached_snapshot(qwen.hub_id, qwen.revision) == pinned
    assert f"--revision {qwen.revision}" in registry.how_to_get(qwen.hub_id)


def test_a_snapshot_without_a_chat_template_gets_the_familys(tmp_path, tiny_dir):
    from cropper_engine.models.base import ImagePart, Message
    from cropper_engine.models.vlm_transformers import TransformersVLM

    old = tmp_path / "mantis-old"
    shutil.copytree(tiny_dir / "idefics2", old)
    (old / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((old / name).read_text())
        data.pop("chat_template", None)
        (old / name).write_text(json.dumps(data))
    from transformers import AutoProcessor

    bare = AutoProcessor.from_pretrained(old, local_files_only=True)
    assert bare.chat_template is None
    with pytest.raises(ValueError):  # what transformers does without one: every image fell back
        bare.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)
    vlm = TransformersVLM(str(old), device="cpu")
    ref = TransformersVLM(str(tiny_dir / "idefics2"), device="cpu")
    assert any("no chat template" in n for n in vlm.notes) and not ref.notes
    from PIL import Image

    conv = [Message("user", ["Hello.", ImagePart(Image.new("RGB", (64, 48))), "\nNow?"])]
    assert vlm.render(conv)[0] == ref.render(conv)[0]


@pytest.mark.parametrize(("hub_id", "context"), [("TIGER-Lab/Mantis-8B-Idefics2", 8192),
                                                  ("Qwen/Qwen2.5-VL-7B-Instruct", 32768)])
def test_a_snapshot_folder_keeps_its_registry_entry(tmp_path, monkeypatch, tiny_dir, hub_id, context):
    """`--vlm .../snapshots/<rev>/` is the registry model it is a snapshot of (its trained context,
    not the config's max_position_embeddings), as is a `--local-dir` folder named after it."""
    snap = _cache_snapshot(tmp_path, monkeypatch, hub_id, files_from=tiny_dir / "idefics2")
    resolved = registry.resolve_model(str(snap))
    assert resolved.spec is not None and resolved.spec.hub_id == hub_id
    assert registry.context_length(resolved.spec) == context
    local = tmp_path / "downloads" / hub_id.split("/")[1]
    shutil.copytree(tiny_dir / "idefics2", local)
    assert registry.resolve_model(str(local)).spec is resolved.spec
    other = tmp_path / "downloads" / "my-finetune"
    shutil.copytree(tiny_dir / "idefics2", other)
    assert registry.resolve_model(str(other)).spec is None  # unknown: the config's own context applies


@pytest.mark.parametrize("var", ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"])
def test_the_registry_and_the_loader_look_in_one_cache(tmp_path, monkeypatch, tiny_dir, var):
    """Whichever variable names the cache, `models list` / `--vlm auto` (the registry) and the
    transformers loader find the same snapshot."""
    from cropper_engine.models.vlm_transformers import resolve_model_dir

    hub_id = "TIGER-Lab/Mantis-8B-Idefics2"
    snap = _cache_snapshot(tmp_path, monkeypatch, hub_id, files_from=tiny_dir / "idefics2")
    monkeypatch.delenv("HF_HOME")
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv(var, str(cache.parent if var == "HF_HOME" else cache))
    rows = {r["name"]: r for r in registry.list_models(measure=False)}
    assert rows["mantis-8b-idefics2"]["path"] == str(snap)
    assert registry.resolve_model("mantis-8b-idefics2").path == snap
    assert resolve_model_dir(hub_id) == snap == resolve_model_dir("mantis-8b-idefics2")
    assert registry.hf_cache_dir() == cache


@pytest.mark.parametrize("names,family,name", [
    (("HuggingFaceM4/idefics2-8b",), "idefics2", "idefics2-8b"),
    (("mantis-8b-idefics2",), "idefics2", "mantis-8b-idefics2"),
    (("served", "/hf/hub/models--HuggingFaceM4--Idefics3-8B-Llama3/snapshots/0a1b"), "idefics3", "idefics3-8b"),
    (("/models/Qwen2.5-VL-7B-Instruct",), "qwen2_5_vl", "qwen2.5-vl-7b"),
    (("/tmp/t/idefics2-8b",), "idefics2", "idefics2-8b"),
    (("HuggingFaceTB/SmolVLM-256M-Instruct",), "idefics3", None),
    (("Qwen/Qwen2-VL-2B-Instruct",), "qwen2_5_vl", None),
    (("my-llava", "/srv/idefics2-runs/llava-1.6"), None, None),  # a family word in a parent folder only
])
def test_served_family(names, family, name):
    from cropper_engine.models.registry import served_family

    found = served_family(*names)
    assert (found[:2] if found else (None, None)) == (family, name)


def test_template_writes_bos_from_the_sheets():
    from cropper_engine.models.registry import template_writes_bos

    assert {n: template_writes_bos(n) for n in registry.MODELS} == {
        "mantis-8b-idefics2": False, "idefics2-8b": False, "idefics3-8b": True, "smolvlm-instruct": True,
        "qwen2.5-vl-7b": False}
    assert (template_writes_bos("idefics2"), template_writes_bos("idefics3")) == (False, True)
    assert template_writes_bos("llava") is None
