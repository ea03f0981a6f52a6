"""The engine at the real shape of Idefics2-8B / Mantis-8B-Idefics2, random bf16 weights, on a GPU.

    PYTHONPATH=. python bench/fullsize.py --out              # S=30 T=5 R=6 L=2 at batch 1 and 8
    PYTHONPATH=. python bench/fullsize.py --shape tiny --device cpu --batches 1,2 -S 4   # a CPU check

No weights are needed: the model is built from the published config's dimensions with random
weights straight on the device (bench/../cropper_engine/models/tiny_vlm.py SHAPES["8b"]: Mistral's
sliding window of 4096 on, as in the hub config), with a locally built 32,003-token tokenizer that
splits digits as Mistral's does. Everything else is the shipped configuration: max_new_tokens from
the tokenizer and the box grammar (no override), image splitting off, Mantis-8B-Idefics2's
context of 8192 for the token budget. The box grammar is enforced, so every round yields boxes
and all L rounds run. The examples are synthetic photos
(smooth colour fields with blobs, JPEG) with made-up ground-truth crops, retrieved by the
classical descriptor; the index is searched exactly in memory when hnswlib is not installed (the
lent GPU machine has no package registry). It prints, per batch size: p50 / p95 seconds per
image, images/s, the VLM's vision / prefill / decode seconds, and each against the cost model's
limit (bench/costmodel.py) for the device. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_photo(rng: np.random.Generator, w: int, h: int) -> Any:
    """A smooth colour field with a few soft blobs: photo-like statistics, no real content."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(40, 200) + rng.uniform(-60, 60) * xx / w + rng.uniform(-60, 60) * yy / h
    for _ in range(rng.integers(2, 5)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class MemoryIndex:
    """Exact cosine search over synthetic examples, for machines without hnswlib."""

    def __init__(self, vectors: np.ndarray, examples: list[Any]) -> None:
        self.vectors, self.examples = vectors, examples

    def __len__(self) -> int:
        return len(self.examples)

    def has_images(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"path": "memory", "count": len(self), "source": "synthetic"}

    def example(self, row: int) -> Any:
        return self.examples[row]

    def query(self, q: np.ndarray, k: int, exact: bool | None = None, exclude: Any = None) -> list[list[Any]]:
        from cropper_engine.index.store import Neighbour

        sims = np.asarray(q, np.float32).reshape(-1, self.vectors.shape[1]) @ self.vectors.T
        out = []
        for row in sims:
            order = np.argsort(-row)
            hits = [Neighbour(int(i), self.examples[i].id, float(row[i])) for i in order
                    if not exclude or self.examples[i].id not in exclude]
            out.append(hits[:k])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=["8b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--vlm-batch", type=int, default=0, help="prompts per VLM call [default: the batch]")
    ap.add_argument("-S", type=int, default=30)
    ap.add_argument("-T", type=int, default=5)
    ap.add_argument("-R", type=int, default=6)
    ap.add_argument("-L", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=96, help="synthetic examples in the index")
    ap.add_argument("--size", default="1024x683", help="query and example image size WxH")
    ap.add_argument("--out", action="store_true", help="also write bench/results/fullsize-*.json/.md")
    args = ap.parse_args()

    import torch

    from bench.common import peak_gpu_mb, peak_rss_mb, write_results
    from bench.costmodel import Shape, device_limits
    from cropper_engine.config import load_config
    from cropper_engine.data.example import Example
    from cropper_engine.engine.grammar import BoxGrammar
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.models.classical import ClassicalEmbedder
    from cropper_engine.models.registry import MODELS
    from cropper_engine.models.tiny_vlm import build_idefics2
    from cropper_engine.models.vlm_transformers import TransformersVLM
    from cropper_engine.types import Box, CropRequest, Task

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (see the README's performance section)")
    work = Path(tempfile.mkdtemp(prefix="fullsize-"))
    w, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model_dir, model = build_idefics2(work / "model", args.shape, save_weights=False, device=args.device,
                                      dtype=dtype)
    print(f"built {args.shape} with random weights on {args.device} in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)", file=sys.stderr)

    examples, photos = [], []
    for k in range(args.examples):
        p = work / f"ex{k}.jpg"
        synthetic_photo(rng, w, h).save(p, quality=90)
        x1, y1 = rng.uniform(0, 0.2) * w, rng.uniform(0, 0.2) * h
        crops = [Box(x1, y1, x1 + rng.uniform(0.6, 0.8) * w, y1 + rng.uniform(0.6, 0.8) * h) for _ in range(args.T)]
        examples.append(Example(p.name, str(p), w, h, crops, [round(4.5 - 0.3 * i, 2) for i in range(args.T)]))
        photos.append(p)
    emb = ClassicalEmbedder()
    vectors = emb.embed([str(p) for p in photos])
    try:
        from cropper_engine.index.store import ExampleIndex

        index: Any = ExampleIndex.from_vectors(vectors, examples, work / "index", embedder=emb)
    except ImportError:
        index = MemoryIndex(vectors, examples)
    max_batch = max(int(b) for b in args.batches.split(","))
    queries = []
    for k in range(max_batch):
        p = work / f"q{k}.jpg"
        synthetic_photo(rng, w, h).save(p, quality=90)
        queries.append(str(p))

    shape = Shape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    lim = device_limits()
    results = []
    mantis = MODELS["mantis-8b-idefics2"]  # its context (8192) and processor settings
    for b in (int(x) for x in args.batches.split(",")):
        cfg = load_config(env={}, overrides={
            "retrieval.examples": args.S, "retrieval.crops": args.T, "vlm.candidates": args.R,
            "vlm.rounds": args.L, "vlm.batch_size": args.vlm_batch or b,
            "loop.select_free": "best", "loop.keep_faces": "off"})  # the VLM's figures alone
        vlm = TransformersVLM(str(model_dir), device=args.device, batch_size=args.vlm_batch or b, preloaded=model,
                              spec=mantis)
        engine = Cropper.from_config(cfg, embedder=emb, index=index, vlm=vlm)
        n_boxes = 1 if cfg.vlm.parallel else args.R
        answer_limit = engine.answer_limit(BoxGrammar(n_boxes))
        need = vlm.memory_need()
        reqs = [CropRequest(q, Task.FREE, id=Path(q).name) for q in queries[:b]]
        engine.crop_batch(reqs)  # warm-up: kernels, allocator, caches
        engine.vlm_stage_times.clear()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        lat, prompt_tok, new_tok, gen_tok, pipelines = [], 0, 0, 0, {}
        notes: dict[str, int] = {}
        longest_prompt = 0
        vision_images = vlm.image_cache_misses
        for _ in range(args.repeats):
            t1 = time.perf_counter()
            outs = engine.crop_batch(reqs)
            dt = time.perf_counter() - t1
            lat += [dt] * b
            for out in outs:
                for r in out:
                    pipelines[r.pipeline] = pipelines.get(r.pipeline, 0) + 1
                    for note in r.notes:  # e.g. "S lowered", "cut at the token limit": counted
                        notes[note] = notes.get(note, 0) + 1
                    longest_prompt = max([longest_prompt] + [t["prompt"] for t in r.extra.get("tokens_by_round", [])])
                    t = r.extra.get("tokens", {})
                    prompt_tok += t.get("prompt", 0)
                    new_tok += t.get("prompt", 0) - t.get("cached", 0)
                    gen_tok += t.get("generated", 0)
        n = b * args.repeats
        vision_images = (vlm.image_cache_misses - vision_images) / n
        st = {k: v / n for k, v in engine.vlm_stage_times.items()}
        limits = {
            "vision": vision_images * shape.vision_flops(max(w, h)) / lim["flops"],
            "prefill": shape.prefill_flops(int(new_tok / n)) / lim["flops"],
            # each decode step gives one token to each of the R samples of the b prompts, reading the
            # weights once and every row's KV cache
            "decode": (gen_tok / n / args.R) * shape.decode_bytes(b * args.R, int(prompt_tok / n / (1 + args.L)))
            / b / lim["bandwidth"],
        }
        row = {
            "batch": b, "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p95_s": round(float(np.percentile(lat, 95)), 3),
            "images_per_s": round(b / statistics.median(lat[::b]), 3),
            "prompt_tokens_per_image": round(prompt_tok / n), "prefilled_tokens_per_image": round(new_tok / n),
            "generated_tokens_per_image": round(gen_tok / n, 1), "vision_images_per_image": round(vision_images, 2),
            "stage_s_per_image": {k: round(v, 4) for k, v in st.items()},
            "limit_s_per_image": {k: round(v, 4) for k, v in limits.items()},
            "fraction_of_limit": {k: round(limits[k] / st[k], 3) for k in limits if st.get(k)},
            "prefill_tflops": round(shape.prefill_flops(int(new_tok / n)) / st["prefill"] / 1e12, 1)
            if st.get("prefill") else None,
            "pipelines": pipelines, "peak_gpu_mb": peak_gpu_mb(),
            "max_new_tokens": answer_limit, "longest_prompt_tokens": longest_prompt,
            "context_length": vlm.context_length, "image_tokens": vlm.image_tokens,
            "sliding_window": vlm.window, "memory_need_gb": round(need.total, 1), "memory_need": need.describe(),
            "notes": notes,
        }
        results.append(row)
        print(f"batch {b:>3}: p50 {row['p50_s']:.2f} s/image  {row['images_per_s']:.2f} images/s  "
              f"vision {st.get('vision', 0):.3f}  prefill {st.get('prefill', 0):.3f} "
              f"({row['prefill_tflops']} TFLOP/s)  decode {st.get('decode', 0):.3f} s/image  "
              f"fraction of limit {row['fraction_of_limit']}", file=sys.stderr)
    import os

    figures = {"bench": "fullsize", "shape": args.shape, "device": lim["name"], "S": args.S, "T": args.T,
               "R": args.R, "L": args.L, "image_size": args.size, "results": results,
               "peak_rss_mb": round(peak_rss_mb(), 1), "load_average": list(os.getloadavg()),
               "targets": {"p50_single_s": 3.0, "prefill_fraction_of_bf16_peak": 0.4, "stage_within_2x": True}}
    if args.out:
        md = ("| batch | p50 s | images/s | vision s | prefill s | decode s | prefill TFLOP/s |\n"
              "|---|---|---|---|---|---|---|\n")
        md += "".join(f"| {r['batch']} | {r['p50_s']} | {r['images_per_s']} | {r['stage_s_per_image'].get('vision')} | "
                      f"{r['stage_s_per_image'].get('prefill')} | {r['stage_s_per_image'].get('decode')} | "
                      f"{r['prefill_tflops']} |\n" for r in results)
        write_results("fullsize", figures, md)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
