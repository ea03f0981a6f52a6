"""What the openai backend can learn of the served model on this machine, before it asks the server:
the name to send (`_served_name`), the model's processor when its files are here (`_local_processor`),
else its family's processor settings and BOS from the registry (`_settings_without_files`); and the
served model's entry in the server's `/models` answer (`_model_entry`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _model_entry(data: Any, name: str) -> dict[str, Any] | None:
    """The `/models` entry of the served model `name` (the first one when unnamed; None if not listed)."""
    try:
        entries = [e for e in data["data"] if isinstance(e, dict)]
    except (KeyError, TypeError):
        return None
    if not name:
        return entries[0] if entries else None
    return next((e for e in entries if str(e.get("id")) == name), None)


def _settings_without_files(model: str) -> tuple[dict[str, Any] | None, str, bool | None]:
    """The engine's processor settings for `vlm.model` when its processor is not here, where they come
    from, and whether the server should add the BOS (the chat template's choice, from the registry's
    property sheets): a registry name or hub id gives its family's; a model folder (no loadable
    processor) its config.json's family; anything else None (the server's /models entry is asked)."""
    from cropper_engine.models.registry import MODELS, family_of, processor_settings, template_writes_bos

    def add_bos(name: str) -> bool | None:
        writes = template_writes_bos(name)
        return None if writes is None else not writes

    name = (model or "").strip()
    spec = MODELS.get(name.lower()) or next((m for m in MODELS.values() if m.hub_id.lower() == name.lower()), None)
    if name and spec is not None:
        return (spec.processor_settings, f"cropper-engine's {spec.family} settings for {spec.name} (the registry)",
                add_bos(spec.name))
    p = Path(name).expanduser() if name else None
    if p is not None and (p / "config.json").is_file():
        from cropper_engine.models.vlm_vllm import _settings_without_processor

        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
        family = family_of(model_type)
        return (_settings_without_processor(p, processor_settings(family)) or {},
                f"cropper-engine's {family} settings for {p}'s model_type {model_type!r}" if family
                else f"{p}'s model_type {model_type!r} is no family cropper-engine knows",
                add_bos(family) if family else None)
    return None, "", None


def _local_processor(model: str) -> tuple[Any, Any] | None:
    """(the HF processor at the engine's settings, the registry spec) when the model's files are
    on this machine: a folder, or a registry name / hub id in the HF cache; else None."""
    from cropper_engine.models.registry import MODELS, cached_snapshot, load_processor

    name = (model or "").strip()
    spec = MODELS.get(name.lower()) or next((m for m in MODELS.values() if m.hub_id.lower() == name.lower()), None)
    p = Path(name).expanduser() if name else None
    if p is not None and p.is_dir() and (p / "config.json").is_file():
        path = p
        spec = spec or next((m for m in MODELS.values() if m.name in p.name.lower()), None)
    elif spec is not None:
        path = cached_snapshot(spec.hub_id, spec.revision)
    else:
        path = cached_snapshot(name) if "/" in name else None
    if path is None:
        return None
    try:
        processor, _ = load_processor(path, spec.processor_settings if spec else None)
    except Exception as exc:  # transformers missing, a partial snapshot: the client works without it
        log.info("no local processor for %s (%s): the token budget is not checked", name, exc)
        return None
    return processor, spec


def _served_name(model: str) -> tuple[str, int | None]:
    """vlm.model -> the name to send (and the longest image edge, when the folder is here).

    auto / none / "": ask the server; a registry name: its hub id (what `vllm serve ID` serves);
    a local folder or anything else: as given (vLLM serves a folder under its path).
    """
    from cropper_engine.models.registry import MODELS

    name = (model or "").strip()
    if name.lower() in ("", "auto", "none", "off"):
        return "", None
    if name in MODELS:
        return MODELS[name].hub_id, None
    p = Path(name).expanduser()
    if p.is_dir():
        from cropper_engine.models.vlm_vllm import _processor_edge

        return name, _processor_edge(p)
    return name, None
