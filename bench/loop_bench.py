"""The engine's loop against a naive reference loop, side by side on the same model and inputs.

    python -m bench loop [--quick] [--out] [--model DIR] [--batch 8] [-S 8] [-R 6] [-L 2]

The naive loop (`NaiveLoop`) is what a careful user writes around HF `generate`: it shares the
model, its attention kernel, dtype, token limit, box grammar and sampling settings, images
decoded and resized once, each image's saliency computed once and one scorer. It differs only in
what the engine claims: batching across images, one prefill per prompt for its R samples, the
tree decode, prefix (and image feature) reuse across rounds, and fused scoring. Both loops warm up
first (always, --quick too), then run on images they have not seen; the report gives each
stage's speed-up and the p50 latency of both (the engine answers a batch at once: batching trades
latency for throughput).

Without --model it builds the tiny random Idefics2 and CLIP (offline, seconds). Inputs are
FCDB images from ../shared/data (an index of --index-size train images; queries from val),
else the sample photos. The last line printed is one JSON object with the figures.
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

from bench.common import peak_gpu_mb, peak_rss_mb, write_results  # noqa: E402
from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.data.example import Example  # noqa: E402
from cropper_engine.engine.geometry import dedupe  # noqa: E402
from cropper_engine.engine.loop import Cropper  # noqa: E402
from cropper_engine.engine.parse import parse_boxes  # noqa: E402
from cropper_engine.engine.prompt import PromptExample, PromptSpec, build_messages, load_templates  # noqa: E402
from cropper_engine.imageio import open_image  # noqa: E402
from cropper_engine.index.select import select_crops  # noqa: E402
from cropper_engine.types import Box, CropRequest, Task  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"


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
    """What a careful user writes around transformers' `generate`, one image at a time.

    It shares with the engine what such a user would write: the model loaded once with the same
    attention kernel, dtype, token limit, box grammar and sampling settings; each query decoded
    once, example images decoded once (kept, at the size the VLM reads) and every image resized
    once for the model (the same fitter); each image's saliency computed once and one scorer
    (built once, the engine's). It differs only in what the engine claims: one image at a time (no
    batching across images), one `generate` call per round with num_return_sequences=R (every
    sample prefills the prompt again: no shared prefill, no tree decode), every round's prompt
    run from its start through the vision tower (no prefix or feature reuse), and each crop scored
    by its own scorer call (no fused scoring across crops and images).
    """

    def __init__(self, vlm: Any, embedder: Any, index: Any, cfg: Any, templates: Any, scorer: Any) -> None:
        from cropper_engine.engine.loop import ImageCache

        self.vlm, self.emb, self.index, self.cfg, self.tpl, self.scorer = vlm, embedder, index, cfg, templates, scorer
        self.examples = ImageCache(max_side=getattr(vlm, "image_edge", None) or 1024)
        self.stages: dict[str, float] = {}
        self.generated = 0

    def _t(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + t1 - t0
        return t1

    def crop(self, path: str) -> Box:
        from cropper_engine.engine.grammar import BoxGrammar
        from cropper_engine.engine.loop import _uuid
        from cropper_engine.models.saliency import spectral_residual_saliency

        cfg = self.cfg
        t = time.perf_counter()
        loaded = open_image(path, cfg.max_pixels)
        image = loaded.image
        w, h = image.size
        t = self._t("decode", t)
        vec = self.emb.embed([image])
        t = self._t("embed", t)
        hits = self.index.query(vec, cfg.retrieval.examples, exclude={Path(path).name})[0]
        examples = []
        for hit in hits:
            ex = self.index.example(hit.row)
            sel = select_crops(ex, Task.FREE, cfg.retrieval.crops)
            examples.append(PromptExample(self.examples.get(ex.image_path), ex.width, ex.height, sel,
                                          _uuid(ex.image_path)))
        t = self._t("retrieve", t)
        s = 160 / max(w, h)
        small = image.convert("L").resize((max(8, round(w * s)), max(8, round(h * s))))
        sal = spectral_residual_saliency(np.asarray(small, dtype=np.float32), 64)
        t = self._t("saliency", t)
        # the engine's answer mode: R boxes in one answer (the default), or R one-box samples
        n_boxes = 1 if cfg.vlm.parallel else cfg.vlm.candidates
        spec = PromptSpec(Task.FREE, image, w, h, examples, n_boxes, query_uuid="q-" + loaded.uid)
        self.grammar = BoxGrammar(boxes=n_boxes)
        refine = None
        best: tuple[float, Box] | None = None
        for r in range(cfg.vlm.rounds + 1):
            texts, t = self.answers(spec, refine, r, t)  # times "prompt" and "generate"
            found: list[tuple[Box, float | None]] = []
            for tx in texts:
                for pb in parse_boxes(tx, n_boxes).boxes:
                    b = Box.from_norm(pb.as_tuple(), w, h).clamp(w, h)
                    if b.width >= 2 and b.height >= 2:
                        found.append((b, pb.s))
            found = [found[i] for i in dedupe([b for b, _ in found], cfg.loop.nms_iou)]
            boxes = [b for b, _ in found]
            scores = [float(self.scorer.score([image], [[b]], [sal]).total[0][0]) for b in boxes]  # one crop a call
            t = self._t("score", t)
            for sc, b in zip(scores, boxes, strict=True):
                if best is None or sc > best[0]:
                    best = (sc, b)
            ranked = sorted(zip(scores, found, strict=True), key=lambda p: -p[0])[: cfg.vlm.candidates]
            refine = [(b, sc, s if self.show_vlm_score else None) for sc, (b, s) in ranked]
        return best[1] if best else Box.full(w, h)

    # refinement prompts show each candidate's own s, as the engine's do (False: as unscored; the
    # transformers row, bench/results/loop.json, was measured so)
    show_vlm_score = False

    def answers(self, spec: PromptSpec, refine: Any, r: int, t: float) -> tuple[list[str], float]:
        """Round r's answer texts: one `generate` call (num_return_sequences=R in parallel mode)."""
        import torch

        from cropper_engine.engine.grammar import TokenConstraint

        cfg, vlm, grammar = self.cfg, self.vlm, self.grammar
        tok = vlm.tokenizer
        eos = set(vlm.eos_token_ids)
        text, imgs = vlm.render(build_messages(spec, self.tpl, refine))  # images fitted once (by uuid)
        inputs = vlm.processor(text=[text], images=[imgs], return_tensors="pt").to(vlm.device)
        t = self._t("prompt", t)
        torch.manual_seed(cfg.vlm.seed + r)
        with torch.inference_mode():
            seq = vlm.model.generate(
                **inputs, max_new_tokens=cfg.vlm.max_new_tokens or vlm.answer_token_limit(grammar),
                num_return_sequences=cfg.vlm.candidates if cfg.vlm.parallel else 1,
                do_sample=True, temperature=cfg.vlm.temperature, top_p=cfg.vlm.top_p, top_k=0,
                eos_token_id=vlm.eos_token_ids, pad_token_id=vlm.pad_token_id,
                logits_processor=[TokenConstraint(tok, grammar, eos_token_ids=vlm.eos_token_ids)])
        texts = []
        for row in seq[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((k + 1 for k, tk in enumerate(row) if tk in eos), len(row))
            self.generated += end
            texts.append(tok.decode(row[:end], skip_special_tokens=True))
        t = self._t("generate", t)
        return texts, t


class NaiveVLLMLoop(NaiveLoop):
    """What a careful user writes around `vllm.LLM.chat`, one image at a time, on the engine's own
    `LLM` (bench/loop_bench.py --backend vllm).

    Shared with the engine, as such a user would have it: the one `LLM` (its prefix caching on,
    vLLM's default), the sampling settings and per-round seeds, the token limit, the box grammar
    as structured output (a regex), the chat template and BOS setting, images fitted to the size
    the model reads (an `ImageFitter` of the backend's settings, its own: nothing the engine
    fitted is handed over) with the examples' and the query's uuids, and the scorer. What it does
    not have is what the engine claims: one `LLM.chat` request per image per round (n=R in
    parallel mode, one list answer in list mode, the engine's mode), no batching across images,
    each round's prompt built from scratch, each crop scored by its own scorer call.
    """

    show_vlm_score = True

    def __init__(self, vlm: Any, embedder: Any, index: Any, cfg: Any, templates: Any, scorer: Any) -> None:
        from cropper_engine.models.images import ImageFitter

        super().__init__(vlm, embedder, index, cfg, templates, scorer)
        mm = vlm.engine_config.mm_processor_kwargs or {}
        self.fit = ImageFitter(vlm.image_edge, max_pixels=mm.get("max_pixels"))
        self.chat_kw: dict[str, Any] = {"chat_template": vlm.chat_template} if vlm.chat_template else {}
        self.chat_kw["tokenization_kwargs"] = {"add_special_tokens": vlm.add_special_tokens}
        self.limit = 0

    def image_item(self, part: Any) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "image_pil", "image_pil": self.fit(part)}
        if part.uuid:
            item["uuid"] = part.uuid
        return item

    def answers(self, spec: PromptSpec, refine: Any, r: int, t: float) -> tuple[list[str], float]:
        """Round r's answer texts: one `LLM.chat` request (n=R in parallel mode)."""
        from cropper_engine.models.base import GenerationParams, chat_messages

        v, vlm, grammar = self.cfg.vlm, self.vlm, self.grammar
        if r == 0:  # the engine's token limit, from the tokenizer and the grammar (Cropper.answer_limit)
            self.limit = v.max_new_tokens * spec.n_boxes if v.max_new_tokens else vlm.answer_token_limit(grammar)
        conv = build_messages(spec, self.tpl, refine)
        t = self._t("prompt", t)
        # the engine's seeds: round 0 at the seed, round r at seed + r + 10 (Cropper._run_vlm)
        sp = vlm.sampling_params(GenerationParams(
            n=v.candidates if v.parallel else 1, max_new_tokens=self.limit, temperature=v.temperature,
            top_p=v.top_p, seed=v.seed + (r + 10 if r else 0), grammar=grammar if v.constrained else None))
        out = vlm.llm.chat([chat_messages(conv, self.image_item)], sp, use_tqdm=False, **self.chat_kw)[0]
        self.generated += sum(len(o.token_ids) for o in out.outputs)
        texts = [o.text for o in out.outputs if o.finish_reason != "length"]  # a cut box is not read (as the engine)
        t = self._t("generate", t)
        return texts, t


def _and(xs: list[str]) -> str:
    return " and ".join([", ".join(xs[:-1]), xs[-1]]) if len(xs) > 1 else "".join(xs)


def reset_vllm_caches(vlm: Any) -> list[str]:
    """Empty vLLM's prefix (KV), multimodal-input and encoder caches, so that a timed phase is
    served nothing another phase computed; the names of the caches emptied."""
    llm = vlm.llm
    done = []
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")
    done.append("prefix (KV)")
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()
        done.append("multimodal-input")
    engine = getattr(llm, "llm_engine", None)
    if hasattr(engine, "reset_encoder_cache"):
        engine.reset_encoder_cache()
        done.append("encoder-output")
    return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed repeat after the warm-up (about a minute here)")
    ap.add_argument("--model", default=None, help="a VLM folder [default: build the tiny Idefics2]")
    ap.add_argument("--clip", default=None, help="embedder spec [default: the tiny open_clip, else hf-clip]")
    ap.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"],
                    help="auto: vllm where `import vllm` works in this interpreter (.venv-vllm), else transformers")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (transformers backend)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--batch", type=int, default=8, help="images per engine batch")
    ap.add_argument("--images", type=int, default=0, help="query images per timed repeat [default: --batch]")
    ap.add_argument("--image-size", type=int, default=0, help="resize queries to this longest side (px)")
    ap.add_argument("-S", type=int, default=8)
    ap.add_argument("-T", type=int, default=5)
    ap.add_argument("-R", type=int, default=6)
    ap.add_argument("-L", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each loop first (at least 1)")
    ap.add_argument("--index-size", type=int, default=64)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive reference loop")
    ap.add_argument("--parallel", action="store_true",
                    help="the engine samples R one-box answers (vlm.parallel) instead of one list of R boxes")
    ap.add_argument("--no-mode-probe", action="store_true",
                    help="skip the probe of distinct candidates per round in both modes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json-out", default=None, help="also write the JSON figures to this file")
    ap.add_argument("--out", action="store_true", help="write JSON, markdown and PNG to bench/results/")
    ap.add_argument("--name", default=None, help="result file name with --out [default: loop, loop-vllm]")
    ap.add_argument("--block-size", type=int, default=0, help="vLLM KV block size (0: vLLM's default)")
    ap.add_argument("--load-format", default="auto", help='vLLM load format; "dummy": random weights from '
                    "the model folder's config.json (full-size timing without weights)")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1: a timed run that includes the warm-up understates the speed-up")
    return args


def resolve_backend(name: str) -> str:
    """"auto" -> "vllm" where vLLM imports in this interpreter, else "transformers"."""
    if name != "auto":
        return name
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    # tried in a child process: importing vLLM here, before the naive loop's transformers model is
    # built, could change what that loop runs (see the vllm ordering in main)
    ok = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0
    return "vllm" if ok else "transformers"


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    asked = args.backend
    args.backend = resolve_backend(asked)
    print(f"backend: {args.backend}" + (" (auto: vllm imports here)" if asked == "auto" and args.backend == "vllm"
          else " (auto: no vllm here)" if asked == "auto" else ""), file=sys.stderr)

    import torch
    import transformers

    from cropper_engine.index.store import ExampleIndex
    from cropper_engine.models.embedders import load_embedder
    from cropper_engine.models.tiny import make_tiny_clip
    from cropper_engine.models.tiny_vlm import make_tiny_idefics2
    from cropper_engine.models.vlm_transformers import TransformersVLM

    transformers.logging.set_verbosity_error()  # the processor's notes on tiny crops, every round
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    n_images = args.images or args.batch
    work = Path(tempfile.mkdtemp(prefix="loop_bench-"))
    model_dir = args.model or str(make_tiny_idefics2(work / "idefics2"))
    if args.clip:
        clip_spec = args.clip
    else:
        tiny = make_tiny_clip(work / "clip")
        clip_spec = f"open_clip-dir:{tiny['open_clip']}" if "open_clip" in tiny else f"hf-clip:{tiny['hf_clip']}"
    emb = load_embedder(clip_spec, device="cpu")
    # every run crops images it has not seen: a repeat of the same images would be served from
    # the prefix and feature caches, which real traffic is not
    runs = args.warmup + repeats
    train, queries = load_inputs(Path(args.data), args.index_size, n_images * runs + 4, work)
    queries, probe_queries = queries[: n_images * runs], queries[n_images * runs:]
    if args.image_size:
        queries = _resized(queries, args.image_size, work)
    ExampleIndex.build(train, emb, work / "index")
    index = ExampleIndex.load(work / "index", embedder=emb)

    cfg = load_config(env={}, overrides={
        "retrieval.examples": args.S, "retrieval.crops": args.T, "vlm.candidates": args.R,
        "vlm.rounds": args.L, "vlm.batch_size": args.batch, "loop.select_free": "best", "vlm.parallel": args.parallel,
        "vlm.block_size": args.block_size, "vlm.dtype": args.dtype, "vlm.load_format": args.load_format,
        # the loops are compared; keeping faces whole (bench/subject_bench.py) is not in the naive loop
        "loop.keep_faces": "off"})
    from cropper_engine.engine.build import _scorer

    vllm = args.backend == "vllm"
    naive: NaiveLoop | None = None
    if not args.no_naive and not vllm:
        # the same model, attention kernel and scorer as the engine; no prefix store (generate does not use it)
        naive_vlm = TransformersVLM(model_dir, device=args.device, dtype=args.dtype, prefix_cache=False)
        naive = NaiveLoop(naive_vlm, emb, index, cfg, load_templates(None), _scorer(cfg, emb, {}))

    def run_queries(k: int) -> list[str]:
        return queries[k * n_images:(k + 1) * n_images]

    def run_naive(k: int) -> list[float]:
        lat = []
        for q in run_queries(k):
            t0 = time.perf_counter()
            naive.crop(q)  # type: ignore[union-attr]
            lat.append(time.perf_counter() - t0)
        return lat

    print(f"{n_images} images, batch {args.batch}, S={args.S} T={args.T} R={args.R} L={args.L} ...", file=sys.stderr)
    if vllm:
        from cropper_engine.models.registry import resolve_model
        from cropper_engine.models.vlm_vllm import VLLMBackend

        vlm: Any = VLLMBackend.from_config(cfg, resolve_model(model_dir))
        if not args.no_naive:  # on the engine's own LLM: one request per image per round
            naive = NaiveVLLMLoop(vlm, emb, index, cfg, load_templates(None), _scorer(cfg, emb, {}))
    else:
        vlm = TransformersVLM(model_dir, device=args.device, dtype=args.dtype, batch_size=args.batch)
    engine = Cropper.from_config(cfg, embedder=emb, index=index, vlm=vlm)

    resets: list[str] = []

    def fresh_caches() -> None:
        # vLLM: the engine and the naive loop share one LLM; neither is served what the other
        # computed (prefix KV, processed images, vision features): every phase starts with them empty
        if vllm:
            resets[:] = reset_vllm_caches(vlm)

    def run_engine(k: int) -> tuple[list[float], list[Any]]:
        reqs = [CropRequest(q, Task.FREE, id=Path(q).name) for q in run_queries(k)]
        lat, outs = [], []
        for b in (reqs[i:i + args.batch] for i in range(0, len(reqs), args.batch)):
            t0 = time.perf_counter()
            outs.extend(engine.crop_batch(b))
            lat.extend([time.perf_counter() - t0] * len(b))  # every image of a batch waits for the batch
        return lat, outs

    # the same warm-up for both, on the same images, before any timed run
    for k in range(args.warmup):
        fresh_caches()
        run_engine(k)
    engine.vlm_stage_times.clear()
    if naive is not None:
        for k in range(args.warmup):
            fresh_caches()
            run_naive(k)
        naive.stages.clear()
        naive.generated = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    eng_lat, eng_wall, naive_lat, naive_wall = [], [], [], []
    tally = Tally()
    rows: list[Any] = []

    def engine_phase(run_k: int) -> None:
        nonlocal eng_lat
        fresh_caches()
        t0 = time.perf_counter()
        lat, outs = run_engine(run_k)
        eng_wall.append(time.perf_counter() - t0)
        eng_lat += lat
        for out in outs:
            rows.extend(out)
            for r in out:
                tally.add(r)

    def naive_phase(run_k: int) -> None:
        nonlocal naive_lat
        fresh_caches()
        t0 = time.perf_counter()
        naive_lat += run_naive(run_k)
        naive_wall.append(time.perf_counter() - t0)

    # engine and naive take turns on the same images, so machine noise hits both alike; on vLLM
    # the order alternates per repeat as well (engine first, then naive first, ...)
    order: list[str] = []
    for i, run_k in enumerate(range(args.warmup, runs)):
        phases = [engine_phase] + ([naive_phase] if naive is not None else [])
        if vllm and i % 2:
            phases.reverse()
        for ph in phases:
            ph(run_k)
        order.append(" then ".join("engine" if ph is engine_phase else "naive" for ph in phases))
    n = n_images
    per = repeats * n
    stages, refine, pipelines = tally.stages, tally.refine, tally.pipelines
    eng_tokens, prompt_tokens = tally.generated, tally.prompt
    for k, v in engine.vlm_stage_times.items():  # the backend's split of "generate"
        stages[f"vlm_{k}"] = v
    eng_ips = n / statistics.median(eng_wall)
    eng_tok = eng_tokens / per
    figures: dict[str, Any] = {
        "engine_images_per_s": round(eng_ips, 4),
        "engine_p50_s": round(_percentile(eng_lat, 50), 4), "engine_p95_s": round(_percentile(eng_lat, 95), 4),
        "engine_tokens_per_image": round(eng_tok, 1),
        "prompt_tokens_per_image": round(prompt_tokens / per, 1),
        "engine_stage_s_per_image": {k: round(v / per, 5) for k, v in stages.items()},
    }
    if naive is not None:
        naive_ips = n / statistics.median(naive_wall)
        naive_tok = naive.generated / per
        figures.update({
            "speedup": round(eng_ips / naive_ips, 3), "naive_images_per_s": round(naive_ips, 4),
            "naive_p50_s": round(_percentile(naive_lat, 50), 4), "naive_p95_s": round(_percentile(naive_lat, 95), 4),
            "naive_tokens_per_image": round(naive_tok, 1),
            "tokens_ratio": round(eng_tok / naive_tok, 3) if naive_tok else None,
            "naive_stage_s_per_image": {k: round(v / per, 5) for k, v in naive.stages.items()},
            "naive_loop": "NaiveLoop: one image at a time, generate with num_return_sequences=R per round, "
                          "each crop scored alone; same model, attention kernel, image fitting and scorer",
            "naive_backend": "transformers", "timed_order": order,
            "engine_run_s": [round(x, 3) for x in eng_wall], "naive_run_s": [round(x, 3) for x in naive_wall],
        })
        if vllm:
            figures.update({
                "naive_backend": "vllm",
                "naive_loop": "NaiveVLLMLoop: vLLM, one request per image per round, interleaved: one LLM.chat "
                              "request per image per round on the engine's own LLM (n=R in parallel mode, one "
                              "list answer in list mode, as the engine), each round's prompt built from scratch, "
                              "each crop scored alone; the same sampling settings and seeds, token limit, box "
                              "grammar as structured output, chat template, image fitting, uuids and scorer",
                "interleaving": "each timed repeat runs the engine and the naive loop on the same images, the "
                                "order alternating per repeat; both get the same warm-up on the same images",
                "cache_note": "vLLM's automatic prefix caching is on for both (vLLM's default: a careful user gets "
                              "it free); vLLM's " + _and(resets) + " caches are emptied before every "
                              "warm-up and timed phase, so neither loop is served what the other computed",
                "caches_reset": list(resets),
            })
        figures["stage_speedup"] = stage_speedups(figures["engine_stage_s_per_image"],
                                                  figures["naive_stage_s_per_image"])
    block = getattr(vlm, "block_size", None) or (1 if args.backend == "transformers" else None)
    hit_rate = refine["cached"] / refine["shared"] if refine["shared"] else None
    hit_source = "all refinement rounds"
    if args.backend == "vllm":
        # vLLM's count for an n>1 request also holds the samples reusing their own prompt, so the
        # cross-round figure is measured apart: fresh queries, one sample per prompt
        probe = prefix_probe(cfg, emb, index, vlm, probe_queries)
        figures["prefix_probe"] = probe
        hit_rate = probe["hit_rate"]
        hit_source = (f"probe: the same S, T, R={cfg.vlm.candidates}, L={cfg.vlm.rounds} with the R candidates "
                      f"as one list (n=1) on {len(probe_queries)} fresh images; vLLM counts n>1 siblings as cached")
        figures["refine_cached_tokens_note"] = (
            "vLLM's num_cached_tokens for an n>1 request also counts the R-1 sibling samples reusing "
            "their own prompt, so refine_cached_tokens includes those and can exceed "
            "refine_cacheable_tokens; the hit rate comes from prefix_probe instead")
    figures.update({
        "refine_prompt_tokens": refine["prompt"], "refine_cacheable_tokens": refine["shared"],
        "refine_cached_tokens": refine["cached"], "block_size": block,
        "prefix_cache_hit_rate": round(hit_rate, 4) if hit_rate is not None else None,
        "prefix_cache_hit_rate_source": hit_source,
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": peak_gpu_mb(),
        "pipelines": pipelines, "batch": args.batch, "images": n, "S": args.S, "T": args.T, "R": args.R,
        "L": args.L, "repeats": repeats, "warmup_runs": args.warmup, "quick": bool(args.quick),
        "backend": args.backend, "device_arg": args.device,
        "model": "tiny-idefics2" if not args.model else args.model, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "latency_note": "engine p50 is the wall time of the batch each image is in (batching trades latency "
                        "for throughput); naive p50 is one image's own time",
    })
    # a round the engine lost to a VLM error (the batch's call failed) is work it did not do
    figures["engine_vlm_errors"] = sum(any(n.startswith("VLM error") for n in r.notes) for r in rows)
    figures["mode"] = "parallel" if args.parallel else "list"
    figures["distinct_per_round"] = distinct_per_round(rows)
    if not args.no_mode_probe:
        figures["mode_probe"] = mode_probe(cfg, emb, index, vlm, probe_queries)
    figures["limits"] = achieved_fractions(model_dir, figures, vlm)
    print_report(figures)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    if args.out:
        name = args.name or ("loop-vllm" if args.backend == "vllm" else "loop")
        paths = write_results(name, figures, markdown(figures), lambda: plot(figures))
        print(f"results: {paths}", file=sys.stderr)
    print(json.dumps(figures))
    return figures


class Tally:
    """The engine's figures summed over the results of the timed runs."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.refine = {"prompt": 0, "shared": 0, "cached": 0}
        self.pipelines: dict[str, int] = {}
        self.generated = self.prompt = 0

    def add(self, r: Any) -> None:
        self.pipelines[r.pipeline] = self.pipelines.get(r.pipeline, 0) + 1
        self.generated += r.extra.get("tokens", {}).get("generated", 0)
        self.prompt += r.extra.get("tokens", {}).get("prompt", 0)
        for k, v in r.timings.items():
            self.stages[k] = self.stages.get(k, 0.0) + v
        for t in r.extra.get("tokens_by_round", []):
            if t["round"] >= 1:  # refinement rounds: what a prefix cache can serve
                for key in self.refine:
                    self.refine[key] += t[key]


STAGES = ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score")


def stage_speedups(engine: dict[str, float], naive: dict[str, float]) -> dict[str, float | None]:
    """naive / engine seconds per image, per stage (None where the engine's time is 0)."""
    return {k: round(naive[k] / engine[k], 3) if engine.get(k) else None
            for k in STAGES if k in engine and k in naive}


def prefix_probe(cfg: Any, emb: Any, index: Any, vlm: Any, queries: list[str]) -> dict[str, Any]:
    """The refinement rounds' prompt tokens served from the cache, against those they share with
    an earlier round, at the run's S, T, R and L, with the R candidates asked for as one list
    (one sample per prompt: vLLM's cached count is then the prompt's own)."""
    import dataclasses

    v = cfg.vlm
    probe_cfg = dataclasses.replace(cfg, vlm=dataclasses.replace(v, parallel=False))  # the limit: automatic
    engine = Cropper.from_config(probe_cfg, embedder=emb, index=index, vlm=vlm)
    tot = {"prompt": 0, "shared": 0, "cached": 0}
    for out in engine.crop_batch([CropRequest(q, Task.FREE, id=Path(q).name) for q in queries]):
        for r in out:
            for t in r.extra.get("tokens_by_round", []):
                if t["round"] >= 1:
                    for k in tot:
                        tot[k] += t[k]
    tot["hit_rate"] = round(tot["cached"] / tot["shared"], 4) if tot["shared"] else None
    return tot


def distinct_per_round(rows: list[Any]) -> list[dict[str, Any]]:
    """Per round, the mean number of usable boxes the VLM gave per image and of distinct ones
    (after the dedupe at loop.nms_iou), from the rows' `distinct_by_round`."""
    acc: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        for d in r.extra.get("distinct_by_round", []):
            acc.setdefault(d["round"], []).append((d["boxes"], d["distinct"]))
    return [{"round": k, "boxes": round(float(np.mean([b for b, _ in v])), 2),
             "distinct": round(float(np.mean([d for _, d in v])), 2), "images": len(v)} for k, v in sorted(acc.items())]


def mode_probe(cfg: Any, emb: Any, index: Any, vlm: Any, queries: list[str]) -> dict[str, Any]:
    """Both ways of getting R candidates on the same fresh images (one batch, after a warm-up on
    the first): one answer listing R boxes (the default) and R one-box samples (vlm.parallel).
    Distinct candidates per round and images/s for each. The tiny model's random weights make its
    samples differ; a trained model's samples at the loop's temperature mostly agree (the test
    double in tests/test_loop_paper.py shows what that does to the parallel mode)."""
    import dataclasses

    out: dict[str, Any] = {"images": len(queries)}
    for mode, parallel in (("list", False), ("parallel", True)):
        probe_cfg = dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, parallel=parallel))
        engine = Cropper.from_config(probe_cfg, embedder=emb, index=index, vlm=vlm)
        reqs = [CropRequest(q, Task.FREE, id=Path(q).name) for q in queries]
        engine.crop_batch(reqs[:1])  # warm-up
        t0 = time.perf_counter()
        res = [r for o in engine.crop_batch(reqs) for r in o]
        wall = time.perf_counter() - t0
        out[mode] = {"images_per_s": round(len(reqs) / wall, 3), "distinct_per_round": distinct_per_round(res),
                     "generated_tokens_per_image": round(
                         sum(r.extra.get("tokens", {}).get("generated", 0) for r in res) / max(len(res), 1), 1)}
    return out


def _resized(paths: list[str], side: int, work: Path) -> list[str]:
    from PIL import Image

    out = []
    for k, p in enumerate(paths):
        im = open_image(p).image
        s = side / max(im.size)
        dst = work / f"q{k}-{Path(p).name}"
        im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS).save(dst, quality=92)
        out.append(str(dst))
    return out


def achieved_fractions(model_dir: str, fig: dict[str, Any], vlm: Any) -> dict[str, Any]:
    """Each VLM stage's time against the device limit from the cost model (bench/costmodel.py)."""
    from bench.costmodel import Shape, device_limits

    try:
        shape = Shape.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, KeyError, ValueError):
        return {}
    lim = device_limits()
    st = fig["engine_stage_s_per_image"]
    new_tokens = fig["prompt_tokens_per_image"] - (fig["refine_cached_tokens"] / max(fig["images"] * fig["repeats"], 1))
    edge = getattr(vlm, "longest_edge", None) or shape.image_size
    misses = getattr(vlm, "image_cache_misses", 0) / max(fig["images"] * (fig["repeats"] + 1), 1)
    model = {
        "vision": misses * shape.vision_flops(edge) / lim["flops"],
        "prefill": shape.prefill_flops(int(new_tokens)) / lim["flops"],
        "decode": fig["engine_tokens_per_image"] * shape.decode_bytes(1, int(fig["prompt_tokens_per_image"] / 3))
        / lim["bandwidth"],
    }
    out = {"device": lim["name"], "peak_tflops": round(lim["flops"] / 1e12, 3),
           "bandwidth_gbs": round(lim["bandwidth"] / 1e9, 1)}
    for k, limit in model.items():
        t = st.get(f"vlm_{k}")
        out[k] = {"limit_s": round(limit, 6), "measured_s": t,
                  "fraction_of_limit": round(limit / t, 4) if t else None}
    return out


def print_report(f: dict[str, Any]) -> None:
    es, ns = f["engine_stage_s_per_image"], f.get("naive_stage_s_per_image", {})
    sp = f.get("stage_speedup", {})
    print(f"\n{'stage':<14} {'engine s/img':>13} {'naive s/img':>12} {'speed-up':>9}")
    keys = ["decode", "embed", "retrieve", "saliency", "prompt", "generate", "vlm_vision", "vlm_prefill",
            "vlm_decode", "score"]
    for k in keys:
        if k in es or k in ns:
            x = f"{sp[k]:.2f}x" if sp.get(k) else ""
            print(f"{k:<14} {es.get(k, 0.0):>13.4f} {ns.get(k, 0.0) if k in ns else float('nan'):>12.4f} {x:>9}")
    print(f"\n{'':<22} {'engine':>10} {'naive':>10}")
    print(f"{'images/s':<22} {f['engine_images_per_s']:>10.3f} {f.get('naive_images_per_s', float('nan')):>10.3f}")
    print(f"{'p50 s/image':<22} {f['engine_p50_s']:>10.3f} {f.get('naive_p50_s', float('nan')):>10.3f}")
    print(f"{'p95 s/image':<22} {f['engine_p95_s']:>10.3f} {f.get('naive_p95_s', float('nan')):>10.3f}")
    print(f"{'generated tokens/img':<22} {f['engine_tokens_per_image']:>10.1f} "
          f"{f.get('naive_tokens_per_image', float('nan')):>10.1f}")
    if "speedup" in f:
        print(f"speedup {f['speedup']:.2f}x   pipelines {f['pipelines']}   prompt tokens/img "
              f"{f['prompt_tokens_per_image']:.0f}")
    print(f"prefix cache, refinement rounds: prompt tokens {f['refine_prompt_tokens']}, shared with an earlier "
          f"prompt (cacheable) {f['refine_cacheable_tokens']}, served from the cache {f['refine_cached_tokens']}, "
          f"block size {f['block_size']}, hit rate {f['prefix_cache_hit_rate']} "
          f"({f.get('prefix_cache_hit_rate_source', 'all refinement rounds')})")
    if f.get("prefix_probe"):
        p = f["prefix_probe"]
        print(f"  (vLLM, measured with one sample per prompt: the refinement rounds share {p['shared']} of "
              f"{p['prompt']} prompt tokens with earlier rounds, {p['cached']} served from the cache)")
    lim = f.get("limits") or {}
    if lim:
        print(f"limits ({lim['device']}, {lim['peak_tflops']} TFLOP/s, {lim['bandwidth_gbs']} GB/s): " + ", ".join(
            f"{k} {v['fraction_of_limit']}" for k, v in lim.items() if isinstance(v, dict)) + " of the limit")
    def per_round(d: list[dict[str, Any]]) -> str:
        return " / ".join(f"{x['distinct']:g} of {x['boxes']:g}" for x in d) or "-"

    print(f"distinct candidates per round ({f['mode']} mode, mean per image): {per_round(f['distinct_per_round'])}")
    for mode in ("list", "parallel"):
        m = (f.get("mode_probe") or {}).get(mode)
        if m:
            print(f"  probe, {mode} mode: {per_round(m['distinct_per_round'])} distinct per round, "
                  f"{m['images_per_s']} images/s, {m['generated_tokens_per_image']} generated tokens/image")
    print(f"peak RSS {f['peak_rss_mb']} MB, peak GPU {f['peak_gpu_mb']} MB")


def markdown(f: dict[str, Any]) -> str:
    es, ns = f["engine_stage_s_per_image"], f.get("naive_stage_s_per_image", {})
    sp = f.get("stage_speedup", {})
    lines = [f"# loop benchmark ({f['backend']}, {f['model']}, batch {f['batch']}, S={f['S']} T={f['T']} "
             f"R={f['R']} L={f['L']})", "",
             "| stage | engine s/image | naive s/image | speed-up |", "|---|---|---|---|"]
    for k in sorted(set(es) | set(ns)):
        x = f"{sp[k]}x" if sp.get(k) else ""
        lines.append(f"| {k} | {es.get(k, float('nan')):.4f} | {ns.get(k, float('nan')):.4f} | {x} |")
    lines += ["", "| figure | engine | naive |", "|---|---|---|",
              f"| images/s | {f['engine_images_per_s']} | {f.get('naive_images_per_s')} |",
              f"| p50 s/image | {f['engine_p50_s']} | {f.get('naive_p50_s')} |",
              f"| p95 s/image | {f['engine_p95_s']} | {f.get('naive_p95_s')} |",
              f"| generated tokens/image | {f['engine_tokens_per_image']} | {f.get('naive_tokens_per_image')} |",
              "", f"speedup: {f.get('speedup')}; prefix-cache hit rate: "
              f"{f['prefix_cache_hit_rate']} ({f.get('prefix_cache_hit_rate_source', 'all refinement rounds')}; "
              f"block size {f['block_size']}); peak RSS {f['peak_rss_mb']} MB; "
              f"{f['warmup_runs']} warm-up run(s) of each loop, then {f['repeats']} timed"]
    if f.get("naive_backend") == "vllm":
        lines += ["", f"Naive loop: {f['naive_loop']}.", "",
                  f"Interleaved: {f['interleaving']} ({'; '.join(f.get('timed_order', []))}).", "",
                  f"Caches: {f['cache_note']}."]
    dist = " / ".join(f"{x['distinct']:g} of {x['boxes']:g}" for x in f.get("distinct_per_round", []))
    lines += ["", f"Engine mode: {f.get('mode', 'list')}; distinct candidates per round (mean per image, of the "
              f"usable boxes the VLM gave): {dist or '-'}"]
    for mode in ("list", "parallel"):
        m = (f.get("mode_probe") or {}).get(mode)
        if m:
            d = " / ".join(f"{x['distinct']:g} of {x['boxes']:g}" for x in m["distinct_per_round"])
            lines.append(f"- probe ({f['mode_probe']['images']} fresh images), {mode} mode: {d} distinct per round, "
                         f"{m['images_per_s']} images/s, {m['generated_tokens_per_image']} generated tokens/image")
    if f.get("refine_cached_tokens_note"):
        lines += ["", f"refine_cached_tokens {f['refine_cached_tokens']} of {f['refine_cacheable_tokens']} cacheable: "
                  f"{f['refine_cached_tokens_note']}."]
    lim = f.get("limits") or {}
    stages = [k for k in ("vision", "prefill", "decode") if isinstance(lim.get(k), dict)]
    if stages:
        lines += ["", f"Achieved fraction of the limit ({lim.get('device')}; docs/COST_MODEL.md):", "",
                  "| VLM stage | measured s/image | limit s/image | fraction of the limit |", "|---|---|---|---|"]
        for k in stages:
            d = lim[k]
            lines.append(f"| {k} | {d.get('measured_s')} | {d.get('limit_s')} | {d.get('fraction_of_limit')} |")
    return "\n".join(lines) + "\n"


def plot(f: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    es, ns = f["engine_stage_s_per_image"], f.get("naive_stage_s_per_image", {})
    keys = [k for k in ("decode", "embed", "retrieve", "saliency", "prompt", "generate", "score") if k in es or k in ns]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [es.get(k, 0) for k in keys], 0.4, label="engine")
    if ns:
        ax.bar(x + 0.2, [ns.get(k, 0) for k in keys], 0.4, label="naive" + (
            " (vLLM, one request per image per round, interleaved)" if f.get("naive_backend") == "vllm" else ""))
    ax.set_xticks(x, keys)
    ax.set_ylabel("seconds per image")
    ax.set_title(f"loop: {f['engine_images_per_s']:.2f} vs {f.get('naive_images_per_s', 0):.2f} images/s")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
