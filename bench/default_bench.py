"""The no-VLM default pipeline, end to end, on 1024-px images: milliseconds per image per stage,
side by side with smartcrop.py (the peer people use).

    python bench/default_bench.py [--quick] [--n 50] [--side 1024] [--tasks ratio,free] [--no-peer] [--out [PATH]]
    python -m bench default --camera [--quick] [--n 30] [--work DIR] [--out [PATH]]    24-MP JPEGs

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

`--camera`: camera-size photos instead. The first N FCDB val images (30; 8 with --quick) are
enlarged to 6000 px on the longest side (bicubic; 24 MP at 3:2) and written as JPEG quality 90,
every third one stored on its side with an EXIF orientation (6 or 8, shown upright), to a
temporary folder (or --work DIR; never to the repository), the ground truth scaled with them.
The default finds the box on a reduced decode (JPEG draft, `Cropper.draft_side`); beside it,
interleaved image by image, smartcrop.py on the same file, and the default with a full decode as
it was before (`full_decode`: its wall time and IoU, and how far the boxes moved, in pixels of
the analysis's 160-px image). The limit: the ratio task's median at most 60 ms per image, the box
alone (no crop is cut or written). Written to bench/results/default_bench_camera.json with --out.
Both tools' CPU time per image is reported beside their wall time (the default runs face
detection, and from 256 candidates half the trees, in worker threads; smartcrop.py one thread).
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
CAMERA_OUT = RESULTS / "default_bench_camera.json"
LIMIT_MS = 60.0
LIMIT_STAT = "wall_ms_median"
CAMERA_SIDE = 6000  # px, the longest side of the camera-size inputs (6000 x 4000: 24 MP)
CAMERA_QUALITY = 90
# which threads each one runs (the CPU time per image, measured, says how busy they are)
THREADS = {"default": "the calling thread, a face-detection thread (MediaPipe, while the image is analysed) and, "
                      "from 256 candidates, a second thread scoring half of them with the trees",
           "smartcrop.py": "one thread"}


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


def prepare_camera(data: Path, n: int, work: Path, side: int = CAMERA_SIDE) -> list[tuple[str, Ratio, Any]]:
    """FCDB val images at camera size: enlarged to `side` px (bicubic), JPEG quality 90, every third
    one stored turned on its side with EXIF orientation 6 or 8 (shown upright as the others); the
    ground truth scaled with them (in the upright image's pixels)."""
    from PIL import Image

    from cropper_engine.types import Box

    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines() if line.strip()][:n]
    out: list[tuple[str, Ratio, Any]] = []
    for k, r in enumerate(rows):
        gt = Box(*(float(v) for v in r["crop"]))
        with Image.open(data / "images" / r["image"]) as im:
            im = im.convert("RGB")
            s = side / max(im.size)
            im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.BICUBIC)
        dst = work / f"camera{k:04d}.jpg"
        if k % 3 == 2:  # stored on its side: orientation 6 (shown turned 90 degrees clockwise) or 8
            orientation = 6 if k % 2 else 8
            exif = Image.Exif()
            exif[0x0112] = orientation
            turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
            im.transpose(turn).save(dst, quality=CAMERA_QUALITY, exif=exif)
        else:
            im.save(dst, quality=CAMERA_QUALITY)
        out.append((str(dst), Ratio(r["crop"][2] - r["crop"][0], r["crop"][3] - r["crop"][1]), gt.scale(s)))
    return out


def peer() -> Any:
    """smartcrop.py's cropper, or None where the bench extra is not installed."""
    try:
        import smartcrop
    except ImportError:
        return None
    return smartcrop.SmartCrop()


def peer_crop(sc: Any, path: str, ratio: Ratio) -> Any:
    """smartcrop.py as its command line runs it: the image from its file, turned upright (EXIF),
    a 100-px-wide target."""
    from PIL import Image, ImageOps

    from cropper_engine.types import Box

    with Image.open(path) as im:
        img = (ImageOps.exif_transpose(im) or im).convert("RGB")
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
    ap.add_argument("--quick", action="store_true", help="20 images (8 with --camera)")
    ap.add_argument("--n", type=int, default=None, help="images [100; 30 with --camera]")
    ap.add_argument("--side", type=int, default=1024, help="longest side of the inputs, px (not with --camera)")
    ap.add_argument("--camera", action="store_true",
                    help=f"camera-size JPEGs ({CAMERA_SIDE} px, quality {CAMERA_QUALITY}, some turned by EXIF), "
                         "beside the default with a full decode")
    ap.add_argument("--work", default=None, help="with --camera: keep the generated JPEGs in this folder")
    ap.add_argument("--tasks", default="ratio,free", help="ratio, free or both")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the FCDB folder")
    ap.add_argument("--no-peer", action="store_true", help="do not run smartcrop.py beside the default")
    ap.add_argument("--out", nargs="?", const="", default=None, metavar="PATH",
                    help=f"also write the figures (JSON) and a markdown table beside them [PATH: {DEFAULT_OUT}, "
                         f"with --camera {CAMERA_OUT}]")
    a = ap.parse_args()
    n = (8 if a.camera else 20) if a.quick else a.n or (30 if a.camera else 100)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.camera and not (Path(a.data) / "val.jsonl").exists():
        raise SystemExit(f"--camera needs FCDB val images: {a.data}/val.jsonl not found (--data DIR)")

    from cropper_engine.engine.loop import Cropper

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t_prep = time.perf_counter()
        items = prepare_camera(Path(a.data), n, work) if a.camera else prepare(Path(a.data), n, a.side, work)
        prep_s = time.perf_counter() - t_prep
        t0 = time.perf_counter()
        cropper = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))
        from cropper_engine.models.default_model import default_model

        default_model()
        load_s = time.perf_counter() - t0
        # the default as it was before the reduced decode, for --camera: every image decoded whole
        full = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"})) if a.camera else None
        if full is not None:
            full.draft_side = lambda subject=None: None  # type: ignore[method-assign]
        sc = None if a.no_peer else peer()
        for path, ratio, _ in items[:2]:  # warm-up: lazy imports, the table's metadata, caches
            for c in (cropper, full):
                if c is not None:
                    c.crop_batch([CropRequest(path, Task.RATIO, [ratio])])
                    c.crop_batch([CropRequest(path, Task.FREE)])
            if sc is not None:
                peer_crop(sc, path, ratio)
        inputs = ("FCDB val at camera size" if a.camera else "FCDB val") if (Path(a.data) / "val.jsonl").exists() \
            else "sample photos"
        figures: dict[str, Any] = {"side": CAMERA_SIDE if a.camera else a.side, "inputs": inputs,
                                   "load_ms": round(1000 * load_s, 1), "pipeline": cropper.describe()["pipeline"],
                                   "index": (cropper.describe()["index"] or {}).get("source"), "tasks": {},
                                   "threads": THREADS}
        if a.camera:
            figures["camera"] = camera_inputs(items, prep_s)
        for task in tasks:
            figures["tasks"][task] = run_task(task, items, cropper, full, sc)
    for f in figures["tasks"].values():
        f["ok"] = f[LIMIT_STAT] <= LIMIT_MS
    figures.update({"limit_ms": LIMIT_MS, "limit_stat": LIMIT_STAT,
                    "ok": all(f["ok"] for f in figures["tasks"].values()),
                    "quick": bool(a.quick), "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})

    what = (f"{n} camera-size JPEGs ({figures['camera']['megapixels_median']:.0f} MP median)" if a.camera
            else f"{n} images at {a.side} px (longest side)")
    print(f"no-VLM default, {what}, one image per call, model load {figures['load_ms']:.0f} ms")
    for task, f in figures["tasks"].items():
        st = "  ".join(f"{k} {v:.1f}" for k, v in f["stages_ms"].items())
        print(f"{task:6s} wall {f['wall_ms_mean']:.1f} ms/image (median {f['wall_ms_median']:.1f}, "
              f"p90 {f['wall_ms_p90']:.1f}), CPU {f['cpu_ms_mean']:.1f} ms/image   stages ms: {st}")
        if "with_faces" in f:
            wf = f["with_faces"]
            print(f"       the {wf['images']} images with faces: median {wf['wall_ms_median']:.1f} ms, "
                  f"p90 {wf['wall_ms_p90']:.1f}")
        if "full_decode" in f:
            fd = f["full_decode"]
            print(f"       with a full decode (as before): median {fd['wall_ms_median']:.1f} ms, IoU "
                  f"{fd.get('iou', float('nan')):.3f}; boxes moved (px of the 160-px analysis image) median "
                  f"{fd['box_shift_median']:.2f}, max {fd['box_shift_max']:.2f}, within 1 px "
                  f"{fd['within_1px']:.0%}")
        if "peer" in f:
            p = f["peer"]
            print(f"       smartcrop.py {p['wall_ms_mean']:.1f} ms/image (median {p['wall_ms_median']:.1f}, p90 "
                  f"{p['wall_ms_p90']:.1f}, CPU {p['cpu_ms_mean']:.1f}); default / smartcrop.py (medians) "
                  f"{f['median_ratio_to_peer']:.2f}x; IoU {f.get('iou', float('nan')):.3f} vs "
                  f"{p.get('iou', float('nan')):.3f}")
    if a.out is not None:
        write(Path(a.out or (CAMERA_OUT if a.camera else DEFAULT_OUT)), figures, n)
    print(json.dumps(figures))


def camera_inputs(items: list[tuple[str, Ratio, Any]], prep_s: float) -> dict[str, Any]:
    """What the generated camera-size inputs are: pixels, file sizes, how many are turned by EXIF."""
    from PIL import Image

    mps, sizes, turned = [], [], 0
    for path, _, _ in items:
        with Image.open(path) as im:
            mps.append(im.width * im.height / 1e6)
            turned += _orientation(im) not in (None, 1)
        sizes.append(os.path.getsize(path) / 1e6)
    return {"side": CAMERA_SIDE, "quality": CAMERA_QUALITY, "megapixels_median": round(statistics.median(mps), 1),
            "megapixels_range": [round(min(mps), 1), round(max(mps), 1)],
            "file_mb_median": round(statistics.median(sizes), 2), "turned_by_exif": turned,
            "generated_s": round(prep_s, 1)}


def _orientation(im: Any) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:
        return None


def _p(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def run_task(task: str, items: list[tuple[str, Ratio, Any]], cropper: Any, full: Any, sc: Any) -> dict[str, Any]:
    """One task over every input, image by image: the default, then (with --camera) the default
    with a full decode, then smartcrop.py (ratio task), each timed in wall and CPU time."""
    walls, stages, ious, peer_walls, peer_ious, face_walls = [], [], [], [], [], []
    full_walls, full_ious, shifts = [], [], []
    cpu = peer_cpu = 0.0
    for path, ratio, gt in items:
        req = CropRequest(path, Task.RATIO, [ratio]) if task == "ratio" else CropRequest(path, Task.FREE)
        c, t = time.process_time(), time.perf_counter()
        res = cropper.crop_batch([req])[0]
        walls.append(time.perf_counter() - t)
        cpu += time.process_time() - c
        r = res[0]  # type: ignore[index]
        if r.extra.get("faces"):
            face_walls.append(walls[-1])
        stages.append(dict(r.timings))
        if gt is not None:
            ious.append(r.box.iou(gt))
        if full is not None:  # interleaved: the same load for both
            t = time.perf_counter()
            ref = full.crop_batch([req])[0][0]  # type: ignore[index]
            full_walls.append(time.perf_counter() - t)
            if gt is not None:
                full_ious.append(ref.box.iou(gt))
            px = max(r.width, r.height) / 160  # one pixel of the analysis's working image
            shifts.append(max(abs(x - y) for x, y in zip(r.box.as_list(), ref.box.as_list(), strict=True)) / px)
        if sc is not None and task == "ratio":
            c, t = time.process_time(), time.perf_counter()
            box = peer_crop(sc, path, ratio)
            peer_walls.append(time.perf_counter() - t)
            peer_cpu += time.process_time() - c
            if gt is not None:
                peer_ious.append(box.iou(gt))
    f = summarise(walls, stages)
    f["cpu_ms_mean"] = round(1000 * cpu / len(walls), 1)
    if face_walls:
        f["with_faces"] = {"images": len(face_walls),
                           "wall_ms_median": round(1000 * statistics.median(face_walls), 1),
                           "wall_ms_p90": round(1000 * _p(face_walls, 0.9), 1)}
    if ious:
        f["iou"] = round(statistics.fmean(ious), 4)
    if full_walls:
        fd: dict[str, Any] = {"wall_ms_median": round(1000 * statistics.median(full_walls), 1),
                              "wall_ms_p90": round(1000 * _p(full_walls, 0.9), 1),
                              "box_shift_median": round(statistics.median(shifts), 2),
                              "box_shift_p90": round(_p(shifts, 0.9), 2), "box_shift_max": round(max(shifts), 2),
                              "within_1px": round(sum(v <= 1.0 for v in shifts) / len(shifts), 3)}
        if full_ious:
            fd["iou"] = round(statistics.fmean(full_ious), 4)
        f["full_decode"] = fd
        f["speedup_vs_full_decode"] = round(fd["wall_ms_median"] / max(f["wall_ms_median"], 1e-9), 2)
    if peer_walls:
        p = {"name": "smartcrop.py", "version": _version("smartcrop"),
             "wall_ms_mean": round(1000 * statistics.fmean(peer_walls), 1),
             "wall_ms_median": round(1000 * statistics.median(peer_walls), 1),
             "wall_ms_p90": round(1000 * _p(peer_walls, 0.9), 1),
             "cpu_ms_mean": round(1000 * peer_cpu / len(peer_walls), 1)}
        if peer_ious:
            p["iou"] = round(statistics.fmean(peer_ious), 4)
        f["peer"] = p
        f["median_ratio_to_peer"] = round(f["wall_ms_median"] / max(p["wall_ms_median"], 1e-9), 2)
    return f


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
    cam = f.get("camera")
    what = (f"{n} FCDB val images at camera size: {cam['side']} px, {cam['megapixels_median']} MP median, JPEG "
            f"quality {cam['quality']}, {cam['turned_by_exif']} turned by EXIF" if cam
            else f"{n} images at {f['side']} px")
    lines = [f"# no-VLM default pipeline ({what}, one image per call)", "",
             "| task | wall ms/image mean | median | p90 | CPU ms/image | " + " | ".join(keys) + " | ok |",
             "|---" * (len(keys) + 6) + "|"]
    for task, t in f["tasks"].items():
        lines.append(f"| {task} | {t['wall_ms_mean']} | {t['wall_ms_median']} | {t['wall_ms_p90']} | "
                     f"{t.get('cpu_ms_mean', '-')} | "
                     + " | ".join(str(t["stages_ms"].get(k, "")) for k in keys) + f" | {t['ok']} |")
    peers = [(task, t) for task, t in f["tasks"].items() if "peer" in t]
    if peers:
        lines += ["", "| task | default ms (mean / median / p90) | smartcrop.py ms (mean / median / p90) | "
                  "default / smartcrop.py (medians) | CPU ms default / smartcrop.py | IoU default | "
                  "IoU smartcrop.py |", "|---|---|---|---|---|---|---|"]
        for task, t in peers:
            p = t["peer"]
            lines.append(f"| {task} | {t['wall_ms_mean']} / {t['wall_ms_median']} / {t['wall_ms_p90']} | "
                         f"{p['wall_ms_mean']} / {p['wall_ms_median']} / {p['wall_ms_p90']} | "
                         f"{t['median_ratio_to_peer']}x | {t.get('cpu_ms_mean', '-')} / {p.get('cpu_ms_mean', '-')} | "
                         f"{t.get('iou', '-')} | {p.get('iou', '-')} |")
    fulls = [(task, t) for task, t in f["tasks"].items() if "full_decode" in t]
    if fulls:
        lines += ["", "| task | reduced decode: median ms, IoU | full decode (as before): median ms, IoU | "
                  "box moved, px at 160 px: median / p90 / max | within 1 px |", "|---|---|---|---|---|"]
        for task, t in fulls:
            fd = t["full_decode"]
            lines.append(f"| {task} | {t['wall_ms_median']}, {t.get('iou', '-')} | {fd['wall_ms_median']}, "
                         f"{fd.get('iou', '-')} | {fd['box_shift_median']} / {fd['box_shift_p90']} / "
                         f"{fd['box_shift_max']} | {fd['within_1px']:.0%} |")
    threads = f.get("threads") or {}
    if threads:
        lines += ["", "threads: " + "; ".join(f"{k}: {v}" for k, v in threads.items())]
    lines += ["", f"stages in ms per image (the engine's timings); limit {f['limit_ms']:.0f} ms per image "
              f"({f['limit_stat']}): {'ok' if f['ok'] else 'NOT met'}; model load {f['load_ms']} ms; "
              f"pipeline {f['pipeline']}; {f['cores']} cores, load {f['load_avg_1m']} "
              f"({f['provenance']['machine']['note']}); commit {f['provenance']['git']['commit'][:10]}, "
              f"{f['provenance']['created']}; `{f['provenance']['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
