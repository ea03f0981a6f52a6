"""transformers CLIP image embedders (CLIPModel, CLIPVisionModelWithProjection) from a local
folder or a hub id already in the local hub cache; nothing is downloaded. torch and
transformers are imported when an embedder is made.
"""

from __future__ import annotations

import json
import os
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

