"""One typed configuration tree, the one home of defaults.

Precedence: defaults < config file (TOML) < environment (CROPPER_<SECTION>_<KEY>) < flags.
Every section is a frozen dataclass; `load_config` validates types and names the bad key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cropper_engine.errors import ConfigError

ENV_PREFIX = "CROPPER_"


@dataclass(frozen=True)
class RetrievalConfig:
    embedder: str = "auto"  # auto | classical | open_clip:MODEL[:TAG|:FILE] | hf-clip:ID|DIR
    examples: int = 30  # S: examples shown per query
    crops: int = 5  # T: ground-truth crops shown per example, every task, ordered by the task's G
    exact_below: int = 20_000  # exact (brute force) search for indexes smaller than this
    ef: int = 0  # hnswlib query-time ef; 0: the value the index was built with


@dataclass(frozen=True)
class VLMConfig:
    model: str = "auto"  # auto | none | a registry name | a hub id | a local folder
    backend: str = "auto"  # auto | transformers | vllm | openai
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    candidates: int = 6  # R
    rounds: int = 2  # L: refinement rounds after the first proposal
    temperature: float = 0.05
    top_p: float = 1.0
    constrained: bool = True  # force the answer to the box grammar
    parallel: bool = False  # false (the paper's): one answer lists R boxes, every round; true: R
    # one-box samples (n=R), which a trained model at a low temperature mostly makes alike
    max_new_tokens: int = 0  # 0: from the model's tokenizer and the box grammar; else tokens per box
    seed: int = 0
    batch_size: int = 8
    base_url: str = "http://127.0.0.1:8001/v1"  # for the openai backend
    api_key: str = ""
    timeout_s: float = 120.0
    template: str = ""  # a TOML file overriding the prompt templates
    # vLLM engine (backend vllm)
    max_model_len: int = 0  # 0: the model's trained context (registry), else its config
    gpu_memory_utilization: float = 0.9
    tensor_parallel: int = 1
    load_format: str = "auto"  # "dummy": random weights from config.json (timing without weights)
    enforce_eager: bool = False
    block_size: int = 0  # KV-cache block size; 0: vLLM's default for the device


@dataclass(frozen=True)
class TermWeights:
    """The weights of the paper's three scorer terms for one task (docs/vlm.md: the VLM loop)."""

    aesthetic: float = 1.0  # the aesthetic head on CLIP features (the paper: VILA)
    clip: float = 1.0  # content preservation: CLIP similarity of crop and image
    area: float = 1.0  # the crop's share of the image


def _free_weights() -> TermWeights:
    # the paper's free-form result (its Table 2) is its Table 5 row VILA + area, without CLIP
    return TermWeights(aesthetic=1.0, clip=0.0, area=1.0)


@dataclass(frozen=True)
class ScoringConfig:
    """The VLM loop's scorer: a weighted mean of the terms, with weights per task. Free-form:
    aesthetics + area (the paper's Table 5 row behind its Table 2); subject and ratio: the three
    terms its text names (aesthetics, CLIP content, area). A term whose model is missing (no
    CLIP weights, no aesthetic head) is replaced by the classical composition score
    (`classical`, a stand-in), which then takes its weight."""

    free: TermWeights = field(default_factory=_free_weights)
    subject: TermWeights = field(default_factory=TermWeights)
    ratio: TermWeights = field(default_factory=TermWeights)
    classical_weight: float = 1.0  # no-VLM default only: its fitted model's weight when CLIP re-ranks
    aesthetic_head: str = ""  # a LAION aesthetic predictor file (.pth / .safetensors)
    device: str = "auto"


@dataclass(frozen=True)
class LoopConfig:
    select_free: str = "final"  # final | best (the paper's Table 8 per task)
    select_subject: str = "final"
    select_ratio: str = "best"
    nms_iou: float = 0.9  # duplicate suppression among candidates
    min_side: float = 0.1  # candidates narrower or shorter than this share of the image are grown to it
    retries: int = 1  # extra VLM attempts before the non-VLM fallback
    keep_faces: str = "auto"  # auto: no crop cuts a face when a face detector is installed | on | off


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    max_upload_mb: float = 25.0
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    queue_size: int = 64
    request_timeout_s: float = 120.0  # queue + engine work of one request: 504 beyond
    header_timeout_s: float = 30.0  # a request's headers must arrive within this (else the connection is closed)
    body_timeout_s: float = 30.0  # and its body within this after the headers (else 408)
    send_timeout_s: float = 30.0  # a client must take its answer within this once it backs up (else dropped)
    max_pixels_in_flight: int = 120_000_000  # decoded pixels held by requests at once; beyond, a request waits
    decode_wait_s: float = 120.0  # the longest a request waits for that pixel budget (then 503, Retry-After)


@dataclass(frozen=True)
class Config:
    index: str = ""  # an example index directory; empty: the built-in table
    default_model: str = ""  # a model folder written by `cropper-engine fit`; empty: the shipped default
    max_pixels: int = 120_000_000
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a file/env/flag value to the field's declared type."""
    tp = annotation
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        tp = args[0]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config {where}: {value!r} is not a valid {tp.__name__}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(obj: Any, updates: Mapping[str, Any], where: str = "") -> Any:
    ftypes = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        k = key.replace("-", "_")
        if k not in ftypes:
            valid = ", ".join(sorted(ftypes))
            raise ConfigError(f"unknown config key {where}{key!r}; valid keys here: {valid}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config {where}{k} is a section; give it as a table")
            changes[k] = _merge(current, value, f"{where}{k}.")
        else:
            changes[k] = _coerce(value, ftypes[k], f"{where}{k}")
    return dataclasses.replace(obj, **changes)


def _env_updates(env: Mapping[str, str], base: Config) -> dict[str, Any]:
    """CROPPER_VLM_MODEL=... -> {"vlm": {"model": ...}}; CROPPER_INDEX=... -> {"index": ...}."""
    out: dict[str, Any] = {}
    sections = {f.name for f in dataclasses.fields(base) if dataclasses.is_dataclass(getattr(base, f.name))}
    top = {f.name for f in dataclasses.fields(base)} - sections
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest in top:
            out[rest] = value
            continue
        section, _, key = rest.partition("_")
        if section in sections and key:
            sub = getattr(base, section)
            names = {f.name for f in dataclasses.fields(sub)}
            if key in names and not dataclasses.is_dataclass(getattr(sub, key)):
                out.setdefault(section, {})[key] = value
                continue
            inner, _, leaf = key.partition("_")  # CROPPER_SCORING_FREE_CLIP -> scoring.free.clip
            if inner in names and dataclasses.is_dataclass(getattr(sub, inner)) and leaf in {
                    f.name for f in dataclasses.fields(getattr(sub, inner))}:
                out.setdefault(section, {}).setdefault(inner, {})[leaf] = value
    return out


def dotted_to_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"vlm.model": "x"} -> {"vlm": {"model": "x"}}; None values are skipped (flag not given)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_config(
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < `file` < `env` (os.environ by default) < `overrides`.

    `overrides` may be nested or dotted ({"vlm.model": "none"}).
    """
    cfg = Config()
    if file is None:
        file = (env if env is not None else os.environ).get("CROPPER_CONFIG") or None
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        cfg = _merge(cfg, data)
    cfg = _merge(cfg, _env_updates(os.environ if env is None else env, cfg))
    if overrides:
        flat = any("." in k for k in overrides)
        cfg = _merge(cfg, dotted_to_tree(overrides) if flat else dict(overrides))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def positive(name: str, v: float) -> None:
        if v <= 0:
            raise ConfigError(f"{name} must be positive, got {v}")

    positive("vlm.candidates", cfg.vlm.candidates)
    if cfg.vlm.max_new_tokens < 0:
        raise ConfigError(f"vlm.max_new_tokens must be 0 (from the model) or more, got {cfg.vlm.max_new_tokens}")
    positive("vlm.batch_size", cfg.vlm.batch_size)
    positive("max_pixels", cfg.max_pixels)
    if cfg.vlm.rounds < 0:
        raise ConfigError(f"vlm.rounds must be 0 or more, got {cfg.vlm.rounds}")
    positive("retrieval.crops", cfg.retrieval.crops)
    for task in ("free", "subject", "ratio"):
        w = getattr(cfg.scoring, task)
        for term in ("aesthetic", "clip", "area"):
            if getattr(w, term) < 0:
                raise ConfigError(f"scoring.{task}.{term} must be 0 or more, got {getattr(w, term)}")
        if w.aesthetic + w.clip + w.area <= 0:
            raise ConfigError(f"scoring.{task}: at least one of aesthetic, clip, area must be positive")
    if cfg.retrieval.examples < 0:
        raise ConfigError(f"retrieval.examples must be 0 or more, got {cfg.retrieval.examples}")
    for task in ("free", "subject", "ratio"):
        v = getattr(cfg.loop, f"select_{task}")
        if v not in ("final", "best"):
            raise ConfigError(f"loop.select_{task} must be 'final' or 'best', got {v!r}")
    if cfg.loop.keep_faces not in ("auto", "on", "off"):
        raise ConfigError(f"loop.keep_faces must be auto, on or off, got {cfg.loop.keep_faces!r}")
    if cfg.vlm.backend not in ("auto", "transformers", "vllm", "openai"):
        raise ConfigError(
            f"vlm.backend {cfg.vlm.backend!r} is not one of: auto, transformers, vllm, openai"
        )
    if not 0.0 <= cfg.vlm.temperature <= 5.0:
        raise ConfigError(f"vlm.temperature must be in 0..5, got {cfg.vlm.temperature}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
