"""People stay in the picture: the no-VLM default on the FCDB images in which faces are found.

    python bench/face_bench.py [--quick] [--limit N] [--splits train,val] [--out [PATH]]

For every FCDB image (train and val) in which the face detector (MediaPipe, as the engine runs
it) finds a face, the default crops it at 1:1, 4:5, 16:9, 9:16, at the ground truth's ratio and
free-form, three ways, interleaved image by image in one process:

  whole    no main faces: no crop cuts through a face, but a crop may leave any face out
  size     the rule before the ranking: the main faces are the largest, every face at least
           half its side, and smaller faces between them (faces.main_face_indices_by_size)
  main     the rule now shipped: the main faces are the best-ranked face (size x confidence x
           focus x frontal-ness; detections that are not faces rank 0, faces.not_a_face), every
           face ranked at least half of it, and faces between them (faces.main_face_indices)

In every mode the main faces are inside every crop whose ratio can hold them, best first, and
other faces are kept whole or left out; the modes differ in the main-face rule only (the
engine's faces_to_keep given the rule). Reported per mode and ratio: the share of crops that
keep every main face, by the ranking (`keeps_every_main_face`, over the crops whose ratio can
hold the main faces' union: `ratio_allows`) and by the size rule (`..._by_size`), the share
keeping the best-ranked face, the largest face, the share cutting a face; and the IoU / Disp
against the ground truth for the ground truth's ratio and free-form, on val and train apart
(train: the images the model was fitted on, so optimistic). Each image is excluded from its
own neighbours, as in `cropper-engine eval`. `ranking_ms`: what the ranking's features and
rank cost per image with faces (detectors.rank_detected, on the detection-size copy, timed
alone after the detection). With `--out` the figures go to bench/results/face_bench.json (or
PATH) and a markdown table beside it.
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
MODES = ("whole", "size", "main")


def face_images(data: Path, splits: list[str], limit: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records of the images in which faces are found (with the split), in file order, and
    the ranking's cost on them: per image, detectors.rank_detected timed alone (ms), and how
    often it ran the person segmentation."""
    from cropper_engine.engine.subject import face_detector, person_detector
    from cropper_engine.engine.subject.detectors import DETECT_SIDE, _pil, _small, detect_faces, rank_detected
    from cropper_engine.imageio import open_image

    det = face_detector()
    if det is None:
        raise SystemExit("no face detector here: pip install 'cropper-engine[subject]'")
    person_detector()  # built now, not inside the first timing
    out, ms, seg = [], [], 0
    for split in splits:
        rows = [json.loads(x) for x in (data / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        found = 0
        for r in rows:
            if limit and found >= limit:
                break
            img = _pil(open_image(str(data / "images" / r["image"])).image)
            small = _small(img, DETECT_SIDE)
            faces = detect_faces(img, det, small, rank=False)
            if faces:
                t = time.perf_counter()
                rank_detected(faces, *small)
                ms.append((time.perf_counter() - t) * 1000)
                seg += any("person" in f.features for f in faces)  # it ran the person segmentation
                out.append({**r, "split": split})
                found += 1
    ms.sort()
    cost = {"images": len(ms), "mean": round(statistics.fmean(ms), 2) if ms else None,
            "median": round(ms[len(ms) // 2], 2) if ms else None,
            "p90": round(ms[int(0.9 * (len(ms) - 1))], 2) if ms else None,
            "with_segmentation": seg}
    return out, cost


def main_faces_ok(crop: Box, faces: list[Box], main_idx: list[int], ratio: float | None, w: int,
                  h: int) -> tuple[bool, bool]:
    """(the ratio allows the main faces `main_idx`, every one of them inside the crop)."""
    from cropper_engine.engine.subject import fits

    if not main_idx:
        return False, True
    main = [faces[i] for i in main_idx]
    u = Box(min(b.x1 for b in main), min(b.y1 for b in main), max(b.x2 for b in main), max(b.y2 for b in main))
    return fits(u, ratio, w, h), all(crop.contains(b, tol=1.0) for b in main)


def size_rule(faces: list[Box]) -> list[int]:
    from cropper_engine.engine.subject import Face
    from cropper_engine.engine.subject.faces import main_face_indices_by_size

    return main_face_indices_by_size([Face(b, 1.0, b) for b in faces])


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
    rows0 = next((r.extra["faces"] for r in rows if r.extra.get("faces") is not None), [])
    res["rank"] = [f.get("rank") for f in rows0]
    res["main"] = [bool(f.get("main")) for f in rows0]  # the ranking's main faces (whatever the mode)
    res["not_a_face"] = [f.get("not_a_face") for f in rows0]
    res["size"] = (w, h)
    return res


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: crops; by the ranking's main faces: the crops whose ratio can hold them and the
    share of those keeping every one; the same by the size rule; the shares keeping the
    best-ranked face, the largest face, and cutting a face."""
    from cropper_engine.engine.subject import cuts

    out: dict[str, Any] = {}
    splits = sorted({r["split"] for r in results})
    for name in (*RATIOS, "gt", "free"):
        per = {sp: [0, 0] for sp in splits}  # allowed, kept by the ranking, per split
        c = dict.fromkeys(("n", "allowed", "kept", "allowed_size", "kept_size", "best", "largest", "cut"), 0)
        for r in results:
            if not r["faces"]:
                continue
            faces = [Box(*b) for b in r["faces"]]
            crop, ratio = Box(*r[name]["box"]), r[name]["ratio"]
            ranked = [i for i, m in enumerate(r["main"]) if m]
            a, k = main_faces_ok(crop, faces, ranked, ratio, *r["size"])
            a2, k2 = main_faces_ok(crop, faces, size_rule(faces), ratio, *r["size"])
            c["n"] += 1
            c["allowed"] += a
            c["kept"] += a and k
            per[r["split"]][0] += a
            per[r["split"]][1] += a and k
            c["allowed_size"] += a2
            c["kept_size"] += a2 and k2
            ranks = [x if x is not None else -1.0 for x in r["rank"]]
            if ranks and max(ranks) > 0:
                c["best"] += crop.contains(faces[ranks.index(max(ranks))], tol=1.0)
            else:  # no face taken for one: nothing to keep
                c["best"] += 1
            c["largest"] += crop.contains(faces[0], tol=1.0)
            c["cut"] += any(cuts(crop, b, tol=1.0) for b in faces)
        n = max(c["n"], 1)
        out[name] = {"crops": c["n"], "ratio_allows": c["allowed"],
                     "keeps_every_main_face": round(c["kept"] / max(c["allowed"], 1), 4),
                     "ratio_allows_by_size": c["allowed_size"],
                     "keeps_every_main_face_by_size": round(c["kept_size"] / max(c["allowed_size"], 1), 4),
                     "keeps_the_best_face": round(c["best"] / n, 4),
                     "keeps_the_largest_face": round(c["largest"] / n, 4), "cuts_a_face": round(c["cut"] / n, 4)}
        for sp, (al, kp) in per.items():
            out[name][f"keeps_every_main_face_{sp}"] = round(kp / max(al, 1), 4)
            out[name][f"ratio_allows_{sp}"] = al
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
    from cropper_engine.engine.subject.faces import main_face_indices_by_size

    t0 = time.perf_counter()
    recs, cost = face_images(data, splits, limit)
    print(f"{len(recs)} images with faces ({', '.join(splits)}), found in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    cropper = Cropper.from_config(load_config(env={}, overrides={"vlm.model": "none"}))
    shipped = jobs.faces_to_keep

    def whole_only(*args: Any, **kw: Any) -> Any:  # faces kept whole, none required
        return [KeptFace(k.x1, k.y1, k.x2, k.y2, False) for k in shipped(*args, **kw)]

    def by_size(*args: Any, **kw: Any) -> Any:  # the rule before the ranking
        return shipped(*args, main_rule=main_face_indices_by_size, **kw)

    patched = {"whole": whole_only, "size": by_size, "main": shipped}

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    from tqdm import tqdm

    try:
        for rec in tqdm(recs, desc="face images", unit="img", file=sys.stderr):
            for mode in MODES:  # interleaved: the machine's load hits both alike
                jobs.faces_to_keep = patched[mode]
                results[mode].append(run(cropper, rec, data, mode))
    finally:
        jobs.faces_to_keep = shipped
    figures: dict[str, Any] = {
        "bench": "faces", "images": len(recs), "splits": splits,
        "images_by_split": {s: sum(r["split"] == s for r in recs) for s in splits},
        "ratios": [*RATIOS, "gt", "free"], "pipeline": cropper.describe()["pipeline"],
        "modes": {m: score(results[m]) for m in MODES}, "ranking_ms": cost,
        "seconds": round(time.perf_counter() - t0, 1),
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
    names = f["ratios"]
    head = "|---" * (len(names) + 1) + "|"
    lines = [f"# People stay in the picture: FCDB images with faces ({f['images']}: "
             + ", ".join(f"{s} {n}" for s, n in f["images_by_split"].items()) + ")", "",
             "Keeps every main face (the ranking's: the best-ranked face and those ranked at least half "
             "of it), of the crops whose ratio can hold them (n):", "",
             "| rule | " + " | ".join(names) + " |", head]
    for m, s in f["modes"].items():
        lines.append(f"| {m} | " + " | ".join(f"{s[n]['keeps_every_main_face']:.1%} ({s[n]['ratio_allows']})"
                                             for n in names) + " |")
    for sp in [x for x in ("val", "train") if x in f["images_by_split"]]:
        lines += ["", f"The same, {sp} only:", "", "| rule | " + " | ".join(names) + " |", head]
        for m, s in f["modes"].items():
            lines.append(f"| {m} | " + " | ".join(
                f"{s[n]['keeps_every_main_face_' + sp]:.1%} ({s[n]['ratio_allows_' + sp]})" for n in names) + " |")
    lines += ["", "Keeps every main face by the size rule (the largest and those at least half its side):", "",
              "| rule | " + " | ".join(names) + " |", head]
    for m, s in f["modes"].items():
        lines.append(f"| {m} | " + " | ".join(
            f"{s[n]['keeps_every_main_face_by_size']:.1%} ({s[n]['ratio_allows_by_size']})" for n in names) + " |")
    for key, what in (("keeps_the_best_face", "Keeps the best-ranked face"),
                      ("keeps_the_largest_face", "Keeps the largest detection"), ("cuts_a_face", "Cuts a face")):
        lines += ["", f"{what}:", "", "| rule | " + " | ".join(names) + " |", head]
        for m, s in f["modes"].items():
            lines.append(f"| {m} | " + " | ".join(f"{s[n][key]:.1%}" for n in names) + " |")
    splits = [s for s in ("val", "train") if s in f["images_by_split"]]
    lines += ["", "| rule | " + " | ".join(f"{t} IoU / Disp, {s}" for t in ("ratio given", "free-form")
                                            for s in splits) + " |",
              "|---" * (2 * len(splits) + 1) + "|"]
    for m, s in f["modes"].items():
        cells = [f"{s[t]['iou_' + sp]:.3f} / {s[t]['disp_' + sp]:.3f}" for t in ("gt", "free") for sp in splits]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = f.get("ranking_ms") or {}
    lines += ["", "whole: no main faces; size: the rule before the ranking; main: the ranking (shipped). gt: the "
              "ground truth's ratio; train: the images the model was fitted on. The ranking's features and rank: "
              f"{c.get('mean')} ms a face image on average (median {c.get('median')}, p90 {c.get('p90')}; the person "
              f"segmentation ran on {c.get('with_segmentation')} of {c.get('images')}). "
              f"{f['cores']} cores, load {f['load_avg_1m']}; {f['seconds']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
