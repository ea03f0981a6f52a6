"""Benchmark of the example index on synthetic unit vectors: build, load, query, recall, memory.

    python bench/index_bench.py [--quick] [--embedders LIST] [--embedder SPEC] [--sizes 10000,100000] [--out [PATH]]

Two seeded 512-d distributions:
- clustered: 1,000 Gaussian clusters, centres uniform on the sphere, points = centre +
  N(0, sigma^2 I) with sigma = sqrt(1 / (3 D)) (0.0255 at D = 512), then normalised. Then
  |noise|^2 ~ 1/3, so two points of one cluster have cosine ~1/(1 + 1/3) = 0.75 and a point
  has cosine ~0.87 with its centre, while points of different clusters are near 0: like CLIP
  neighbours of similar photos. The targets must hold here.
- uniform: uniform on the sphere, the worst case for any graph index (reported only).
Queries are held-out points of the same distribution. The graph is built over the vectors
directly (`build_graph`), then saved, loaded and queried through `ExampleIndex`, so loading
and querying take the real code path. Targets (2 cores): recall@30 >= 0.99 against exact
search at the default ef, single-query p50 <= 1 ms and load (+ first query) <= 1 s at 100k.

Embedders (images/s on 64 random 512x384 images in batches of 32, on the CPU, built and warmed
up before timing; the load time is reported apart), all available offline: `classical` (the
hand-crafted descriptor), `tiny_open_clip` (the tiny random open_clip the project builds itself,
cropper_engine.models.tiny.make_tiny_clip), `vit_b32_random` (open_clip ViT-B-32 with random
weights: the shape of the paper's retrieval model; skipped with --quick). `--embedder SPEC` times
one more (any load_embedder spec). They are in the JSON under "embedders".

Prints a table, then as its last line one JSON object with every figure; with `--out` it is also
written to bench/results/index_bench.json (or PATH).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, save_json  # first: it notes the load at the start
from cropper_engine.index.store import (
    DEFAULT_EF,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EXACT_BELOW,
    DEFAULT_M,
    ExampleIndex,
    build_graph,
)

DIM = 512
CLUSTERS = 1000
K = 30
TARGET_RECALL = 0.99
TARGET_P50_MS = 1.0
TARGET_LOAD_S = 1.0
EMBEDDER = {"id": "synthetic", "dim": DIM}
DEFAULT_OUT = RESULTS / "index_bench.json"
OFFLINE_EMBEDDERS = ("classical", "tiny_open_clip", "vit_b32_random")
QUICK_EMBEDDERS = ("classical", "tiny_open_clip")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle() -> int:
    """Collect garbage and hand freed heap back to the OS, so an RSS delta shows new memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def sigma_for(dim: int) -> float:
    return math.sqrt(1.0 / (3.0 * dim))


def generate(kind: str, n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors of one distribution; the cluster centres depend on the dim only."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    centres = None
    if kind == "clustered":
        centres = np.random.default_rng(12345).standard_normal((CLUSTERS, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = sigma_for(dim)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is not None:
            x *= sigma
            x += centres[rng.integers(0, CLUSTERS, m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    rows = max(1, (1 << 26) // len(base))
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), rows):
        sims = queries[s : s + rows] @ base.T
        out[s : s + rows] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def bench_one(kind: str, n: int, nq: int, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    base = generate(kind, n, DIM, seed=1000 + n)
    queries = generate(kind, nq, DIM, seed=7)
    truth = exact_topk(base, queries, K)
    prep_s = time.perf_counter() - t0

    rss0 = settle()
    t0 = time.perf_counter()
    graph = build_graph(base, M=DEFAULT_M, ef_construction=DEFAULT_EF_CONSTRUCTION)
    build_s = time.perf_counter() - t0
    rss_build = rss_bytes() - rss0

    rows = [{"id": f"{kind[0]}{i}", "image": "", "width": 1, "height": 1, "crops": []} for i in range(n)]
    path = workdir / f"{kind}-{n}"
    t0 = time.perf_counter()
    ExampleIndex.from_vectors(base, rows, path, embedder=EMBEDDER, graph=graph, overwrite=True)
    save_s = time.perf_counter() - t0
    del graph, rows, base
    rss0 = settle()
    t0 = time.perf_counter()
    index = ExampleIndex.load(path, EMBEDDER["id"])
    load_only_s = time.perf_counter() - t0
    index.query(queries[0], K, exact=False)
    load_s = time.perf_counter() - t0
    rss_load = rss_bytes() - rss0

    lat = np.empty(nq)
    found = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        res = index.query(q, K, exact=False)[0]
        lat[i] = time.perf_counter() - t
        found.append({nb.row for nb in res})
    recall = float(np.mean([len(f & set(tr.tolist())) / K for f, tr in zip(found, truth, strict=True)]))

    n_exact = min(nq, 200 if n <= 100_000 else 20)
    exact_lat = np.empty(n_exact)
    for i in range(n_exact):
        t = time.perf_counter()
        index.query(queries[i], K, exact=True)
        exact_lat[i] = time.perf_counter() - t

    t = time.perf_counter()
    index.query(queries, K, exact=False)
    batch_qps = nq / (time.perf_counter() - t)

    default_exact = n < index.exact_below
    files = index.info()["files"]
    del index
    gc.collect()
    shutil.rmtree(path, ignore_errors=True)
    return {
        "dist": kind, "n": n, "queries": nq, "prep_s": round(prep_s, 2),
        "build_s": round(build_s, 2), "build_vectors_per_s": round(n / build_s, 1),
        "save_s": round(save_s, 3), "load_s": round(load_s, 4), "load_only_s": round(load_only_s, 4),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4),
        "recall_at_30": round(recall, 5),
        "default_search": "exact" if default_exact else "hnsw",
        "recall_at_30_default": 1.0 if default_exact else round(recall, 5),
        "exact_p50_ms": round(float(np.percentile(exact_lat, 50)) * 1e3, 3),
        "batch_queries_per_s": round(batch_qps, 1),
        "rss_build_mb": round(rss_build / 2**20, 1), "rss_load_mb": round(rss_load / 2**20, 1),
        "graph_mb": round(files.get("graph.bin", 0) / 2**20, 1),
        "vectors_mb": round(files.get("vectors.npy", 0) / 2**20, 1),
        "metadata_mb": round(files.get("metadata.jsonl", 0) / 2**20, 2),
    }


def bench_embedder(spec: str, n_images: int = 64, batch: int = 32, *, name: str | None = None,
                   factory: Callable[[], Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Images/s of one embedder: `spec` for load_embedder, or `factory` building it (`spec` then
    only names it in the figures)."""
    from PIL import Image

    from cropper_engine.models.embedders import load_embedder  # lazily: torch / open_clip load here

    t = time.perf_counter()
    embedder = factory() if factory is not None else load_embedder(spec, device=device)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)) for _ in range(n_images)]
    embedder.embed(images[:batch])  # warm-up
    t = time.perf_counter()
    for s in range(0, n_images, batch):
        embedder.embed(images[s : s + batch])
    dt = time.perf_counter() - t
    return {"name": name or spec, "spec": spec, "id": embedder.id, "dim": embedder.dim,
            "device": str(getattr(embedder, "device", device)), "images": n_images, "batch": batch,
            "load_s": round(load_s, 2), "images_per_s": round(n_images / dt, 2)}


def bench_offline_embedders(names: list[str], workdir: Path) -> list[dict[str, Any]]:
    """The embedders that need no download: classical, the tiny open_clip, ViT-B-32 random."""
    out = []
    for name in names:
        log(f"[index-bench] embedder {name} ...")
        try:
            if name == "classical":
                r = bench_embedder("classical", name=name)
            elif name == "tiny_open_clip":
                from cropper_engine.models.tiny import make_tiny_clip

                tiny = make_tiny_clip(workdir / "tiny_clip", seed=0)
                if "open_clip" not in tiny:
                    raise RuntimeError("open_clip is not installed here")
                r = bench_embedder("open_clip-dir:TINY", name=name,
                                   factory=lambda d=tiny["open_clip"]: _load(f"open_clip-dir:{d}"))
                r["source"] = "cropper_engine.models.tiny.make_tiny_clip(seed=0)"
            else:  # vit_b32_random
                from cropper_engine.models.clip import OpenClipEmbedder

                r = bench_embedder("open_clip:ViT-B-32 (random weights)", name=name,
                                   factory=lambda: OpenClipEmbedder("ViT-B-32", pretrained=None, device="cpu"))
        except Exception as exc:  # one that cannot be built here is reported, not fatal
            r = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        log(f"[index-bench]   {r.get('images_per_s', r.get('error'))} images/s")
        out.append(r)
    return out


def _load(spec: str) -> Any:
    from cropper_engine.models.embedders import load_embedder

    return load_embedder(spec, device="cpu")


COLUMNS = [("dist", "dist", "{}"), ("n", "n", "{}"), ("build_s", "build s", "{:.1f}"),
           ("build_vectors_per_s", "vec/s", "{:.0f}"), ("save_s", "save s", "{:.2f}"),
           ("load_s", "load s", "{:.3f}"), ("p50_ms", "p50 ms", "{:.3f}"), ("p99_ms", "p99 ms", "{:.3f}"),
           ("recall_at_30", "recall@30", "{:.4f}"), ("default_search", "default", "{}"),
           ("exact_p50_ms", "exact p50 ms", "{:.2f}"), ("batch_queries_per_s", "batch q/s", "{:.0f}"),
           ("graph_mb", "graph MB", "{:.0f}"), ("vectors_mb", "vec MB", "{:.0f}"),
           ("rss_build_mb", "RSS build MB", "{:.0f}"), ("rss_load_mb", "RSS load MB", "{:.0f}")]


def table(results: list[dict[str, Any]]) -> str:
    cells = [[h for _, h, _ in COLUMNS]] + [[f.format(r[k]) for k, _, f in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only (a few minutes)")
    ap.add_argument("--sizes", help="comma-separated sizes, e.g. 10000,100000 (overrides --quick)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dists", default="clustered,uniform")
    ap.add_argument("--embedder", help="also time this embedder spec (images/s)")
    ap.add_argument("--embedders", help=f"offline embedders to time, comma-separated, or 'none' "
                    f"[default: {','.join(OFFLINE_EMBEDDERS)}; --quick: {','.join(QUICK_EMBEDDERS)}]")
    ap.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None, metavar="PATH",
                    help=f"also write the JSON figures to PATH [{DEFAULT_OUT}]")
    ap.add_argument("--workdir", help="where to write the indexes (default: a temp folder)")
    args = ap.parse_args(argv)

    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    names = ([] if args.embedders == "none" else [e.strip() for e in args.embedders.split(",") if e.strip()]
             if args.embedders else list(QUICK_EMBEDDERS if args.quick else OFFLINE_EMBEDDERS))
    unknown = sorted(set(names) - set(OFFLINE_EMBEDDERS))
    if unknown:
        ap.error(f"unknown embedder(s) {', '.join(unknown)}; known: {', '.join(OFFLINE_EMBEDDERS)} or none")
    t_all = time.perf_counter()
    results = []
    tmp_root = Path(tempfile.mkdtemp(prefix="index-bench-", dir=args.workdir))
    try:
        for kind in args.dists.split(","):
            for n in sizes:
                log(f"[index-bench] {kind} n={n} ...")
                r = bench_one(kind, n, args.queries, tmp_root)
                log(f"[index-bench]   build {r['build_s']} s, recall {r['recall_at_30']}, p50 {r['p50_ms']} ms")
                results.append(r)
        embedders = bench_offline_embedders(names, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    emb = bench_embedder(args.embedder, device="auto") if args.embedder else None
    if emb:
        embedders.append(emb)

    clustered = [r for r in results if r["dist"] == "clustered"]
    at_100k = [r for r in clustered if r["n"] == 100_000]
    targets = {
        "recall_clustered": bool(clustered) and all(r["recall_at_30"] >= TARGET_RECALL for r in clustered),
        "p50_100k": bool(at_100k) and at_100k[0]["p50_ms"] <= TARGET_P50_MS,
        "load_100k": bool(at_100k) and at_100k[0]["load_s"] <= TARGET_LOAD_S,
    }
    targets["all"] = all(targets.values())
    print(f"example index benchmark: D={DIM}, k={K}, M={DEFAULT_M}, ef_construction="
          f"{DEFAULT_EF_CONSTRUCTION}, ef={DEFAULT_EF}, exact below {DEFAULT_EXACT_BELOW} rows, "
          f"{os.cpu_count()} cores; clustered sigma={sigma_for(DIM):.4f}")
    print("(recall@30 and p50/p99 are HNSW, forced even where the default would search exactly; "
          "load = ExampleIndex.load + first query, warm page cache)")
    print(table(results))
    if embedders:
        print("embedders (CPU unless said, batches of 32): " + ", ".join(
            f"{e['name']} {e['images_per_s']} images/s" if "images_per_s" in e else f"{e['name']} failed ({e['error']})"
            for e in embedders))
    print("targets:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    summary = {
        "bench": "index", "dim": DIM, "k": K, "clusters": CLUSTERS, "sigma": round(sigma_for(DIM), 5),
        "M": DEFAULT_M, "ef_construction": DEFAULT_EF_CONSTRUCTION, "ef": DEFAULT_EF,
        "exact_below": DEFAULT_EXACT_BELOW, "cores": os.cpu_count(), "quick": bool(args.quick),
        "results": results, "embedders": embedders, "embedder": emb,
        "targets": {"recall_at_30": TARGET_RECALL, "p50_ms_100k": TARGET_P50_MS, "load_s_100k": TARGET_LOAD_S},
        "targets_met": targets, "seconds": round(time.perf_counter() - t_all, 1),
    }
    if args.out:
        save_json(args.out, summary)
        log(f"[index-bench] results: {args.out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
