"""CLIP image embedders (open_clip and transformers) that only ever read local files.

Weights come from a local file or folder, or from a hub cache already on this machine (the
Hugging Face cache, open_clip's URL cache): nothing is downloaded. Missing weights raise
ModelNotFoundError at once, with the command that fetches them on a machine with internet.

torch, open_clip and transformers are imported inside the functions that use them: importing
this module is cheap (the "auto" embedder checks the caches without torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import BackendUnavailableError, InputError, ModelNotFoundError
from cropper_engine.models.base import l2_normalise

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


# --- local caches and fingerprints ----------------------------------------------------------


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (models/hub_cache.py)."""
    from cropper_engine.models.hub_cache import hub_cache_dir

    return hub_cache_dir()


def openclip_url_cache_dir() -> Path:
    """Where open_clip keeps weights fetched from plain URLs (the OpenAI .pt files)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def find_in_hf_cache(
    repo_id: str, filenames: Sequence[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The first of `filenames` present in the local hub cache for `repo_id`, or None.

    Reads the cache layout directly (models--org--name/{refs,snapshots}): no network, no
    huggingface_hub import. The snapshot named by refs/main is preferred, then any other.
    """
    from cropper_engine.models.hub_cache import find_file

    return find_file(repo_id, tuple(filenames), cache_dir)


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


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime).

    A file in the hub cache is a link to blobs/<sha256 of its bytes> (for LFS files): that name
    is the same digest, so it is taken without reading the file.
    """
    p = Path(path)
    real = p.resolve()
    name = real.name
    if real.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _canonical_json(path: Path, drop: Sequence[str] = ()) -> bytes:
    """A JSON file's content with keys sorted and volatile keys (versions, paths) left out."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _fingerprint(parts: Sequence[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


# --- torch helpers --------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: auto, fp32, fp16, bf16")
    return names[dtype]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub offline mode while loading (a guard: we only pass local paths anyway)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    constants: Any = None
    old = None
    try:
        import huggingface_hub.constants as constants

        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _as_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if hasattr(image, "working"):  # cropper_engine.imageio.LoadedImage: its decode (reduced for a large JPEG)
        return image.working
    if isinstance(image, np.ndarray):
        from cropper_engine.imageio import open_image

        return open_image(image).image
    raise InputError(f"cannot embed a {type(image).__name__}; pass PIL images")


def _prepare_pixels(pixels: Any, size: int, mean: Any, std: Any, device: str, dtype: Any) -> Any:
    """[N,3,H,W] 0..1 -> normalised [N,3,size,size] on device (resized bilinearly if needed)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(pixels)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"pixels must be a [N, 3, {size}, {size}] tensor, got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - mean) / std
    return x.to(dtype)


# --- open_clip ------------------------------------------------------------------------------


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


# --- transformers CLIP ----------------------------------------------------------------------


_HF_VOLATILE = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                "image_processor_type", "processor_class")


def _hf_weight_files(d: Path) -> list[Path]:
    st = sorted(d.glob("*.safetensors"))
    return st or sorted(d.glob("pytorch_model*.bin"))


def _resolve_hf_dir(model_id_or_dir: str, cache_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """A local folder (itself, or the cached snapshot of a hub id) and a short name for the id."""
    p = Path(model_id_or_dir).expanduser()
    if p.is_dir():
        return p.resolve(), p.resolve().name
    looks_like_path = model_id_or_dir.startswith((".", "/", "~")) or model_id_or_dir.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"no model folder at {model_id_or_dir}")
    found = find_in_hf_cache(model_id_or_dir, ["config.json"], cache_dir=cache_dir)
    if found is None or not _hf_weight_files(found.parent):
        raise ModelNotFoundError(
            f"transformers CLIP {model_id_or_dir!r} is not in the local hub cache ({hf_hub_cache_dir()}) "
            f"and nothing is downloaded here: run `huggingface-cli download {model_id_or_dir}` on a "
            f"machine with internet and copy the cache here, or pass a local folder with "
            f"--embedder hf-clip:/path/to/folder (config.json, model.safetensors, preprocessor_config.json)"
        )
    return found.parent, model_id_or_dir


class HFClipEmbedder:
    """A transformers CLIPModel / CLIPVisionModelWithProjection as a TensorEmbedder.

    Preprocessing is CLIPImageProcessorPil (the Pillow backend: no torchvision needed).
    """

    kind = "hf-clip"

    def __init__(
        self,
        model_id_or_dir: str | os.PathLike[str],
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
    ) -> None:
        try:
            import torch
            from transformers import CLIPModel, CLIPVisionModelWithProjection
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        except ImportError as exc:
            raise BackendUnavailableError(f"transformers CLIP cannot be imported here ({exc})") from None

        d, short = _resolve_hf_dir(str(model_id_or_dir), cache_dir)
        self.path = d
        self.device = resolve_device(device)
        self.batch_size = batch_size
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        model_type = config.get("model_type")
        classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
        if model_type not in classes:
            raise InputError(f"{d}: model_type {model_type!r} is not CLIP; hf-clip reads: {', '.join(classes)}")
        weights = _hf_weight_files(d)
        if not weights:
            raise ModelNotFoundError(f"no weights (*.safetensors or pytorch_model*.bin) in {d}")

        parts: list[bytes | str] = [_canonical_json(d / "config.json", _HF_VOLATILE)]
        pre_cfg = d / "preprocessor_config.json"
        if pre_cfg.is_file():
            parts.append(_canonical_json(pre_cfg, _HF_VOLATILE))
        parts += [f"{w.name}:{file_sha256(w)}" for w in weights]
        self.id = f"hf-clip:{short}@{_fingerprint(parts)}"

        self._torch_dtype = _torch_dtype(dtype, self.device)
        with hub_offline():
            self.model = classes[model_type].from_pretrained(
                str(d), local_files_only=True, dtype=self._torch_dtype
            ).to(self.device).eval()
            if pre_cfg.is_file():
                self.processor = CLIPImageProcessorPil.from_pretrained(str(d), local_files_only=True)
            else:
                vcfg = config.get("vision_config", config)
                s = int(vcfg.get("image_size", 224))
                self.processor = CLIPImageProcessorPil(size={"shortest_edge": s},
                                                       crop_size={"height": s, "width": s})
        proc = self.processor
        self.input_size = int(proc.crop_size["height"] if proc.do_center_crop else
                              proc.size.get("shortest_edge", proc.size.get("height")))
        self.mean = tuple(float(v) for v in proc.image_mean)
        self.std = tuple(float(v) for v in proc.image_std)
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(self.model.config.projection_dim)
        self._model_type = model_type
        self._tokenizer: Any = None

    def _image_features(self, x: Any) -> Any:
        if self._model_type == "clip":
            out = self.model.get_image_features(pixel_values=x)
            return out if hasattr(out, "shape") else out.pooler_output
        return self.model(pixel_values=x).image_embeds

    def encode_pixels(self, pixels: Any) -> Any:
        """torch float [N, 3, S, S] in 0..1 -> torch float32 [N, dim] unit rows (on self.device)."""
        import torch
        import torch.nn.functional as F

        x = _prepare_pixels(pixels, self.input_size, self._mean_t, self._std_t, self.device, self._torch_dtype)
        if not len(x):
            return torch.zeros(0, self.dim, device=self.device)
        with torch.inference_mode():
            feats = torch.cat([self._image_features(x[i:i + self.batch_size])
                               for i in range(0, len(x), self.batch_size)])
            return F.normalize(feats.float(), dim=-1)

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images -> float32 [N, dim] unit rows, with the model's own image processor."""
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), self.batch_size):
            chunk = [_as_pil(im) for im in images[i:i + self.batch_size]]
            x = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            x = x.to(device=self.device, dtype=self._torch_dtype)
            with torch.inference_mode():
                feats = self._image_features(x)
            out[i:i + len(chunk)] = feats.float().cpu().numpy()
        return l2_normalise(out)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [N, dim] unit rows; needs a tokenizer in the model folder."""
        import torch

        if self._model_type != "clip":
            raise InputError(f"{self.id} is a vision-only model: it has no text tower")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with hub_offline():
                    self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(f"no tokenizer in {self.path} ({exc})") from None
        tokens = self._tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        with torch.inference_mode():
            out = self.model.get_text_features(**tokens)
            feats = out if hasattr(out, "shape") else out.pooler_output
        return l2_normalise(feats.float().cpu().numpy())

    def describe(self) -> dict[str, Any]:
        proc = self.processor
        return {
            "id": self.id,
            "dim": self.dim,
            "kind": self.kind,
            "model": str(self.path),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bicubic" if int(proc.resample) == 3 else str(proc.resample),
            "resize": "shortest-side+center-crop" if proc.do_center_crop else "shortest-side",
        }


__all__ = [
    "HFClipEmbedder",
    "OpenClipEmbedder",
    "default_openclip_weights",
    "file_sha256",
    "find_in_hf_cache",
    "find_openclip_tag_weights",
    "hf_hub_cache_dir",
    "resolve_device",
]
