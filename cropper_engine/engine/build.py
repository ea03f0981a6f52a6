"""Turn a Config into the engine's parts (embedder, index, scorer, VLM) and say why each."""

from __future__ import annotations

import importlib.util
from typing import Any

from cropper_engine.config import Config
from cropper_engine.errors import BackendUnavailableError, ConfigError, ModelNotFoundError


def build_parts(cfg: Config, **given: Any) -> dict[str, Any]:
    reasons: dict[str, str] = dict(given.pop("reasons", {}) or {})
    index = given.get("index")
    embedder = given.get("embedder")
    fitted = given.get("default_model")
    if fitted is None and cfg.default_model:  # a model of `cropper-engine fit`: its ranker and its table
        from cropper_engine.models.fitted import load_fitted

        fitted = load_fitted(cfg.default_model)

    if index is None and cfg.index:
        from cropper_engine.index.store import ExampleIndex

        raw = ExampleIndex.load(cfg.index)
        if embedder is None:
            spec = cfg.retrieval.embedder
            if spec == "auto":
                spec = raw.embedder_spec() or spec
            embedder = _embedder(spec, reasons)
        index = ExampleIndex.load(cfg.index, embedder=embedder, ef=cfg.retrieval.ef or None,
                                  exact_below=cfg.retrieval.exact_below)
        reasons["index"] = f"{cfg.index} ({len(index)} examples)"
    if embedder is None:
        embedder = _embedder(cfg.retrieval.embedder, reasons)
    if index is None and fitted is not None and fitted.table is not None \
            and getattr(embedder, "id", None) == fitted.table.embedder_id:
        index = fitted.table
        reasons["index"] = f"the fitted model's table ({len(index)} examples, no images)"
    if index is None:
        from cropper_engine.index.builtin import builtin_index

        index = builtin_index(embedder)
        if index is not None:
            src = index.describe().get("source") or {}
            origin = f"{str(src.get('dataset', '')).upper()} {src.get('split', '')}".strip() or "a public set"
            reasons["index"] = f"built-in table ({len(index)} examples of {origin}, no images)"
        else:
            reasons["index"] = "none: no --index and no built-in table for this embedder"

    scorer = given.get("scorer")
    if scorer is None:
        scorer = _scorer(cfg, embedder, reasons)

    vlm = given["vlm"] if "vlm" in given else _vlm(cfg, reasons)
    if vlm is None:
        reasons.setdefault("pipeline", "no-vlm")
        from cropper_engine.models.default_model import default_model

        model = fitted if fitted is not None else default_model()
        if model is not None:  # the no-VLM default ranks its candidates with the fitted trees
            clip = " + CLIP / aesthetics re-rank of its shortlist" if getattr(scorer, "embedder", None) else ""
            reasons["scorer"] = f"{model.describe()}{clip}"
    return {"embedder": embedder, "index": index, "scorer": scorer, "vlm": vlm, "reasons": reasons,
            "default_model": fitted}


def _embedder(spec: str, reasons: dict[str, str]) -> Any:
    from cropper_engine.models.embedders import resolve_embedder

    emb, why = resolve_embedder(spec)
    reasons["embedder"] = f"{emb.id} ({why})"
    return emb


def _scorer(cfg: Config, embedder: Any, reasons: dict[str, str]) -> Any:
    from cropper_engine.models.scorers import AestheticHead, FusedScorer

    sc = cfg.scoring
    tensor = embedder if hasattr(embedder, "encode_pixels") else None
    head = None
    if sc.aesthetic_head:
        if tensor is None:
            raise ConfigError("scoring.aesthetic_head needs a CLIP embedder (--embedder open_clip:...)")
        head = AestheticHead(sc.aesthetic_head, device=getattr(tensor, "device", "cpu"))
        if head.dim != tensor.dim:
            raise ConfigError(f"the aesthetic head expects {head.dim}-d embeddings but {tensor.id} "
                              f"gives {tensor.dim}-d: use the head trained for this CLIP model")
    scorer = FusedScorer(tensor, head, task_weights={t: getattr(sc, t) for t in ("free", "subject", "ratio")},
                         classical_weight=sc.classical_weight)
    reasons["scorer"] = scorer.describe()  # names the composition stand-in where one is used
    return scorer


def _backends(resolved: Any) -> tuple[str, ...]:
    spec = getattr(resolved, "spec", None)
    return spec.backends if spec is not None else ("transformers", "vllm")


def backend_available(name: str) -> bool:
    if name == "vllm":
        return importlib.util.find_spec("vllm") is not None
    if name == "transformers":
        return importlib.util.find_spec("transformers") is not None
    return name == "openai"


def _vlm(cfg: Config, reasons: dict[str, str]) -> Any:
    from cropper_engine.models.registry import DEFAULT_MODEL, gpu_memory_gb, resolve_model

    name = cfg.vlm.model.strip()
    if name.lower() in ("none", "", "off"):
        reasons["pipeline"] = "no-vlm (--vlm none)"
        return None
    if cfg.vlm.backend == "openai":
        return load_vlm(cfg, None, reasons)
    if name.lower() == "auto":
        try:
            resolved = resolve_model(DEFAULT_MODEL.name)
        except ModelNotFoundError:
            reasons["pipeline"] = (f"no-vlm: {DEFAULT_MODEL.hub_id} is not in the local Hugging Face cache "
                                   f"(pass --vlm NAME|FOLDER to use another model)")
            return None
        have = gpu_memory_gb()
        if have <= 0:
            reasons["pipeline"] = (f"no-vlm: {DEFAULT_MODEL.name} is here but no GPU is; pass --vlm "
                                   f"{DEFAULT_MODEL.name} to run it anyway (slow on a CPU)")
            return None
        need = vlm_memory_need(cfg, resolved)
        if need.backend == "vllm":  # vLLM takes this share of the GPU and nothing more
            have = have * cfg.vlm.gpu_memory_utilization
        if have < need.total:
            reasons["pipeline"] = (f"no-vlm: {DEFAULT_MODEL.name} is here but needs a GPU with {need.describe()} "
                                   f"({have:.1f} GB free for {need.backend}); lower vlm.batch_size or pass --vlm "
                                   f"{DEFAULT_MODEL.name} to run it anyway")
            return None
        return load_vlm(cfg, resolved, reasons)
    return load_vlm(cfg, resolve_model(name), reasons)


def vlm_memory_need(cfg: Config, resolved: Any) -> Any:
    """The GPU memory a resolved model needs with this config (registry.memory_need): its
    parameters counted from its config.json, KV at the context prompts may fill, the backend
    `auto` would pick."""
    from transformers import AutoConfig

    from cropper_engine.models.registry import context_length, family_of, memory_need, processor_settings

    config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    spec = resolved.spec
    context = cfg.vlm.max_model_len or context_length(spec, config) or 8192
    backend = cfg.vlm.backend
    if backend == "auto":
        backend = "vllm" if backend_available("vllm") and "vllm" in _backends(resolved) else "transformers"
    settings = spec.processor_settings if spec is not None else processor_settings(family_of(config.model_type))
    return memory_need(config, context, cfg.vlm.batch_size, backend, settings)


def load_vlm(cfg: Config, resolved: Any, reasons: dict[str, str]) -> Any:
    backend = cfg.vlm.backend
    if backend == "auto":
        if backend_available("vllm") and "vllm" in _backends(resolved):
            try:
                from cropper_engine.models.vlm_vllm import VLLMBackend

                vlm = VLLMBackend.from_config(cfg, resolved)
                reasons["pipeline"] = f"vlm: {vlm.id} on vllm (auto: vLLM is installed)"
                return vlm
            except Exception as exc:
                reasons["backend"] = f"vLLM could not start ({type(exc).__name__}: {exc}); using transformers"
        backend = "transformers"
    if backend == "transformers":
        from cropper_engine.models.vlm_transformers import TransformersVLM

        vlm = TransformersVLM(str(resolved.path), device=cfg.vlm.device, dtype=cfg.vlm.dtype,
                              batch_size=cfg.vlm.batch_size, spec=resolved.spec,
                              context_length=cfg.vlm.max_model_len or None)
    elif backend == "vllm":
        if not backend_available("vllm"):
            raise BackendUnavailableError("the vllm backend needs vLLM: pip install 'cropper-engine[vllm]' "
                                          "(or use --backend transformers)")
        from cropper_engine.models.vlm_vllm import VLLMBackend

        vlm = VLLMBackend.from_config(cfg, resolved)
    elif backend == "openai":
        from cropper_engine.models.vlm_openai import OpenAIBackend

        vlm = OpenAIBackend.from_config(cfg)
    else:  # validated by config, kept for safety
        raise ConfigError(f"unknown backend {backend!r}")
    reasons["pipeline"] = f"vlm: {vlm.id} on {backend}"
    return vlm
