"""Known VLMs, where their weights are on this machine, and how `--vlm` picks one.

A model is named by a registry name (`mantis-8b-idefics2`), a hub id (looked up in the local
Hugging Face cache only) or a local folder. Nothing here touches the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cropper_engine.errors import ModelNotFoundError

# The engine's processor settings per family: S=30 examples + the query + R crops must fit the
# model's context. Idefics2 splits an image into 4 quarters + the whole by default (5 x 64 + 6 =
# 326 tokens instead of 66); Idefics3 / SmolVLM tile an image up to 4 x 4 tiles + a global one
# (each 169 / 81 tokens): splitting off, one tile an image. Qwen2.5-VL's budget of 12.8M pixels
# gives a 1024-px photo ~1.3k tokens: at most 256 tokens (a 28 x 28 patch each) an image.
PROCESSOR_SETTINGS: dict[str, dict[str, object]] = {
    "idefics2": {"do_image_splitting": False},
    "idefics3": {"do_image_splitting": False},
    "qwen2_5_vl": {"max_pixels": 256 * 28 * 28},
}


def family_of(model_type: str | None) -> str | None:
    """A config.json `model_type` -> the registry family it runs as (None if unknown)."""
    t = (model_type or "").lower()
    return {"idefics2": "idefics2", "idefics3": "idefics3", "smolvlm": "idefics3", "qwen2_5_vl": "qwen2_5_vl",
            "qwen2_vl": "qwen2_5_vl"}.get(t)


def processor_settings(family: str | None) -> dict[str, object]:
    return dict(PROCESSOR_SETTINGS.get(family or "", {}))


def template_writes_bos(name_or_family: str) -> bool | None:
    """Whether a registry model's chat template (a family's: all of its registry models') writes the
    tokenizer's BOS itself, read from the property sheets (no model files needed): then a server must
    not add one. None when unknown (no sheet) or the family's models disagree."""
    from cropper_engine.models.sheets import load_sheet, render_template

    names = [name_or_family] if name_or_family in MODELS else [m.name for m in MODELS.values()
                                                               if m.family == name_or_family]
    seen = set()
    for name in names:
        try:
            sheet = load_sheet(name)
            bos = (sheet.get("special_tokens") or {}).get("bos")
            bos = bos[0] if isinstance(bos, list | tuple) else bos
            text = render_template(sheet["chat_template"]["template"],
                                   [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
        except Exception:  # no sheet, or one without a template
            return None
        seen.add(bool(bos) and text.startswith(str(bos)))
    return seen.pop() if len(seen) == 1 else None


# words in a served model's name that say its family (the registry's models are matched first)
_FAMILY_WORDS = (("idefics2", "idefics2"), ("idefics3", "idefics3"), ("smolvlm", "idefics3"),
                 ("qwen2.5-vl", "qwen2_5_vl"), ("qwen2_5_vl", "qwen2_5_vl"), ("qwen2-vl", "qwen2_5_vl"),
                 ("qwen2_vl", "qwen2_5_vl"))


def served_family(*names: str | None) -> tuple[str, str | None, str] | None:
    """(family, registry name or None, why) for a model a server names (an OpenAI `/models` entry's `id` and `root`): a
    registry name or hub id, a Hugging Face cache snapshot path (`models--owner--name`), a folder
    named after a hub id or containing a registry name, else a family's word in the name
    (idefics2, idefics3, smolvlm, qwen2.5-vl, qwen2-vl); None when nothing matches."""
    import re

    specs = sorted(MODELS.values(), key=lambda m: -len(m.name))
    texts = [n.strip().rstrip("/\\") for n in names if n and n.strip()]
    for text in texts:
        low = text.lower()
        cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)
        hub = f"{cached[1]}/{cached[2]}".lower() if cached else low
        base = re.split(r"[/\\]", low)[-1]
        for m in specs:
            if low == m.name or hub == m.hub_id.lower():
                return m.family, m.name, f"{text!r} is {m.hub_id} ({m.name})"
        for m in specs:
            if base == m.hub_id.split("/")[-1].lower() or m.name in base:
                return m.family, m.name, f"{text!r} is named like {m.hub_id} ({m.name})"
    for text in texts:  # the name's last part only (a hub id's model name, a folder's name)
        cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)
        last = (cached[2] if cached else re.split(r"[/\\]", text)[-1]).lower()
        for word, family in _FAMILY_WORDS:
            if word in last:
                return family, None, f"{text!r} names {word}"
    return None


def context_length(spec: ModelSpec | None, config: object = None, tokenizer: object = None) -> int | None:
    """The context a prompt must fit: the registry's trained context for a known model, else the
    text config's `max_position_embeddings` (capped by the tokenizer's `model_max_length`)."""
    if spec is not None:
        return spec.context
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "max_position_embeddings", None)
    cap = getattr(tokenizer, "model_max_length", None)
    if isinstance(cap, int) and 0 < cap < 10**7:
        n = min(n, cap) if n else cap
    return int(n) if n else None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    family: str  # idefics2 | idefics3 | qwen2_5_vl
    params_b: float  # billions of parameters (for the listing; memory comes from the config)
    backends: tuple[str, ...]  # where it runs: transformers, vllm (native or via our plugin), openai
    context: int  # trained context length
    notes: str = ""
    default: bool = False
    revision: str | None = None  # the hub commit the engine was checked against (None: not pinned)
    revision_source: str = ""  # where that commit hash was read

    @property
    def processor_settings(self) -> dict[str, object]:
        """What the engine sets on the processor (and passes to vLLM as mm_processor_kwargs)."""
        return processor_settings(self.family)


_UNPINNED = "not pinned: no published commit hash of this repo could be read from this machine (no hub access)"
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("mantis-8b-idefics2", "TIGER-Lab/Mantis-8B-Idefics2", "idefics2", 8.0,
                  ("transformers", "vllm", "openai"), 8192,
                  "the paper's open model; vLLM through cropper-engine's Idefics2 plugin", default=True,
                  revision_source=_UNPINNED),
        ModelSpec("idefics2-8b", "HuggingFaceM4/idefics2-8b", "idefics2", 8.0,
                  ("transformers", "vllm", "openai"), 8192, "vLLM through cropper-engine's Idefics2 plugin",
                  revision_source=_UNPINNED),
        ModelSpec("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", "idefics3", 8.5,
                  ("transformers", "vllm", "openai"), 10240, "native in vLLM", revision_source=_UNPINNED),
        ModelSpec("smolvlm-instruct", "HuggingFaceTB/SmolVLM-Instruct", "idefics3", 2.2,
                  ("transformers", "vllm", "openai"), 16384, "native in vLLM; small enough for 8 GB GPUs",
                  revision_source=_UNPINNED),
        ModelSpec("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8.3,
                  ("transformers", "vllm", "openai"), 32768, "native in vLLM; at most 256 tokens an image",
                  revision="cc594898137f460bfe9f0759e9844b3ce807cfb5",
                  revision_source="cited (model card at this commit, 2025-04-06) by public documents that "
                                  "link huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/<commit>/README.md; "
                                  "not checked against the hub from here"),
    )
}
DEFAULT_MODEL = next(m for m in MODELS.values() if m.default)


def hf_cache_dir() -> Path:
    """The local hub cache (models/hub_cache.py: the one lookup the registry and the loaders share)."""
    from cropper_engine.models.hub_cache import hub_cache_dir

    return hub_cache_dir()


def cached_snapshot(hub_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a hub repo in the HF cache, if its config is there: the pinned
    `revision` when that snapshot is here, else the one `main` points to, else the newest."""
    from cropper_engine.models import hub_cache

    return hub_cache.cached_snapshot(hub_id, revision)


def spec_for_folder(folder: str | Path) -> ModelSpec | None:
    """The registry entry of a model folder: a hub-cache snapshot (`.../models--owner--name/
    snapshots/<rev>`) by its hub id, else a folder named after a registry model or its hub name
    (what `huggingface-cli download ID --local-dir` makes); None for anything else."""
    from cropper_engine.models.hub_cache import hub_id_of

    hub_id = hub_id_of(folder)
    if hub_id is not None:
        spec = next((m for m in MODELS.values() if m.hub_id.lower() == hub_id.lower()), None)
        if spec is not None:
            return spec
    name = Path(folder).expanduser().name.lower()
    return next((m for m in MODELS.values()
                 if m.name in name or m.hub_id.split("/")[-1].lower() == name), None)


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder with config.json and weights
    spec: ModelSpec | None
    label: str  # what the user named


def how_to_get(hub_id: str) -> str:
    spec = next((m for m in MODELS.values() if m.hub_id == hub_id), None)
    rev = f" --revision {spec.revision}" if spec is not None and spec.revision else ""
    return (f"get the weights on a machine with internet: `huggingface-cli download {hub_id}{rev}` "
            f"(then copy ~/.cache/huggingface here), or pass a local folder with --vlm /path/to/model")


def looks_like_path(name: str) -> bool:
    """A folder, not a hub id: starts with '.', '~' or a separator, or has separators other than
    a hub id's one `owner/name` slash."""
    seps = {"/", os.sep, os.altsep or "/"}
    if name.startswith((".", "~", *seps)):
        return True
    return bool(seps - {"/"} & set(name)) or name.count("/") > 1


def resolve_model(name: str) -> ResolvedModel:
    """A registry name, hub id or local folder -> a local folder; ModelNotFoundError if absent."""
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p} has no config.json: not a model folder")
        return ResolvedModel(p, spec_for_folder(p), name)
    if looks_like_path(name):
        raise ModelNotFoundError(
            f"no such model folder: {name}; pass --vlm an existing folder with config.json and weights, "
            f"a hub id (owner/name) in the local Hugging Face cache, or one of: {', '.join(MODELS)}")
    spec = MODELS.get(name.lower())
    hub_id = spec.hub_id if spec else name
    if spec is None and "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a folder, not a hub id, not one of: {', '.join(MODELS)}")
    snap = cached_snapshot(hub_id, spec.revision if spec else None)
    if snap is None or not has_weights(snap):
        raise ModelNotFoundError(f"{hub_id} is not in the local Hugging Face cache ({hf_cache_dir()}); "
                                 + how_to_get(hub_id))
    if spec is None:
        spec = next((m for m in MODELS.values() if m.hub_id.lower() == hub_id.lower()), None)
    return ResolvedModel(snap, spec, name)


def list_models(measure: bool = True) -> list[dict[str, object]]:
    """The registry; for a model whose files are here, its tokens per image measured from its
    processor at the engine's settings (None when not here: never written by hand)."""
    rows = []
    for m in MODELS.values():
        snap = cached_snapshot(m.hub_id, m.revision)
        tokens = None
        if snap is not None and measure:
            try:
                tokens = image_tokens_of(snap, m.processor_settings)
            except Exception:  # a partial snapshot: the listing still works
                tokens = None
        rows.append({
            "name": m.name, "hub_id": m.hub_id, "family": m.family, "params_b": m.params_b,
            "revision": m.revision, "revision_source": m.revision_source,
            "snapshot": snap.name if snap else None,
            "processor_settings": m.processor_settings, "image_tokens": tokens, "context": m.context,
            "backends": list(m.backends), "default": m.default,
            "local": bool(snap and has_weights(snap)), "path": str(snap) if snap else None,
            "notes": m.notes,
        })
    return rows


def load_processor(path: str | Path, settings: dict[str, object] | None = None) -> tuple[object, str | None]:
    """A model folder's HF processor with the engine's settings applied, and a chat template
    filled in where the snapshot has none (returns the note saying so, else None)."""
    import json

    from transformers import AutoProcessor

    from cropper_engine.models.images import apply_processor_settings

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if settings is None:
        try:
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
        settings = processor_settings(family_of(model_type))
    apply_processor_settings(processor, settings)
    return processor, ensure_chat_template(processor, Path(path))


def image_tokens_of(path: str | Path, settings: dict[str, object] | None = None) -> int:
    from cropper_engine.models.images import measure_image_tokens

    return measure_image_tokens(load_processor(path, settings)[0])


def fallback_chat_template(family: str | None) -> str | None:
    """The chat template a family's published snapshots carry (older Mantis snapshots carry
    none: transformers then refuses to render a prompt)."""
    from cropper_engine.models import chat_templates

    return {"idefics2": chat_templates.IDEFICS2_CHAT_TEMPLATE, "idefics3": chat_templates.SMOLVLM_CHAT_TEMPLATE,
            "qwen2_5_vl": chat_templates.QWEN2_5_VL_CHAT_TEMPLATE}.get(family or "")


def ensure_chat_template(processor: object, path: Path | None = None) -> str | None:
    """Give a processor without a chat template its family's; the note saying so, or None."""
    import json

    if getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                             "chat_template", None):
        return None
    model_type = None
    if path is not None:
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            pass
    family = family_of(model_type)
    template = fallback_chat_template(family)
    if template is None:
        return None
    processor.chat_template = template  # type: ignore[attr-defined]
    return (f"the snapshot has no chat template: using cropper-engine's copy of the {family} template "
            "(as in the current hub snapshots)")


# --- memory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryNeed:
    """GPU memory a VLM needs, from its real config, in GB (1e9 bytes): every buffer alive at the
    peak of a batch (the transformers backend: when the decode's KV slab is filled from the
    prefill's cache while the prefix store holds the round-0 prompts)."""

    weights: float
    kv: float  # the decode's KV slab: `batch` prompts of `context` tokens + their answer slots
    prefix_store: float  # round-0 prompts kept for the refinement rounds (transformers backend)
    activations: float  # the text model's prefill of a batch (MLP intermediates at full length)
    vision: float  # one chunk of images through the vision tower
    overhead: float = 1.0  # CUDA context, allocator slack
    context: int = 0
    batch: int = 1
    vision_chunk: int = 1
    backend: str = "transformers"
    prefill_layer: float = 0.0  # the prefill's cache moves into the slab a layer at a time: one layer
    masks: float = 0.0  # the prefill's 4D attention mask (boolean) and the float copy SDPA makes of it
    answer_slots: int = 0  # tokens a prompt's answers may add to the slab

    @property
    def total(self) -> float:
        return (self.weights + self.kv + self.prefix_store + self.prefill_layer + self.activations + self.masks
                + self.vision + self.overhead)

    def buffers(self) -> dict[str, float]:
        """Every term of the estimate, GB, by name."""
        return {"weights": self.weights, "kv_slab": self.kv, "prefix_store": self.prefix_store,
                "prefill_cache_layer": self.prefill_layer, "prefill_activations": self.activations,
                "attention_masks": self.masks, "vision": self.vision, "overhead": self.overhead}

    def describe(self) -> str:
        slots = f" + {self.answer_slots} answer slots" if self.answer_slots else ""
        return (f"~{self.total:.1f} GB: weights {self.weights:.1f}, KV {self.kv:.1f} ({self.batch} prompt(s) x "
                f"{self.context} tokens{slots}), prefix store {self.prefix_store:.1f}, prefill cache "
                f"{self.prefill_layer:.1f} (one layer at a time into the slab), prefill activations "
                f"{self.activations:.1f}, attention masks {self.masks:.1f}, vision {self.vision:.1f} "
                f"({self.vision_chunk} image(s) a chunk), overhead {self.overhead:.1f}")


def count_parameters(config: object) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(config: object, dtype_bytes: int = 2) -> int:
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def vision_bytes_per_image(config: object, settings: dict[str, object] | None = None, dtype_bytes: int = 2) -> int:
    """The vision tower's peak for one image: one layer's activations, with the attention scores
    materialised (the math kernel: an upper bound where a fused kernel runs)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    patch = getattr(vision, "patch_size", 14) or 14
    budget = (settings or {}).get("max_pixels")
    if budget:  # Qwen2.5-VL: patches follow the pixel budget
        patches = int(budget) // (patch * patch)
    else:
        patches = (getattr(vision, "image_size", 384) // patch) ** 2
    hidden = getattr(vision, "hidden_size", None) or getattr(vision, "embed_dim", 1024)
    inter = getattr(vision, "intermediate_size", 4 * hidden)
    heads = getattr(vision, "num_attention_heads", None) or getattr(vision, "num_heads", 16)
    return patches * (4 * hidden + 2 * inter) * dtype_bytes + heads * patches * patches * dtype_bytes


def memory_need(config: object, context: int, batch: int = 1, backend: str = "transformers",
                settings: dict[str, object] | None = None, vision_chunk: int = 4,
                dtype_bytes: int = 2, params: int | None = None, answer_slots: int = 256) -> MemoryNeed:
    """Memory for a VLM from its config (a transformers PretrainedConfig): bf16 weights, the prefill's
    activations and attention mask, one vision chunk, and the KV the backend keeps.

    transformers backend (`batch` prompts of `context` tokens): the decode's slab (the prompts plus
    `answer_slots` tokens of answers each), the prefix store's round-0 prompts, and one layer of the
    prefill's cache while it moves into the slab. vLLM: one sequence's KV at least (it pages the rest)."""
    gb = 1e9
    n = params if params is not None else count_parameters(config)
    text = getattr(config, "text_config", None) or config
    transformers_backend = backend == "transformers"
    rows = batch if transformers_backend else 1
    per_token = kv_bytes_per_token(config, dtype_bytes)
    slots = answer_slots if transformers_backend else 0
    kv = per_token * (context + slots) * rows
    store = per_token * context * rows if transformers_backend else 0
    layer = per_token * context * rows / max(text.num_hidden_layers, 1) if transformers_backend else 0
    inter = getattr(text, "intermediate_size", 4 * text.hidden_size)
    tokens = context * rows
    act = tokens * (4 * text.hidden_size + 3 * inter) * dtype_bytes
    masks = rows * context * context * (1 + dtype_bytes) if transformers_backend else 0
    vision = vision_bytes_per_image(config, settings, dtype_bytes) * vision_chunk
    return MemoryNeed(n * dtype_bytes / gb, kv / gb, store / gb, act / gb, vision / gb, context=context,
                      batch=rows, vision_chunk=vision_chunk, backend=backend, prefill_layer=layer / gb,
                      masks=masks / gb, answer_slots=slots)


def gpu_memory_gb() -> float:
    """Free memory of the first CUDA device in GB, 0 when there is none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return 0.0
        free, _ = torch.cuda.mem_get_info(0)
        return free / 1e9
    except Exception:
        return 0.0
