"""Known VLMs, where their weights are on this machine, and how `--vlm` picks one.

A model is named by a registry name (`mantis-8b-idefics2`), a hub id (looked up in the local
Hugging Face cache only) or a local folder. Nothing here touches the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cropper_engine.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    family: str  # idefics2 | idefics3 | qwen2_5_vl
    params_b: float  # billions of parameters
    image_tokens: int  # prompt tokens per image at the default resolution
    backends: tuple[str, ...]  # where it runs: transformers, vllm (native or via our plugin), openai
    context: int  # trained context length
    notes: str = ""
    default: bool = False

    @property
    def gpu_memory_gb(self) -> float:
        """bf16 weights plus ~25% for activations and the KV cache."""
        return self.params_b * 2 * 1.25


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("mantis-8b-idefics2", "TIGER-Lab/Mantis-8B-Idefics2", "idefics2", 8.0, 66,
                  ("transformers", "vllm", "openai"), 8192,
                  "the paper's open model; vLLM through cropper-engine's Idefics2 plugin", default=True),
        ModelSpec("idefics2-8b", "HuggingFaceM4/idefics2-8b", "idefics2", 8.0, 66,
                  ("transformers", "vllm", "openai"), 8192, "vLLM through cropper-engine's Idefics2 plugin"),
        ModelSpec("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", "idefics3", 8.5, 169,
                  ("transformers", "vllm", "openai"), 10240, "native in vLLM"),
        ModelSpec("smolvlm-instruct", "HuggingFaceTB/SmolVLM-Instruct", "idefics3", 2.2, 81,
                  ("transformers", "vllm", "openai"), 16384, "native in vLLM; small enough for 8 GB GPUs"),
        ModelSpec("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 8.3, 256,
                  ("transformers", "vllm", "openai"), 32768, "native in vLLM; tokens grow with image size"),
    )
}
DEFAULT_MODEL = next(m for m in MODELS.values() if m.default)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The local snapshot folder of a hub repo in the HF cache, if its config is there."""
    repo = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        cand = snaps / ref.read_text().strip()
        if (cand / "config.json").exists():
            return cand
    for cand in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (cand / "config.json").exists():
            return cand
    return None


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder with config.json and weights
    spec: ModelSpec | None
    label: str  # what the user named


def how_to_get(hub_id: str) -> str:
    return (f"get the weights on a machine with internet: `huggingface-cli download {hub_id}` "
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
        spec = next((m for m in MODELS.values() if m.name in p.name.lower()), None)
        return ResolvedModel(p, spec, name)
    if looks_like_path(name):
        raise ModelNotFoundError(
            f"no such model folder: {name}; pass --vlm an existing folder with config.json and weights, "
            f"a hub id (owner/name) in the local Hugging Face cache, or one of: {', '.join(MODELS)}")
    spec = MODELS.get(name.lower())
    hub_id = spec.hub_id if spec else name
    if spec is None and "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a folder, not a hub id, not one of: {', '.join(MODELS)}")
    snap = cached_snapshot(hub_id)
    if snap is None or not has_weights(snap):
        raise ModelNotFoundError(f"{hub_id} is not in the local Hugging Face cache ({hf_cache_dir()}); "
                                 + how_to_get(hub_id))
    if spec is None:
        spec = next((m for m in MODELS.values() if m.hub_id.lower() == hub_id.lower()), None)
    return ResolvedModel(snap, spec, name)


def list_models() -> list[dict[str, object]]:
    rows = []
    for m in MODELS.values():
        snap = cached_snapshot(m.hub_id)
        rows.append({
            "name": m.name, "hub_id": m.hub_id, "family": m.family, "params_b": m.params_b,
            "image_tokens": m.image_tokens, "backends": list(m.backends), "default": m.default,
            "local": bool(snap and has_weights(snap)), "path": str(snap) if snap else None,
            "notes": m.notes,
        })
    return rows


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
