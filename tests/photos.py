"""Test data the real-model tests share (imported as `from photos import ...`, as `needs` is)."""

from __future__ import annotations

from pathlib import Path


def photo_examples(folder: Path, n: int = 36, seed: int = 0) -> list:
    """`n` photo-sized JPEGs (1024 px wide, random colour fields: tokens per image grow with
    pixels, as Qwen's do) written to `folder`, each an Example with 5 ground-truth crops and MOS:
    the S=30 T=5 index of the real-model tests (transformers and vLLM)."""
    import numpy as np
    from PIL import Image

    from cropper_engine.data.example import Example
    from cropper_engine.types import Box

    rng = np.random.default_rng(seed)
    examples = []
    for k in range(n):
        w, h = 1024, int(rng.integers(560, 800))
        path = folder / f"p{k:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR).save(path)
        crops = []
        for _ in range(5):
            x1, y1 = rng.uniform(0, 0.3) * w, rng.uniform(0, 0.3) * h
            crops.append(Box(x1, y1, x1 + rng.uniform(0.5, 0.7) * w, y1 + rng.uniform(0.5, 0.7) * h))
        examples.append(Example(path.name, str(path), w, h, crops, sorted(rng.uniform(2, 5, 5).tolist(), reverse=True)))
    return examples
