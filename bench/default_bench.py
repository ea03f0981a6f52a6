"""The no-VLM default pipeline, end to end, on 1024-px images: milliseconds per image per stage,
side by side with smartcrop.py (the peer people use).

    python bench/default_bench.py [--quick] [--n 50] [--side 1024] [--tasks ratio,free] [--no-peer] [--out [PATH]]

Inputs: FCDB val images (../shared/data/fcdb) resized so the longest side is `--side` (1024:
most are 800 px, so upscaled; `--side 0` keeps them as they are) and written as JPEG (quality
92) to a temporary folder, else the sample photos at that size. Each image is cropped alone
(`Cropper.crop_batch` with one request, as `cropper-engine crop photo.jpg` does) with the
default configuration and no VLM (faces kept whole where MediaPipe is installed): decode, face
detection, classical descriptor, retrieval in the built-in table, saliency, the image analysis,
candidates, features, the fitted trees and the choice. The ratio task gets the ground truth's
ratio (4:3 for the samples). `wall` is the whole call, measured outside; the stages are the
engine's own timings. Model loading (once per process) is reported apart.

The peer: smartcrop.py (PyPI `smartcrop`, the `bench` extra), run as its command line does
(`SmartCrop().crop(image, 100, 100 / ratio)`, the image opened from the same JPEG file), on the
same images with the same ratio, interleaved with the default image by image in this process,
so both see the same machine load. Reported: both one's wall times, the ratio of the medians
(default / smartcrop: under 1 means the default is faster) and, on FCDB, both one's IoU with the
ground truth. Also reported: the same figures over the images in which faces were found (kept
whole, so their candidates are constrained: the slower case) and the process's CPU time per image
(wall time can be lower than CPU time where a library runs threads). The last line printed is one
JSON object with the figures. The limit is 60 ms per 1024-px image (issue 14's target): `ok` when
every task's median wall time is within it. With `--out` the figures, with
provenance (git, machine, versions, load), are also written to bench/results/default_bench.json
(or PATH) and a markdown table beside it (.md).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, peak_rss_mb, save_json  # noqa: E402  (first: it notes the load at the start)
from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.types import CropRequest, Ratio, Task  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = RESULTS / "default_bench.json"
LIMIT_MS = 60.0
LIMIT_STAT = "wall_ms_median"


def prepare(data: Path, n: int, side: int, work: Path) -> list[tuple[str, Ratio, Any]]:
    """(path, ratio, ground-truth box in the written image's pixels or None) per input."""
    from PIL import Image

    from cropper_engine.types import Box

    out: list[tuple[str, Ratio, Any]] = []
    if (data / "val.jsonl").exists():
        rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines() if line.strip()][:n]
        items = [(data / "images" / r["image"], Ratio(r["crop"][2] - r["crop"][0], r["crop"][3] - r["crop"][1]),
                  Box(*(float(v) for v in r["crop"]))) for r in rows]
    else:
        from cropper_engine.samples import write_samples

        paths = write_samples(work / "samples")
        items = [(Path(paths[k % len(paths)]), Ratio(4, 3), None) for k in range(n)]
    for k, (src, ratio, gt) in enumerate(items):
        with Image.open(src) as im:
            im = im.convert("RGB")
            s = side / max(im.size) if side else 1.0
            if s != 1.0:
                im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.BICUBIC)
            dst = work / f"img{k:04d}.jpg"
            im.save(dst, quality=92)
        out.append((str(dst), ratio, gt.scale(s) if gt is not None else None))
    return out


def peer() -> Any:
    """smartcrop.py's cropper, or None where the bench extra is not installed."""
    try:
        import smartcrop
    except ImportError:
        return None
    return smartcrop.SmartCrop()


def peer_crop(sc: Any, path: str, ratio: Ratio) -> Any:
    """smartcrop.py as its command line runs it: the image from its file, a 100-px-wide target."""
    from PIL import Image

    from cropper_engine.types import Box

    with Image.open(path) as im:
        img = im.convert("RGB")
    c = sc.crop(img, 100, max(1, round(100 / ratio.value)))["top_crop"]
    return Box(c["x"], c["y"], c["x"] + c["width"], c["y"] + c["height"])


def summarise(walls: list[float], stages: list[dict[str, float]]) -> dict[str, Any]:
    keys = sorted({k for s in stages for k in s if k != "total"})
    return {
        "images": len(walls),
        "wall_ms_mean": round(1000 * statistics.fmean(walls), 1),
        "wall_ms_median": round(1000 * statistics.median(walls), 1),
        "wall_ms_p90": round(1000 * sorted(walls)[int(0.9 * (len(walls) - 1))], 1),
        "stages_ms": {k: round(1000 * statistics.fmean(s.get(k, 0.0) for s in stages), 2) for k in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 images (under a minute)")
    ap.add_argument("--n", type=int, default=100, help="images")
    ap.add_argument("--side", type=int, default=1024, help="longest side of the inputs, px")
    ap.add_argument("--tasks", default="ratio,free", help="ratio, free or both")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the FCDB folder")
    ap.add_argument("--no-peer", action="store_true", help="do not run smartcrop.py beside the default")
    ap.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None, metavar="PATH",
                    help=f"also write the figures (JSON) and a markdown table beside them [PATH: {DEFAULT_OUT}]")
    a = ap.parse_args()
    n = 20 if a.quick else a.n
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]

    from cropper_engine.engine.loop import Cropper

    with tempfile.TemporaryDirectory() as tmp:
        items = prepare(Path(a.data), n, a.side, Path(tmp))
        t0 = time.perf_counter()
        cropper = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))
        from cropper_engine.models.default_model import default_model

        default_model()
        load_s = time.perf_counter() - t0
        sc = None if a.no_peer else peer()
        for path, ratio, _ in items[:2]:  # warm-up: lazy imports, the table's metadata, caches
            cropper.crop_batch([CropRequest(path, Task.RATIO, [ratio])])
            cropper.crop_batch([CropRequest(path, Task.FREE)])
            if sc is not None:
                peer_crop(sc, path, ratio)
        inputs = "FCDB val" if (Path(a.data) / "val.jsonl").exists() else "sample photos"
        figures: dict[str, Any] = {"side": a.side, "inputs": inputs, "load_ms": round(1000 * load_s, 1),
                                   "pipeline": cropper.describe()["pipeline"],
                                   "index": (cropper.describe()["index"] or {}).get("source"), "tasks": {}}
        for task in tasks:
            walls, stages, ious, peer_walls, peer_ious, face_walls = [], [], [], [], [], []
            cpu = 0.0
            for path, ratio, gt in items:
                req = CropRequest(path, Task.RATIO, [ratio]) if task == "ratio" else CropRequest(path, Task.FREE)
                c, t = time.process_time(), time.perf_counter()
                res = cropper.crop_batch([req])[0]
                walls.append(time.perf_counter() - t)
                cpu += time.process_time() - c
                if res[0].extra.get("faces"):  # type: ignore[index]
                    face_walls.append(walls[-1])
                stages.append(dict(res[0].timings))  # type: ignore[index]
                if gt is not None:
                    ious.append(res[0].box.iou(gt))  # type: ignore[index]
                if sc is not None and task == "ratio":  # interleaved: the same load for both
                    t = time.perf_counter()
                    box = peer_crop(sc, path, ratio)
                    peer_walls.append(time.perf_counter() - t)
                    if gt is not None:
                        peer_ious.append(box.iou(gt))
            f = figures["tasks"][task] = summarise(walls, stages)
            f["cpu_ms_mean"] = round(1000 * cpu / len(walls), 1)
            if face_walls:
                f["with_faces"] = {"images": len(face_walls),
                                   "wall_ms_median": round(1000 * statistics.median(face_walls), 1),
                                   "wall_ms_p90": round(1000 * sorted(face_walls)[int(0.9 * (len(face_walls) - 1))], 1)}
            if ious:
                f["iou"] = round(statistics.fmean(ious), 4)
            if peer_walls:
                p = {"name": "smartcrop.py", "version": _version("smartcrop"),
                     "wall_ms_mean": round(1000 * statistics.fmean(peer_walls), 1),
                     "wall_ms_median": round(1000 * statistics.median(peer_walls), 1),
                     "wall_ms_p90": round(1000 * sorted(peer_walls)[int(0.9 * (len(peer_walls) - 1))], 1)}
                if peer_ious:
                    p["iou"] = round(statistics.fmean(peer_ious), 4)
                f["peer"] = p
                f["median_ratio_to_peer"] = round(f["wall_ms_median"] / max(p["wall_ms_median"], 1e-9), 2)
    for f in figures["tasks"].values():
        f["ok"] = f[LIMIT_STAT] <= LIMIT_MS
    figures.update({"limit_ms": LIMIT_MS, "limit_stat": LIMIT_STAT,
                    "ok": all(f["ok"] for f in figures["tasks"].values()),
                    "quick": bool(a.quick), "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})

    print(f"no-VLM default, {n} images at {a.side} px (longest side), one image per call, "
          f"model load {figures['load_ms']:.0f} ms")
    for task, f in figures["tasks"].items():
        st = "  ".join(f"{k} {v:.1f}" for k, v in f["stages_ms"].items())
        print(f"{task:6s} wall {f['wall_ms_mean']:.1f} ms/image (median {f['wall_ms_median']:.1f}, "
              f"p90 {f['wall_ms_p90']:.1f}), CPU {f['cpu_ms_mean']:.1f} ms/image   stages ms: {st}")
        if "with_faces" in f:
            wf = f["with_faces"]
            print(f"       the {wf['images']} images with faces: median {wf['wall_ms_median']:.1f} ms, "
                  f"p90 {wf['wall_ms_p90']:.1f}")
        if "peer" in f:
            p = f["peer"]
            print(f"       smartcrop.py {p['wall_ms_mean']:.1f} ms/image (median {p['wall_ms_median']:.1f}, p90 "
                  f"{p['wall_ms_p90']:.1f}); default / smartcrop.py (medians) {f['median_ratio_to_peer']:.2f}x; "
                  f"IoU {f.get('iou', float('nan')):.3f} vs {p.get('iou', float('nan')):.3f}")
    if a.out:
        write(Path(a.out), figures, n)
    print(json.dumps(figures))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def write(path: Path, figures: dict[str, Any], n: int) -> None:
    """PATH (JSON, with provenance) and PATH.md, as bench.common.write_results writes them."""
    out = {"bench": "default", **figures, "peak_rss_mb": round(peak_rss_mb(), 1)}
    save_json(path, out)
    out = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(out, n))
    print(f"results: {path}, {path.with_suffix('.md')}", file=sys.stderr)


def markdown(f: dict[str, Any], n: int) -> str:
    keys = sorted({k for t in f["tasks"].values() for k in t["stages_ms"]})
    lines = [f"# no-VLM default pipeline ({n} images at {f['side']} px, one image per call)", "",
             "| task | wall ms/image mean | median | p90 | " + " | ".join(keys) + " | ok |",
             "|---" * (len(keys) + 5) + "|"]
    for task, t in f["tasks"].items():
        lines.append(f"| {task} | {t['wall_ms_mean']} | {t['wall_ms_median']} | {t['wall_ms_p90']} | "
                     + " | ".join(str(t["stages_ms"].get(k, "")) for k in keys) + f" | {t['ok']} |")
    peers = [(task, t) for task, t in f["tasks"].items() if "peer" in t]
    if peers:
        lines += ["", "| task | default ms (mean / median / p90) | smartcrop.py ms (mean / median / p90) | "
                  "default / smartcrop.py (medians) | IoU default | IoU smartcrop.py |", "|---|---|---|---|---|---|"]
        for task, t in peers:
            p = t["peer"]
            lines.append(f"| {task} | {t['wall_ms_mean']} / {t['wall_ms_median']} / {t['wall_ms_p90']} | "
                         f"{p['wall_ms_mean']} / {p['wall_ms_median']} / {p['wall_ms_p90']} | "
                         f"{t['median_ratio_to_peer']}x | {t.get('iou', '-')} | {p.get('iou', '-')} |")
    lines += ["", f"stages in ms per image (the engine's timings); limit {f['limit_ms']:.0f} ms per image "
              f"({f['limit_stat']}): {'ok' if f['ok'] else 'NOT met'}; model load {f['load_ms']} ms; "
              f"pipeline {f['pipeline']}; {f['cores']} cores, load {f['load_avg_1m']} "
              f"({f['provenance']['machine']['note']}); commit {f['provenance']['git']['commit'][:10]}, "
              f"{f['provenance']['created']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
