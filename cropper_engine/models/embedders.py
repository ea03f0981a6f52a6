"""Embedders by spec string: "classical", "open_clip:...", "open_clip-dir:...", "hf-clip:...", "auto".

Importing this module is cheap: torch, open_clip and transformers load with the backend asked for.
"""

from __future__ import annotations

from typing import Any

from cropper_engine.errors import BackendUnavailableError, InputError, ModelNotFoundError
from cropper_engine.models.base import Embedder, Registry

EMBEDDERS = Registry("embedder")

SPEC_FORMS = (
    "classical",
    "open_clip:MODEL (tag 'openai')",
    "open_clip:MODEL:TAG",
    "open_clip:MODEL:/path/to/checkpoint",
    "open_clip-dir:/path/to/folder",
    "hf-clip:HUB_ID_OR_FOLDER",
    "auto",
)


def _need(rest: str, spec: str) -> str:
    if not rest:
        raise InputError(f"embedder spec {spec!r} is missing its argument; valid forms: {', '.join(SPEC_FORMS)}")
    return rest


@EMBEDDERS.register("classical", help="hand-crafted descriptor (saliency, gradients, colour); no weights")
def _classical(rest: str, device: str) -> Embedder:
    from cropper_engine.models.classical import ClassicalEmbedder

    if rest:
        raise InputError(f"'classical' takes no argument, got 'classical:{rest}'")
    return ClassicalEmbedder()


@EMBEDDERS.register("open_clip", help="open_clip:MODEL[:TAG or :/path/to/checkpoint]; local weights only")
def _open_clip(rest: str, device: str) -> Embedder:
    from cropper_engine.models.clip import DEFAULT_OPENCLIP_TAG, OpenClipEmbedder

    model, _, pretrained = _need(rest, "open_clip:").partition(":")
    return OpenClipEmbedder(model, pretrained or DEFAULT_OPENCLIP_TAG, device=device)


@EMBEDDERS.register("open_clip-dir", help="a folder with open_clip_config.json + open_clip_model.safetensors")
def _open_clip_dir(rest: str, device: str) -> Embedder:
    from cropper_engine.models.clip import OpenClipEmbedder

    return OpenClipEmbedder.from_dir(_need(rest, "open_clip-dir:"), device=device)


@EMBEDDERS.register("hf-clip", help="transformers CLIP from a folder or a hub id in the local cache")
def _hf_clip(rest: str, device: str) -> Embedder:
    from cropper_engine.models.clip import HFClipEmbedder

    return HFClipEmbedder(_need(rest, "hf-clip:"), device=device)


def _auto(device: str) -> tuple[Embedder, str]:
    from cropper_engine.models.classical import ClassicalEmbedder
    from cropper_engine.models.clip import (
        DEFAULT_OPENCLIP_MODEL,
        DEFAULT_OPENCLIP_TAG,
        default_openclip_weights,
    )

    weights = default_openclip_weights()
    if weights is None:
        return ClassicalEmbedder(), (
            f"auto: {DEFAULT_OPENCLIP_MODEL}/{DEFAULT_OPENCLIP_TAG} weights are not in the local caches, "
            "so the classical descriptor is used"
        )
    try:
        emb = _open_clip(f"{DEFAULT_OPENCLIP_MODEL}:{DEFAULT_OPENCLIP_TAG}", device)
    except (BackendUnavailableError, ModelNotFoundError) as exc:
        return ClassicalEmbedder(), f"auto: {weights} is cached but cannot be used ({exc}); using classical"
    return emb, f"auto: {DEFAULT_OPENCLIP_MODEL}/{DEFAULT_OPENCLIP_TAG} weights found at {weights}"


def resolve_embedder(spec: str, device: str = "auto") -> tuple[Embedder, str]:
    """Build the embedder a spec names; also say which one it is and why (for "auto")."""
    spec = (spec or "").strip()
    if spec == "auto":
        emb, why = _auto(device)
        emb.spec = "classical" if emb.id.startswith("classical") else (  # type: ignore[attr-defined]
            "open_clip:" + ":".join(emb.id.split(":")[1:3]))
        return emb, why
    scheme, _, rest = spec.partition(":")
    if scheme not in EMBEDDERS.factories or scheme == "auto":
        raise InputError(f"unknown embedder {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    emb = EMBEDDERS.get(scheme)(rest, device)
    emb.spec = spec  # type: ignore[attr-defined]  # how to build it again (index manifests keep it)
    return emb, f"{spec} asked for"


def load_embedder(spec: str, device: str = "auto") -> Embedder:
    """An Embedder from a spec string (see SPEC_FORMS); raises InputError for an unknown form."""
    return resolve_embedder(spec, device)[0]


def describe_specs() -> dict[str, Any]:
    """The registered schemes with one line of help each (for --help and error messages)."""
    return {name: EMBEDDERS.help.get(name, "") for name in EMBEDDERS.names()} | {
        "auto": "open_clip ViT-B-32/openai if its weights are cached here, else classical"
    }


__all__ = ["EMBEDDERS", "SPEC_FORMS", "describe_specs", "load_embedder", "resolve_embedder"]
