"""The engine at the real shape of Idefics2-8B / Mantis-8B-Idefics2, random bf16 weights, on a GPU;
`make gpu-run` runs it on the lent GPU machine, `make gpu-rehearsal` runs it here first.

    PYTHONPATH=. python bench/fullsize.py --json OUT.json                 # the GPU run (bench/gpu_run.sh)
    PYTHONPATH=. python bench/fullsize.py --shape like --device cpu --json OUT.json --strict   # rehearsal

No weights are needed. `--shape 8b` builds the model from the published config's dimensions with
random weights straight on the device (cropper_engine/models/tiny_vlm.py SHAPES["8b"]: Mistral's
sliding window of 4096 on, as in the hub config) with a locally built 32,003-token tokenizer that
splits digits as Mistral's does. `--shape like` is the `--like mantis-8b-idefics2` tiny (Mantis's
tokenizer behaviour, 64 latents an image, the window of 4096, the context of 8192; sizes shrunk):
the same code path at a size a CPU runs in seconds. Everything else is the shipped configuration:
max_new_tokens from the tokenizer and the box grammar, image splitting off, Mantis's context of
8192 for the token budget; the box grammar is enforced, so every round yields boxes and all L
rounds run. The examples are synthetic photos (smooth colour fields with blobs, JPEG) with made-up
ground-truth crops, retrieved by the classical descriptor; the index is searched exactly in
memory when hnswlib is not installed (the lent GPU machine has no package registry).

It runs every mode (`list`: R boxes in one answer, the default; `parallel`: R one-box samples) at
every batch size, and writes the JSON after each: p50 / p95 seconds per image, images/s, the
VLM's vision / prefill / decode seconds each against the cost model's limit for the device
(bench/costmodel.py), the peak memory against the engine's estimate (registry.memory_need, at the
full context and at the longest prompt), the sampling path (a fall back from grouped sampling is
named), the rows' pipelines and notes. A configuration that would start after `--budget-s` is
skipped and says so. With `--strict` it exits 1 unless every configuration ran with every stage
timed, every row `vlm` and no fallback. The last line printed is the JSON's path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("vision", "prefill", "decode")


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
    """Exact cosine search over synthetic examples, for machines without hnswlib; `query` takes
    what ExampleIndex.query takes (`exclude`: an id, ids, or a predicate on rows)."""

    def __init__(self, vectors: np.ndarray, examples: list[Any]) -> None:
        self.vectors, self.examples = vectors, examples

    def __len__(self) -> int:
        return len(self.examples)

    def has_images(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"path": "memory", "count": len(self), "source": "synthetic", "search": "exact (no hnswlib)"}

    def example(self, row: int) -> Any:
        return self.examples[row]

    def query(self, q: np.ndarray, k: int, exact: bool | None = None, exclude: Any = None) -> list[list[Any]]:
        from cropper_engine.index.store import Neighbour

        if isinstance(exclude, str):
            exclude = {exclude}
        if callable(exclude):
            left_out = exclude
        else:
            ids = set(exclude or ())
            left_out = (lambda i: self.examples[i].id in ids) if ids else (lambda i: False)
        sims = np.asarray(q, np.float32).reshape(-1, self.vectors.shape[1]) @ self.vectors.T
        out = []
        for row in sims:
            hits = [Neighbour(int(i), self.examples[i].id, float(row[i])) for i in np.argsort(-row)
                    if not left_out(int(i))]
            out.append(hits[:k])
        return out


def build_model(shape: str, work: Path, device: str) -> tuple[Path, Any]:
    """(model folder, model on `device`): 8b / tiny from tiny_vlm.build_idefics2 (random weights
    on the device, no weights written), like: the `--like mantis-8b-idefics2` tiny."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if shape == "like":  # made on the device as the 8B model is (tiny_vlm.random_model)
        from cropper_engine.models.tiny_vlm import make_tiny_like, random_model

        path = make_tiny_like(work / "model", "mantis-8b-idefics2")
        return path, random_model(path, device, dtype)
    from cropper_engine.models.tiny_vlm import build_idefics2

    return build_idefics2(work / "model", shape, save_weights=False, device=device, dtype=dtype)


def make_index(work: Path, n: int, T: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[Any, Any]:
    from cropper_engine.data.example import Example
    from cropper_engine.models.classical import ClassicalEmbedder
    from cropper_engine.types import Box

    w, h = size
    examples, photos = [], []
    for k in range(n):
        p = work / f"ex{k}.jpg"
        synthetic_photo(rng, w, h).save(p, quality=90)
        x1, y1 = rng.uniform(0, 0.2) * w, rng.uniform(0, 0.2) * h
        crops = [Box(x1, y1, x1 + rng.uniform(0.6, 0.8) * w, y1 + rng.uniform(0.6, 0.8) * h) for _ in range(T)]
        examples.append(Example(p.name, str(p), w, h, crops, [round(4.5 - 0.3 * i, 2) for i in range(T)]))
        photos.append(p)
    emb = ClassicalEmbedder()
    vectors = emb.embed([str(p) for p in photos])
    try:
        from cropper_engine.index.store import ExampleIndex

        return ExampleIndex.from_vectors(vectors, examples, work / "index", embedder=emb), emb
    except ImportError:  # no hnswlib (the lent GPU machine): exact search in memory
        return MemoryIndex(vectors, examples), emb


def run_config(args: argparse.Namespace, mode: str, b: int, model: Any, model_dir: Path, emb: Any, index: Any,
               queries: list[str], shape: Any, lim: dict[str, Any]) -> dict[str, Any]:
    """One mode at one batch size: warm-up, then `args.repeats` timed batches."""
    import torch

    from bench.common import peak_gpu_mb, peak_rss_mb
    from cropper_engine.config import load_config
    from cropper_engine.engine.grammar import BoxGrammar
    from cropper_engine.engine.loop import Cropper
    from cropper_engine.models.registry import MODELS
    from cropper_engine.models.vlm_transformers import TransformersVLM
    from cropper_engine.types import CropRequest, Task

    mantis = MODELS["mantis-8b-idefics2"]  # its context (8192) and processor settings
    w, h = (int(v) for v in args.size.lower().split("x"))
    cfg = load_config(env={}, overrides={
        "retrieval.examples": args.S, "retrieval.crops": args.T, "vlm.candidates": args.R,
        "vlm.rounds": args.L, "vlm.batch_size": args.vlm_batch or b, "vlm.parallel": mode == "parallel",
        "loop.select_free": "best", "loop.keep_faces": "off"})  # the VLM's figures alone
    vlm = TransformersVLM(str(model_dir), device=args.device, batch_size=args.vlm_batch or b, preloaded=model,
                          spec=mantis)
    engine = Cropper.from_config(cfg, embedder=emb, index=index, vlm=vlm)
    answer_limit = engine.answer_limit(BoxGrammar(1 if cfg.vlm.parallel else args.R))
    reqs = [CropRequest(q, Task.FREE, id=Path(q).name) for q in queries[:b]]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.crop_batch(reqs)  # warm-up: kernels, allocator, caches
    warm_s = time.perf_counter() - t0
    engine.vlm_stage_times.clear()
    lat: list[float] = []
    prompt_tok = new_tok = gen_tok = longest_prompt = 0
    pipelines: dict[str, int] = {}
    notes: dict[str, int] = {}
    vision_images = vlm.image_cache_misses
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        outs = engine.crop_batch(reqs)
        lat += [time.perf_counter() - t1] * b
        for out in outs:
            for r in out:
                pipelines[r.pipeline] = pipelines.get(r.pipeline, 0) + 1
                for note in r.notes:  # e.g. "S lowered", "cut at the token limit", a sampling fallback
                    notes[note] = notes.get(note, 0) + 1
                longest_prompt = max([longest_prompt] + [t["prompt"] for t in r.extra.get("tokens_by_round", [])])
                t = r.extra.get("tokens", {})
                prompt_tok += t.get("prompt", 0)
                new_tok += t.get("prompt", 0) - t.get("cached", 0)
                gen_tok += t.get("generated", 0)
    n = b * args.repeats
    vision_images = (vlm.image_cache_misses - vision_images) / n
    st = {k: v / n for k, v in engine.vlm_stage_times.items()}
    rows_per_step = args.R if cfg.vlm.parallel else 1
    limits = {
        "vision": vision_images * shape.vision_flops(max(w, h)) / lim["flops"],
        "prefill": shape.prefill_flops(int(new_tok / n)) / lim["flops"],
        # each decode step gives one token to each row of the b prompts, reading the weights once
        # and every row's KV cache
        "decode": (gen_tok / n / rows_per_step) * shape.decode_bytes(b * rows_per_step,
                                                                     int(prompt_tok / n / (1 + args.L)))
        / b / lim["bandwidth"],
    }
    need_full = vlm.memory_need()
    need_prompt = vlm.memory_need(context=max(longest_prompt, 1))
    peak_gpu = peak_gpu_mb()
    return {
        "mode": mode, "batch": b, "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p95_s": round(float(np.percentile(lat, 95)), 3),
        "images_per_s": round(b / statistics.median(lat[::b]), 3), "warm_up_s": round(warm_s, 2),
        "prompt_tokens_per_image": round(prompt_tok / n), "prefilled_tokens_per_image": round(new_tok / n),
        "generated_tokens_per_image": round(gen_tok / n, 1), "vision_images_per_image": round(vision_images, 2),
        "stage_s_per_image": {k: round(v, 4) for k, v in st.items()},
        "limit_s_per_image": {k: round(v, 4) for k, v in limits.items()},
        "fraction_of_limit": {k: round(limits[k] / st[k], 3) for k in limits if st.get(k)},
        "prefill_tflops": round(shape.prefill_flops(int(new_tok / n)) / st["prefill"] / 1e12, 2)
        if st.get("prefill") else None,
        "pipelines": pipelines, "notes": notes,
        "sampling": vlm.sampling, "sampling_note": vlm.sampling_note,
        "max_new_tokens": answer_limit, "longest_prompt_tokens": longest_prompt,
        "context_length": vlm.context_length, "image_tokens": vlm.image_tokens, "sliding_window": vlm.window,
        "peak_gpu_gb": round(peak_gpu * 2**20 / 1e9, 2) if peak_gpu is not None else None,
        "peak_rss_gb": round(peak_rss_mb() * 2**20 / 1e9, 2),
        "memory_need_gb": round(need_full.total, 2), "memory_need": need_full.describe(),
        "memory_need_at_longest_prompt_gb": round(need_prompt.total, 2),
        "memory_need_at_longest_prompt": {k: round(v, 3) for k, v in need_prompt.buffers().items()},
        "peak_within_estimate": (peak_gpu * 2**20 / 1e9 <= need_prompt.total) if peak_gpu is not None else None,
    }


def problems(row: dict[str, Any]) -> list[str]:
    """What makes a configuration's figures unusable: a stage not timed, a row not `vlm`, a fallback."""
    out = [f"stage {s} not timed" for s in STAGES if not row["stage_s_per_image"].get(s)]
    other = {k: v for k, v in row["pipelines"].items() if k != "vlm"}
    if other:
        out.append(f"rows not from the VLM: {other}")
    if row["sampling"] != "grouped" or row["sampling_note"]:
        out.append(f"sampling fell back: {row['sampling']} ({row['sampling_note']})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=["8b", "like", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="list,parallel", help="list (R boxes in one answer) and/or parallel")
    ap.add_argument("--vlm-batch", type=int, default=0, help="prompts per VLM call [default: the batch]")
    ap.add_argument("-S", type=int, default=30)
    ap.add_argument("-T", type=int, default=5)
    ap.add_argument("-R", type=int, default=6)
    ap.add_argument("-L", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=96, help="synthetic examples in the index")
    ap.add_argument("--size", default="1024x683", help="query and example image size WxH")
    ap.add_argument("--budget-s", type=float, default=0, help="start no configuration after this many seconds")
    ap.add_argument("--json", default="", help="write the figures here (after every configuration)")
    ap.add_argument("--out", action="store_true", help="also write bench/results/fullsize-<shape>.json/.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every configuration ran cleanly")
    args = ap.parse_args()
    started = time.perf_counter()

    import torch

    from bench.common import save_json, write_results
    from bench.costmodel import Shape, device_limits

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (`make gpu-run`), or rehearse it on the "
                         "CPU with `make gpu-rehearsal`")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"list", "parallel"}:
        raise SystemExit(f"--modes takes list and/or parallel, got {args.modes!r}")
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fullsize-"))
    w, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model_dir, model = build_model(args.shape, work, args.device)
    print(f"built {args.shape} with random weights on {args.device} in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters)", file=sys.stderr)
    index, emb = make_index(work, args.examples, args.T, (w, h), rng)
    queries = []
    for k in range(max(batches)):
        p = work / f"q{k}.jpg"
        synthetic_photo(rng, w, h).save(p, quality=90)
        queries.append(str(p))
    shape = Shape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    lim = device_limits()
    figures: dict[str, Any] = {
        "bench": "fullsize", "shape": args.shape, "device": lim["name"], "S": args.S, "T": args.T, "R": args.R,
        "L": args.L, "image_size": args.size, "index": index.describe().get("search", "hnswlib"),
        "results": [], "skipped": [], "problems": {},
        "targets": {"p50_single_s": 3.0, "prefill_fraction_of_bf16_peak": 0.4, "stage_within_2x": True,
                    "peak_within_estimate": True}}

    def write() -> None:
        figures["load_average"] = list(os.getloadavg())
        figures["seconds"] = round(time.perf_counter() - started, 1)
        if args.json:
            save_json(args.json, figures)

    for mode in modes:
        for b in batches:
            name = f"{mode} batch {b}"
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                figures["skipped"].append(f"{name}: past the budget of {args.budget_s:.0f} s")
                print(f"{name}: skipped (past the budget of {args.budget_s:.0f} s)", file=sys.stderr)
                continue
            try:
                row = run_config(args, mode, b, model, model_dir, emb, index, queries, shape, lim)
            except Exception as exc:  # the next configuration may still run (an OOM at batch 8, say)
                figures["problems"][name] = [f"{type(exc).__name__}: {exc}"]
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                write()
                continue
            figures["results"].append(row)
            if problems(row):
                figures["problems"][name] = problems(row)
            st = row["stage_s_per_image"]
            print(f"{name:>17}: p50 {row['p50_s']:.3f} s/image  {row['images_per_s']:.2f} images/s  "
                  f"vision {st.get('vision', 0):.4f}  prefill {st.get('prefill', 0):.4f} "
                  f"({row['prefill_tflops']} TFLOP/s)  decode {st.get('decode', 0):.4f} s/image  "
                  f"fraction of limit {row['fraction_of_limit']}  peak GPU {row['peak_gpu_gb']} GB "
                  f"(estimate {row['memory_need_at_longest_prompt_gb']} at the longest prompt, "
                  f"{row['memory_need_gb']} at full context)  sampling {row['sampling']}", file=sys.stderr)
            write()
    if args.out:
        md = ("| mode | batch | p50 s | images/s | vision s | prefill s | decode s | prefill TFLOP/s | peak GB | "
              "estimate GB |\n|---|---|---|---|---|---|---|---|---|---|\n")
        md += "".join(f"| {r['mode']} | {r['batch']} | {r['p50_s']} | {r['images_per_s']} | "
                      f"{r['stage_s_per_image'].get('vision')} | {r['stage_s_per_image'].get('prefill')} | "
                      f"{r['stage_s_per_image'].get('decode')} | {r['prefill_tflops']} | {r['peak_gpu_gb']} | "
                      f"{r['memory_need_at_longest_prompt_gb']} |\n" for r in figures["results"])
        write_results(f"fullsize-{args.shape}", figures, md)
    write()
    bad = dict(figures["problems"])
    if args.strict and len(figures["results"]) < len(modes) * len(batches):
        bad["configurations"] = [f"{len(figures['results'])} of {len(modes) * len(batches)} ran"]
    for name, what in bad.items():
        print(f"PROBLEM {name}: {'; '.join(what)}", file=sys.stderr)
    print(args.json or "(no --json given: nothing written)")
    if args.strict and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
