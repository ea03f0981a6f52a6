"""open_clip image embedders that only ever read local files: a pretrained tag found in the
local caches (the Hugging Face hub cache, open_clip's URL cache), a checkpoint file, or a
folder in open_clip's hub layout. Nothing is downloaded; missing weights raise
ModelNotFoundError with the command that fetches them. torch and open_clip are imported
inside the functions that use them (the "auto" embedder checks the caches without torch).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import BackendUnavailableError, InputError, ModelNotFoundError
from cropper_engine.models.base import l2_normalise
from cropper_engine.models.hub_cache import (
    _canonical_json,
    _fingerprint,
    file_sha256,
    find_in_hf_cache,
    hf_hub_cache_dir,
)
from cropper_engine.models.torch_utils import _as_pil, _prepare_pixels, _torch_dtype, hub_offline, resolve_device

# The retrieval model of the paper; "auto" uses it when its weights are cached here.
DEFAULT_OPENCLIP_MODEL = "ViT-B-32"
DEFAULT_OPENCLIP_TAG = "openai"
# open_clip's pretrained table for ViT-B-32/openai, copied so "auto" can look without importing torch.
_VIT_B_32_OPENAI_HF = "timm/vit_base_patch32_clip_224.openai"
_VIT_B_32_OPENAI_URL_FILE = "ViT-B-32.pt"

_OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_RESIZE_NAMES = {
    "shortest": "shortest-side+center-crop",
    "longest": "longest-side+pad",
    "squash": "squash",
}


def openclip_url_cache_dir() -> Path:
    """Where open_clip keeps weights fetched from plain URLs (the OpenAI .pt files)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def find_openclip_tag_weights(
    hf_hub: str, url: str = "", cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """Local weights for an open_clip pretrained-table entry (`hf_hub` "org/repo/[file]", `url`)."""
    if hf_hub:
        # open_clip writes "org/repo/" (default file) or "org/repo/file.bin".
        repo_id, filename = (hf_hub, "") if hf_hub.count("/") == 1 else os.path.split(hf_hub)
        names = [filename] if filename else []
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        names += [n for n in _OPENCLIP_WEIGHT_FILES if n not in names]
        found = find_in_hf_cache(repo_id, names, cache_dir=cache_dir)
        if found is not None:
            return found
    if url:
        dirs = [Path(cache_dir)] if cache_dir is not None else []
        for d in [*dirs, openclip_url_cache_dir()]:
            if (d / os.path.basename(url)).is_file():
                return d / os.path.basename(url)
    return None


def default_openclip_weights() -> Path | None:
    """ViT-B-32 / openai weights if they are in a local cache (no torch import)."""
    return find_openclip_tag_weights(_VIT_B_32_OPENAI_HF + "/", _VIT_B_32_OPENAI_URL_FILE)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:  # not installed, or a CUDA-linked torchvision on a CPU torch
        raise BackendUnavailableError(
            f"open_clip cannot be imported here ({exc}); install it with "
            "`pip install 'cropper-engine[clip]'` (needs torchvision), or use --embedder classical"
        ) from None
    return open_clip


def _missing_tag_message(model_name: str, tag: str, hf_hub: str, url: str) -> str:
    repo = hf_hub.rstrip("/")
    how = []
    if repo:
        how.append(f"run `huggingface-cli download {repo}` on a machine with internet and copy its "
                   f"cache ({hf_hub_cache_dir()}) here")
    elif url:
        how.append(f"download {url} into {openclip_url_cache_dir()}")
    how.append(f"or pass a local checkpoint file with --embedder open_clip:{model_name}:/path/to/file")
    return (f"open_clip weights {model_name}/{tag} are not on this machine (no downloads here): "
            + ", ".join(how))


class OpenClipEmbedder:
    """An open_clip model as a TensorEmbedder.

    `pretrained` is an open_clip tag (resolved from local caches only), a local checkpoint
    file, or None (random weights: an id unique to this instance). `config_dir` registers
    extra model configs (open_clip.add_model_config) before the model is built.
    """

    kind = "open_clip"

    def __init__(
        self,
        model_name: str = DEFAULT_OPENCLIP_MODEL,
        pretrained: str | os.PathLike[str] | None = DEFAULT_OPENCLIP_TAG,
        device: str = "auto",
        dtype: str = "auto",
        config_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        *,
        _local_dir: Path | None = None,
    ) -> None:
        open_clip = _import_open_clip()
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        create_kwargs: dict[str, Any] = {}

        if _local_dir is not None:
            name_arg, self.id = f"local-dir:{_local_dir}", _dir_id(_local_dir)
        else:
            name_arg = model_name
            pre = self.pretrained
            if config_dir is not None:
                open_clip.add_model_config(Path(config_dir))
            if model_name not in open_clip.list_models():
                # A custom config saved beside the checkpoint as MODEL.json.
                is_file = pre is not None and Path(pre).expanduser().is_file()
                sibling = Path(pre).expanduser().parent / f"{model_name}.json" if is_file else None
                if sibling is not None and sibling.is_file():
                    open_clip.add_model_config(sibling)
                else:
                    import difflib

                    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=8, cutoff=0.5)
                    raise InputError(
                        f"unknown open_clip model {model_name!r}; close names: {', '.join(close) or 'none'} "
                        "(open_clip.list_models() lists all; a custom config: pass its JSON folder)"
                    )
            if pre is None:
                self.id = f"open_clip:{model_name}:random@{secrets.token_hex(6)}"
            elif Path(pre).expanduser().is_file():
                path = Path(pre).expanduser().resolve()
                create_kwargs["pretrained"] = str(path)
                self.id = f"open_clip:{model_name}:file:{path.name}@{file_sha256(path)[:12]}"
            else:
                cfg = open_clip.get_pretrained_cfg(model_name, pre)
                if not cfg:
                    if os.sep in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors")):
                        raise ModelNotFoundError(f"checkpoint file {pre} does not exist")
                    tags = open_clip.list_pretrained_tags_by_model(model_name)
                    raise InputError(
                        f"unknown pretrained tag {pre!r} for open_clip {model_name}; "
                        f"choose one of: {', '.join(tags) or '(none: pass a checkpoint file)'}"
                    )
                weights = cfg.get("file") or find_openclip_tag_weights(
                    cfg.get("hf_hub", ""), cfg.get("url", ""), cache_dir=cache_dir
                )
                if not weights:
                    raise ModelNotFoundError(
                        _missing_tag_message(model_name, pre, cfg.get("hf_hub", ""), cfg.get("url", ""))
                    )
                # What open_clip does for a tag, with the file we found: QuickGELU and preprocessing.
                create_kwargs["pretrained"] = str(weights)
                create_kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
                create_kwargs.update(
                    {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
                )
                self.id = f"open_clip:{model_name}:{pre}"

        import torch

        self._torch_dtype = _torch_dtype(dtype, self.device)
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self._torch_dtype]
        try:
            with hub_offline():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name_arg, precision=precision, device=self.device, **create_kwargs
                )
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise ModelNotFoundError(f"cannot load open_clip {name_arg} ({self.pretrained}): {exc}") from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self._name_arg = name_arg
        self._tokenizer: Any = None

        pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = pcfg.get("size", getattr(model.visual, "image_size", 224))
        size = size if isinstance(size, int) else size[0]
        self.input_size = int(size)
        self.mean = tuple(float(v) for v in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in pcfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.interpolation = str(pcfg.get("interpolation", "bicubic"))
        self.resize_mode = str(pcfg.get("resize_mode", "shortest"))
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        dim = getattr(model.visual, "output_dim", None)
        if dim is None:
            with torch.inference_mode():
                zeros = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)
                dim = model.encode_image(zeros.to(self._torch_dtype)).shape[-1]
        self.dim = int(dim)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64) -> OpenClipEmbedder:
        """A folder in open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors/.bin."""
        d = Path(path).expanduser().resolve()
        if not (d / "open_clip_config.json").is_file():
            raise ModelNotFoundError(
                f"{d} is not an open_clip model folder: it needs open_clip_config.json and "
                f"{' or '.join(_OPENCLIP_WEIGHT_FILES)}"
            )
        if _dir_weights(d) is None:
            raise ModelNotFoundError(f"no weights in {d}: expected {' or '.join(_OPENCLIP_WEIGHT_FILES)}")
        return cls(model_name=d.name, pretrained=None, device=device, dtype=dtype,
                   batch_size=batch_size, _local_dir=d)

    def encode_pixels(self, pixels: Any) -> Any:
        """torch float [N, 3, S, S] in 0..1 -> torch float32 [N, dim] unit rows (on self.device)."""
        import torch
        import torch.nn.functional as F

        x = _prepare_pixels(pixels, self.input_size, self._mean_t, self._std_t, self.device, self._torch_dtype)
        if not len(x):
            return torch.zeros(0, self.dim, device=self.device)
        with torch.inference_mode():
            feats = torch.cat([self.model.encode_image(x[i:i + self.batch_size])
                               for i in range(0, len(x), self.batch_size)])
            return F.normalize(feats.float(), dim=-1)

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images -> float32 [N, dim] unit rows, with the model's own preprocessing."""
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            x = torch.stack([self.preprocess(_as_pil(im)) for im in chunk])
            x = x.to(device=self.device, dtype=self._torch_dtype)
            with torch.inference_mode():
                feats = self.model.encode_image(x)
            out[i:i + len(chunk)] = feats.float().cpu().numpy()
        return l2_normalise(out)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [N, dim] unit rows (the tokenizer works offline)."""
        import torch

        open_clip = _import_open_clip()
        if self._tokenizer is None:
            try:
                with hub_offline():
                    self._tokenizer = open_clip.get_tokenizer(self._name_arg)
            except Exception as exc:  # HF tokenizers missing from the cache fail in many ways
                raise ModelNotFoundError(f"no local tokenizer for {self.id} ({exc})") from None
        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_text(tokens)
        return l2_normalise(feats.float().cpu().numpy())

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dim": self.dim,
            "kind": self.kind,
            "model": self.model_name,
            "pretrained": self.pretrained,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": _RESIZE_NAMES.get(self.resize_mode, self.resize_mode),
        }


def _dir_weights(d: Path) -> Path | None:
    for name in (*_OPENCLIP_WEIGHT_FILES, "open_clip_pytorch_model.safetensors"):
        if (d / name).is_file():
            return d / name
    return None


def _dir_id(d: Path) -> str:
    weights = _dir_weights(d)
    assert weights is not None
    fp = _fingerprint([_canonical_json(d / "open_clip_config.json"), file_sha256(weights)])
    return f"open_clip-dir:{d.name}@{fp}"

