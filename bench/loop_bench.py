"""The engine's loop against a naive reference loop, side by side on the same model and inputs.

    python bench/loop_bench.py [--quick] [--model DIR] [--batch 8] [-S 8] [-R 6] [-L 2]

The naive loop is what a plain, competent re-implementation does: the model loaded once,
HF `generate` with its KV cache, the same dtype, max_new_tokens, box grammar and stop rules
as the engine, but one image at a time, one generate call per round (n=R samples through
num_return_sequences) and each crop scored on its own through the embedder's PIL path.
The engine batches all images of a round into one call, prefills each prompt once for its R
samples, and scores all crops of the batch in one fused pass.

Without --model it builds the tiny random Idefics2 and CLIP (offline, seconds). Inputs are
FCDB images from ../shared/data (an index of --index-size train images; queries from val),
else the sample photos. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.data.example import Example  # noqa: E402
from cropper_engine.engine.features import SaliencyTable, box_features  # noqa: E402
from cropper_engine.engine.geometry import dedupe  # noqa: E402
from cropper_engine.engine.loop import Cropper  # noqa: E402
from cropper_engine.engine.parse import parse_boxes  # noqa: E402
from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates  # noqa: E402
from cropper_engine.imageio import open_image  # noqa: E402
from cropper_engine.index.select import select_crops  # noqa: E402
from cropper_engine.types import Box, CropRequest, Task  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_inputs(data: Path, index_size: int, n_queries: int, work: Path) -> tuple[list[Example], list[str]]:
    if (data / "train.jsonl").exists():
        from cropper_engine.data.readers import read_dataset

        train = read_dataset("fcdb", data / "train.jsonl", limit=index_size).examples
        val = read_dataset("fcdb", data / "val.jsonl", limit=n_queries).examples
        return train, [e.image_path for e in val]
    from cropper_engine.samples import write_samples

    paths = write_samples(work / "samples")
    exs = []
    for k in range(index_size):
        p = paths[k % len(paths)]
        w, h = open_image(p).size
        exs.append(Example(f"{p.name}#{k}", str(p), w, h, [Box(0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)]))
    return exs, [str(paths[k % len(paths)]) for k in range(n_queries)]


class NaiveLoop:
    """One image at a time; one generate call per round; crops scored one by one."""

    def __init__(self, vlm: Any, embedder: Any, index: Any, cfg: Any, templates: Any) -> None:
        self.vlm, self.emb, self.index, self.cfg, self.tpl = vlm, embedder, index, cfg, templates
        self.stages: dict[str, float] = {}
        self.generated = 0

    def _t(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + t1 - t0
        return t1

    def score(self, image: Any, boxes: list[Box]) -> list[float]:
        from cropper_engine.models.saliency import spectral_residual_saliency

        w, h = image.size
        full = self.emb.embed([image])[0]
        s = 160 / max(w, h)
        small = image.convert("L").resize((max(8, round(w * s)), max(8, round(h * s))))
        table = SaliencyTable.from_map(spectral_residual_saliency(np.asarray(small, dtype=np.float32), 64))
        from cropper_engine.models.scorers import ClassicalScorer

        out = []
        for b in boxes:  # per crop: cut with PIL, embed alone
            crop = image.crop(tuple(b.as_int()))
            clip = float(np.clip(self.emb.embed([crop])[0] @ full, 0, 1))
            u = np.array([b.to_unit(w, h)])
            classical = float(ClassicalScorer().score(box_features(table, u, w / h))[0])
            out.append((clip + (b.area / (w * h)) + classical) / 3)
        return out

    def crop(self, path: str) -> Box:
        import torch

        from cropper_engine.engine.grammar import BoxGrammar, TokenConstraint
        from cropper_engine.models.vlm_transformers import _conversation_to_chat

        cfg = self.cfg
        t = time.perf_counter()
        image = open_image(path).image
        t = self._t("decode", t)
        vec = self.emb.embed([image])
        t = self._t("embed", t)
        hits = self.index.query(vec, cfg.retrieval.examples, exclude={Path(path).name})[0]
        examples = []
        for h in hits:
            ex = self.index.example(h.row)
            img = open_image(ex.image_path).image  # no cache: a plain loop reloads
            img.thumbnail((1024, 1024))
            sel = select_crops(ex, Task.FREE, cfg.retrieval.crops_free)
            examples.append(PromptExample(img, ex.width, ex.height, sel))
        t = self._t("retrieve", t)
        w, h = image.size
        spec = PromptSpec(Task.FREE, image, w, h, examples, 1)
        model, proc, tok = self.vlm.model, self.vlm.processor, self.vlm.tokenizer
        grammar = BoxGrammar(boxes=1)
        refine = None
        best: tuple[float, Box] | None = None
        for r in range(cfg.vlm.rounds + 1):
            conv = build_messages(spec, self.tpl, refine)
            # as a plain loop does: full-resolution PIL images (crops cut out), the processor resizes
            messages, imgs = _conversation_to_chat(conv)
            text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = proc(text=[text], images=[imgs], return_tensors="pt")
            t = self._t("prompt", t)
            torch.manual_seed(cfg.vlm.seed + r)
            with torch.inference_mode():
                seq = model.generate(
                    **inputs, max_new_tokens=cfg.vlm.max_new_tokens, num_return_sequences=cfg.vlm.candidates,
                    do_sample=True, temperature=cfg.vlm.temperature, top_p=cfg.vlm.top_p, top_k=0,
                    eos_token_id=self.vlm.eos_token_ids, pad_token_id=self.vlm.pad_token_id,
                    logits_processor=[TokenConstraint(tok, grammar, eos_token_ids=self.vlm.eos_token_ids)])
            new = seq[:, inputs["input_ids"].shape[1]:].tolist()
            eos = set(self.vlm.eos_token_ids)
            texts = []
            for row in new:
                end = next((k + 1 for k, tk in enumerate(row) if tk in eos), len(row))
                self.generated += end
                texts.append(tok.decode(row[:end], skip_special_tokens=True))
            t = self._t("generate", t)
            boxes = []
            for tx in texts:
                for pb in parse_boxes(tx, 1).boxes:
                    b = Box.from_norm(pb.as_tuple(), w, h).clamp(w, h)
                    if b.is_valid():
                        boxes.append(b)
            boxes = [boxes[i] for i in dedupe(boxes, cfg.loop.nms_iou)]
            scores = self.score(image, boxes)
            t = self._t("score", t)
            for s, b in zip(scores, boxes, strict=True):
                if best is None or s > best[0]:
                    best = (s, b)
            refine = [(b, s, None) for s, b in
                      sorted(zip(scores, boxes, strict=True), key=lambda p: -p[0])[: cfg.vlm.candidates]]
        return best[1] if best else Box.full(w, h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed repeat (under 3 minutes here)")
    ap.add_argument("--model", default=None, help="a VLM folder [default: build the tiny Idefics2]")
    ap.add_argument("--clip", default=None, help="embedder spec [default: the tiny open_clip]")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("-S", type=int, default=8)
    ap.add_argument("-R", type=int, default=6)
    ap.add_argument("-L", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json-out", default=None, help="also write the JSON figures to this file")
    ap.add_argument("--block-size", type=int, default=0, help="vLLM KV block size (0: vLLM's default)")
    args = ap.parse_args()

    import torch

    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.models.embedders import load_embedder
    from cropper_engine.models.tiny import make_tiny_clip
    from cropper_engine.models.tiny_vlm import make_tiny_idefics2
    from cropper_engine.models.vlm_transformers import TransformersVLM

    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="loop_bench-"))
    model_dir = args.model or str(make_tiny_idefics2(work / "idefics2"))
    clip_spec = args.clip or f"open_clip-dir:{make_tiny_clip(work / 'clip')['open_clip']}"
    emb = load_embedder(clip_spec, device="cpu")
    train, queries = load_inputs(Path(args.data), args.index_size, args.batch, work)
    ExampleIndex.build(train, emb, work / "index")
    index = ExampleIndex.load(work / "index", embedder=emb)

    cfg = load_config(env={}, overrides={
        "retrieval.examples": args.S, "vlm.candidates": args.R, "vlm.rounds": args.L,
        "vlm.batch_size": args.batch, "loop.select_free": "best", "vlm.block_size": args.block_size})
    if args.backend == "vllm":
        from cropper_engine.models.registry import resolve_model
        from cropper_engine.models.vlm_vllm import VLLMBackend

        vlm: Any = VLLMBackend.from_config(cfg, resolve_model(model_dir))
    else:
        vlm = TransformersVLM(model_dir, device="cpu", batch_size=args.batch)
    engine = Cropper.from_config(cfg, embedder=emb, index=index, vlm=vlm)
    # the naive loop runs transformers as it comes: stock attention, its own generate
    naive_vlm = TransformersVLM(model_dir, device="cpu", attention="stock")
    naive = NaiveLoop(naive_vlm, emb, index, cfg, load_templates(None))
    reqs = [CropRequest(q, Task.FREE, id=Path(q).name) for q in queries]

    def run_engine() -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        outs = engine.crop_batch(reqs)
        return time.perf_counter() - t0, outs

    def run_naive() -> float:
        t0 = time.perf_counter()
        for q in queries:
            naive.crop(q)
        return time.perf_counter() - t0

    print(f"warm-up ({len(queries)} images, S={args.S} R={args.R} L={args.L}) ...", file=sys.stderr)
    run_engine()
    naive.crop(queries[0])
    naive.stages.clear()
    naive.generated = 0
    eng_times, naive_times, stages, eng_tokens, prompt_tokens = [], [], {}, 0, 0
    refine = {"prompt": 0, "shared": 0, "cached": 0}
    pipelines: dict[str, int] = {}
    for _ in range(repeats):
        dt, outs = run_engine()
        eng_times.append(dt)
        for out in outs:
            for r in out:
                pipelines[r.pipeline] = pipelines.get(r.pipeline, 0) + 1
                eng_tokens += r.extra.get("tokens", {}).get("generated", 0)
                prompt_tokens += r.extra.get("tokens", {}).get("prompt", 0)
                for k, v in r.timings.items():
                    stages[k] = stages.get(k, 0.0) + v
                for t in r.extra.get("tokens_by_round", []):
                    if t["round"] >= 1:  # refinement rounds: what a prefix cache can serve
                        for key in refine:
                            refine[key] += t[key]
        naive_times.append(run_naive())
    n = len(queries)
    eng_ips = n / statistics.median(eng_times)
    naive_ips = n / statistics.median(naive_times)
    eng_tok = eng_tokens / repeats / n
    naive_tok = naive.generated / repeats / n
    print(f"\n{'stage':<10} {'engine s/img':>13} {'naive s/img':>12}")
    for k in ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score"):
        e = stages.get(k, 0.0) / repeats / n
        nv = naive.stages.get(k, 0.0) / repeats / n
        print(f"{k:<10} {e:>13.4f} {nv:>12.4f}")
    print(f"\n{'':<22} {'engine':>10} {'naive':>10}")
    print(f"{'images/s':<22} {eng_ips:>10.3f} {naive_ips:>10.3f}")
    print(f"{'s/image (median)':<22} {1 / eng_ips:>10.3f} {1 / naive_ips:>10.3f}")
    print(f"{'generated tokens/img':<22} {eng_tok:>10.1f} {naive_tok:>10.1f}")
    print(f"speedup {eng_ips / naive_ips:.2f}x   pipelines {pipelines}   prompt tokens/img "
          f"{prompt_tokens / repeats / n:.0f}")
    block = getattr(vlm, "block_size", None) or (1 if args.backend == "transformers" else None)
    hit_rate = refine["cached"] / refine["shared"] if refine["shared"] else None
    print(f"prefix cache, refinement rounds: prompt tokens {refine['prompt']}, shared with an earlier prompt "
          f"(cacheable) {refine['shared']}, served from the cache {refine['cached']}, block size {block}, "
          f"hit rate {hit_rate if hit_rate is None else round(hit_rate, 3)}")
    figures = {
        "speedup": round(eng_ips / naive_ips, 3),
        "engine_images_per_s": round(eng_ips, 4), "naive_images_per_s": round(naive_ips, 4),
        "engine_tokens_per_image": round(eng_tok, 1), "naive_tokens_per_image": round(naive_tok, 1),
        "tokens_ratio": round(eng_tok / naive_tok, 3) if naive_tok else None,
        "prompt_tokens_per_image": round(prompt_tokens / repeats / n, 1),
        "engine_stage_s_per_image": {k: round(v / repeats / n, 5) for k, v in stages.items()},
        "naive_stage_s_per_image": {k: round(v / repeats / n, 5) for k, v in naive.stages.items()},
        "refine_prompt_tokens": refine["prompt"], "refine_cacheable_tokens": refine["shared"],
        "refine_cached_tokens": refine["cached"], "block_size": block,
        "prefix_cache_hit_rate": round(hit_rate, 4) if hit_rate is not None else None,
        "pipelines": pipelines, "batch": args.batch, "S": args.S, "R": args.R, "L": args.L,
        "repeats": repeats, "backend": args.backend, "model": "tiny-idefics2" if not args.model else args.model,
        "torch_threads": torch.get_num_threads(), "device": platform.processor() or platform.machine(),
        "git": git_sha(), "torch": torch.__version__,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
