"""People stay in the picture: the no-VLM default on the FCDB images in which faces are found.

    python bench/face_bench.py [--quick] [--limit N] [--splits train,val] [--out [PATH]]

For every FCDB image (train and val) in which the face detector (MediaPipe, as the engine runs
it) finds a face, the default crops it at 1:1, 4:5, 16:9, 9:16, at the ground truth's ratio and
free-form, two ways, interleaved image by image in one process:

  whole    the previous rule: no crop cuts through a face, but a crop may leave any face out
  main     the rule now shipped: the main faces (the largest, every face at least half its side,
           and smaller faces between them) are inside every crop whose ratio can hold them,
           other faces are kept whole or left out (engine/subject/faces.py)

`whole` is the shipped engine with the main-face marking switched off (faces_to_keep wrapped to
mark none), so the two differ in the face rule only. Reported per mode and ratio: the share of
crops that keep every main face, over the crops whose ratio allows it (a crop of the ratio can
hold the main faces' union), the share keeping the largest face, the share cutting a face; and
the IoU / Disp against the ground truth for the ground truth's ratio and free-form, on val and
train apart (train: the images the model was fitted on, so optimistic). Each image is excluded
from its own neighbours, as in `cropper-engine eval`. With `--out` the figures go to
bench/results/face_bench.json (or PATH) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_json  # noqa: E402  (first: it notes the load at the start)
from cropper_engine.config import load_config  # noqa: E402
from cropper_engine.types import Box, CropRequest, Ratio, Task  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = ROOT / "bench" / "results" / "face_bench.json"
RATIOS = ("1:1", "4:5", "16:9", "9:16")
MODES = ("whole", "main")


def face_images(data: Path, splits: list[str], limit: int | None) -> list[dict[str, Any]]:
    """The records of the images in which faces are found (with the split), in file order."""
    from cropper_engine.engine.subject import detect_faces, face_detector
    from cropper_engine.imageio import open_image

    det = face_detector()
    if det is None:
        raise SystemExit("no face detector here: pip install 'cropper-engine[subject]'")
    out = []
    for split in splits:
        rows = [json.loads(x) for x in (data / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        found = 0
        for r in rows:
            if limit and found >= limit:
                break
            if detect_faces(open_image(str(data / "images" / r["image"])).image, det):
                out.append({**r, "split": split})
                found += 1
    return out


def main_faces_ok(crop: Box, faces: list[Box], ratio: float | None, w: int, h: int) -> tuple[bool, bool, bool, bool]:
    """(the ratio allows the main faces, every main face inside, the largest inside, a face cut)."""
    from cropper_engine.engine.subject import Face, cuts, fits, main_face_indices

    fs = [Face(b, 1.0, b) for b in faces]
    main = [faces[i] for i in main_face_indices(fs)]
    u = Box(min(b.x1 for b in main), min(b.y1 for b in main), max(b.x2 for b in main), max(b.y2 for b in main))
    allowed = fits(u, ratio, w, h)
    inside = all(crop.contains(b, tol=1.0) for b in main)
    return allowed, inside, crop.contains(faces[0], tol=1.0), any(cuts(crop, b, tol=1.0) for b in faces)


def run(cropper: Any, rec: dict[str, Any], data: Path, mode: str) -> dict[str, Any]:
    from cropper_engine.data.metrics import disp, iou

    path = str(data / "images" / rec["image"])
    x1, y1, x2, y2 = (float(v) for v in rec["crop"])
    gt_ratio = Ratio(round(x2 - x1), round(y2 - y1))
    reqs = [CropRequest(path, Task.RATIO, [Ratio.parse(r) for r in RATIOS] + [gt_ratio], id=rec["image"],
                        keep_faces=True),
            CropRequest(path, Task.FREE, id=rec["image"], keep_faces=True)]
    out = cropper.crop_batch(reqs, exclude_ids=[{rec["image"]}, {rec["image"]}])
    rows = [*out[0], *out[1]]
    names = [*RATIOS, "gt", "free"]
    gt = Box(x1, y1, x2, y2)
    res: dict[str, Any] = {"split": rec["split"], "image": rec["image"]}
    w, h = rows[0].width, rows[0].height
    faces = None
    for name, r in zip(names, rows, strict=True):
        if faces is None and r.extra.get("faces") is not None:
            faces = [Box(*f["box"]) for f in r.extra["faces"]]
        res[name] = {"box": r.box.as_list(), "ratio": r.ratio.value if r.ratio else None}
        if name in ("gt", "free"):
            res[name]["iou"] = iou(r.box, gt)
            res[name]["disp"] = disp(r.box, gt, w, h)
    res["faces"] = [b.as_list() for b in faces or []]
    res["size"] = (w, h)
    return res


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: crops, allowed, share keeping every main face (of the allowed), largest, cut."""
    out: dict[str, Any] = {}
    for name in (*RATIOS, "gt", "free"):
        allowed = kept = largest = cut = n = 0
        for r in results:
            if not r["faces"]:
                continue
            faces = [Box(*b) for b in r["faces"]]
            a, k, lg, c = main_faces_ok(Box(*r[name]["box"]), faces, r[name]["ratio"], *r["size"])
            n += 1
            allowed += a
            kept += a and k
            largest += lg
            cut += c
        out[name] = {"crops": n, "ratio_allows": allowed,
                     "keeps_every_main_face": round(kept / max(allowed, 1), 4),
                     "keeps_the_largest_face": round(largest / max(n, 1), 4), "cuts_a_face": round(cut / max(n, 1), 4)}
        if name in ("gt", "free"):
            for split in ("val", "train"):
                rs = [r for r in results if r["split"] == split]
                if rs:
                    out[name][f"iou_{split}"] = round(statistics.fmean(r[name]["iou"] for r in rs), 4)
                    out[name][f"disp_{split}"] = round(statistics.fmean(r[name]["disp"] for r in rs), 4)
                    out[name][f"images_{split}"] = len(rs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="at most 20 face images a split")
    ap.add_argument("--limit", type=int, default=None, help="at most N face images a split")
    ap.add_argument("--splits", default="train,val", help="FCDB splits")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the FCDB folder")
    ap.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None, metavar="PATH",
                    help=f"also write the figures (JSON) and a markdown table beside them [PATH: {DEFAULT_OUT}]")
    a = ap.parse_args()
    data = Path(a.data)
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    limit = 20 if a.quick and not a.limit else a.limit

    from cropper_engine.engine.loop import Cropper
    from cropper_engine.engine.subject import KeptFace, jobs  # jobs.attach_subject calls faces_to_keep

    t0 = time.perf_counter()
    recs = face_images(data, splits, limit)
    print(f"{len(recs)} images with faces ({', '.join(splits)}), found in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    cropper = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))
    shipped = jobs.faces_to_keep

    def whole_only(*args: Any, **kw: Any) -> Any:  # the previous rule: faces kept whole, none required
        return [KeptFace(k.x1, k.y1, k.x2, k.y2, False) for k in shipped(*args, **kw)]

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    from tqdm import tqdm

    try:
        for rec in tqdm(recs, desc="face images", unit="img", file=sys.stderr):
            for mode in MODES:  # interleaved: the machine's load hits both alike
                jobs.faces_to_keep = whole_only if mode == "whole" else shipped
                results[mode].append(run(cropper, rec, data, mode))
    finally:
        jobs.faces_to_keep = shipped
    figures: dict[str, Any] = {
        "bench": "faces", "images": len(recs), "splits": splits,
        "images_by_split": {s: sum(r["split"] == s for r in recs) for s in splits},
        "ratios": [*RATIOS, "gt", "free"], "pipeline": cropper.describe()["pipeline"],
        "modes": {m: score(results[m]) for m in MODES}, "seconds": round(time.perf_counter() - t0, 1),
        "quick": bool(a.quick), "limit": limit, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    md = markdown(figures)
    print(md)
    if a.out:
        path = save_json(a.out, {**figures, "per_image": {m: results[m] for m in MODES}})
        path.with_suffix(".md").write_text(md)
        print(f"results: {path}, {path.with_suffix('.md')}", file=sys.stderr)
    print(json.dumps({k: v for k, v in figures.items()}))


def markdown(f: dict[str, Any]) -> str:
    lines = [f"# People stay in the picture: FCDB images with faces ({f['images']}: "
             + ", ".join(f"{s} {n}" for s, n in f["images_by_split"].items()) + ")", "",
             "| rule | " + " | ".join(f"{n} keeps every main face" for n in f["ratios"]) + " |",
             "|---" * (len(f["ratios"]) + 1) + "|"]
    for m, s in f["modes"].items():
        lines.append(f"| {m} | " + " | ".join(f"{s[n]['keeps_every_main_face']:.1%} ({s[n]['ratio_allows']})"
                                             for n in f["ratios"]) + " |")
    lines += ["", "| rule | " + " | ".join(f"{n} cuts a face" for n in f["ratios"]) + " |",
              "|---" * (len(f["ratios"]) + 1) + "|"]
    for m, s in f["modes"].items():
        lines.append(f"| {m} | " + " | ".join(f"{s[n]['cuts_a_face']:.1%}" for n in f["ratios"]) + " |")
    splits = [s for s in ("val", "train") if s in f["images_by_split"]]
    lines += ["", "| rule | " + " | ".join(f"{t} IoU / Disp, {s}" for t in ("ratio given", "free-form")
                                            for s in splits) + " |",
              "|---" * (2 * len(splits) + 1) + "|"]
    for m, s in f["modes"].items():
        cells = [f"{s[t]['iou_' + sp]:.3f} / {s[t]['disp_' + sp]:.3f}" for t in ("gt", "free") for sp in splits]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "(n): the crops whose ratio can hold every main face (the share is of those); gt: the ground "
              "truth's ratio; train: the images the model was fitted on. "
              f"{f['cores']} cores, load {f['load_avg_1m']}; {f['seconds']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
