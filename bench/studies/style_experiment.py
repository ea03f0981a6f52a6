"""Does `cropper-engine fit` adapt the no-VLM default to a house style? An experiment on FCDB.

    python bench/studies/style_experiment.py [--fcdb ../shared/data/fcdb] [--quick]

1. A dataset in one consistent style unlike FCDB's (whose crops have any ratio and size): for
   every FCDB image, `--style square`: the largest square centred on its annotated crop's
   centre (shifted inside the image), a "square thumbnail"; `--style tight45`: the largest 4:5
   portrait box inside the annotated crop, centred on it. Only boxes and file names are
   written, to a work folder outside the repository; the images are read in place.
2. FCDB train is shuffled (seed 0): the first 400 images are the fitting pool, the next 200 are
   held out; FCDB val (200 images, which the shipped model never saw) is a second held-out set.
3. `cropper-engine fit` on the first 25, 50, 100, 200 and 400 images of the pool (a learning
   curve), then `cropper-engine eval --method cropper` on the held-out sets, ratio given (1:1)
   and free-form, with the shipped model and with each fitted one (`--default-model`).

Every figure comes from those commands' `--json` output; they are written with the commands to
bench/results/style_experiment_STYLE.json (and .md). The shipped model was fitted on FCDB train itself
(with FCDB's crops), which favours it on the held-out train images, not the fitted models.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, device_info, git_sha, versions  # noqa: E402


def square_thumbnail(w: int, h: int, crop: list[float]) -> list[int]:
    """The largest square centred on the crop's centre, shifted inside the w x h image."""
    side = min(w, h)
    cx, cy = (crop[0] + crop[2]) / 2, (crop[1] + crop[3]) / 2
    x1 = int(round(min(max(cx - side / 2, 0), w - side)))
    y1 = int(round(min(max(cy - side / 2, 0), h - side)))
    return [x1, y1, x1 + side, y1 + side]


def tight_4x5(w: int, h: int, crop: list[float]) -> list[int]:
    """The largest 4:5 (portrait) box inside the crop, centred on it."""
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    bw, bh = (ch * 0.8, ch) if cw / ch > 0.8 else (cw, cw / 0.8)
    cx, cy = (crop[0] + crop[2]) / 2, (crop[1] + crop[3]) / 2
    x1, y1 = int(round(cx - bw / 2)), int(round(cy - bh / 2))
    return [max(x1, 0), max(y1, 0), min(x1 + int(round(bw)), w), min(y1 + int(round(bh)), h)]


STYLES = {"square": (square_thumbnail, "the largest square centred on the FCDB crop's centre, shifted inside "
                                       "the image", "1:1"),
          "tight45": (tight_4x5, "the largest 4:5 (portrait) box inside the FCDB crop, centred on it", "4:5")}


def write_style(records: list[dict[str, Any]], path: Path, style: str = "square") -> Path:
    make = STYLES[style][0]
    with path.open("w") as fh:
        for r in records:
            box = make(int(r["width"]), int(r["height"]), [float(v) for v in r["crop"]])
            fh.write(json.dumps({"image": r["image"], "crops": [box], "width": r["width"], "height": r["height"]})
                     + "\n")
    return path


def cli(args: list[str], log: list[dict[str, Any]]) -> dict[str, Any]:
    """Run `cropper-engine ARGS --json`; the last stdout line is its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cropper_engine.cli", *args, "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    log.append({"command": "cropper-engine " + shlex.join([*args, "--json"]),
                "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{time.perf_counter() - t0:6.0f} s  cropper-engine {shlex.join(args)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/studies/style_experiment.py", description=__doc__.split("\n")[0])
    ap.add_argument("--fcdb", default=str(ROOT.parent / "shared" / "data" / "fcdb"))
    ap.add_argument("--work", default="/tmp/cropper-style-experiment", help="for the style JSONL files and models")
    ap.add_argument("--sizes", default="25,50,100,200", help="fitting set sizes (the learning curve)")
    ap.add_argument("--test", type=int, default=150, help="held-out FCDB train images")
    ap.add_argument("--val-models", default="0,200",
                    help="the models evaluated on FCDB val too (0: the shipped one; N: fitted on N)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a model of an earlier run in --work (fitted on the same N images) instead of refitting")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="sizes 50,200 and 100 held-out images, no val")
    ap.add_argument("--style", choices=sorted(STYLES), default="square",
                    help="square: square thumbnails centred on the crop's centre; tight45: tight 4:5 crops")
    ap.add_argument("--out", default=None, help="[default: bench/results/style_experiment_STYLE.json]")
    a = ap.parse_args()
    sizes = [50, 200] if a.quick else [int(s) for s in a.sizes.split(",")]
    n_test = 100 if a.quick else a.test
    fcdb, work = Path(a.fcdb), Path(a.work) / a.style
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    train = [json.loads(x) for x in (fcdb / "train.jsonl").read_text().splitlines() if x.strip()]
    random.Random(0).shuffle(train)
    pool_size = 400  # fixed, so that the held-out images are the same whatever the sizes
    pool, held = train[:pool_size], train[pool_size:pool_size + n_test]
    sets = {"held-out FCDB train": write_style(held, work / "style_test.jsonl", a.style)}
    if not a.quick:
        val = [json.loads(x) for x in (fcdb / "val.jsonl").read_text().splitlines() if x.strip()]
        sets["FCDB val"] = write_style(val, work / "style_val.jsonl", a.style)
    images = str(fcdb / "images")
    log: list[dict[str, Any]] = []
    fits: dict[int, dict[str, Any]] = {}
    for n in sizes:
        ann = write_style(pool[:n], work / f"style_train_{n}.jsonl", a.style)
        model = work / f"model_{n}"
        args = ["fit", "--dataset", "jsonl", "--annotations", str(ann), "--images", images, "--out", str(model),
                "--overwrite", "--jobs", str(a.jobs)]
        meta = json.loads((model / "model.json").read_text()) if (model / "model.json").is_file() else {}
        on = meta.get("trained_on", {})
        if a.reuse and on.get("images") == n and Path(str(on.get("annotations"))).name == ann.name:
            fits[n] = {"out": str(model), "images": n, "cv": meta["cv"], "seconds": meta.get("fit_seconds"),
                       "reused": True}
            log.append({"command": "cropper-engine " + shlex.join([*args, "--json"]), "reused": True})
            print(f"reused {model}", flush=True)
            continue
        fits[n] = cli(args, log)
    rows = []
    val_models = [int(v) for v in a.val_models.split(",")]
    for set_name, ann in sets.items():
        for ratio in (True, False):
            for n in [0, *sizes]:
                if set_name == "FCDB val" and n not in val_models:
                    continue
                args = ["eval", "--dataset", "jsonl", "--annotations", str(ann), "--images", images,
                        "--method", "cropper", *(["--ratio-from-gt"] if ratio else [])]
                if n:
                    args += ["--default-model", str(work / f"model_{n}")]
                s = cli(args, log)
                rows.append({"set": set_name, "task": f"ratio {STYLES[a.style][2]} given" if ratio else "free-form",
                             "model": f"fitted on {n}" if n else "shipped", "fit_images": n, "images": s["n"],
                             "iou": round(s["iou"], 4), "disp": round(s["disp"], 4),
                             "alpha_recall": round(s["alpha_recall"], 4)})
    md = ["| held-out set | task | model | images | IoU | Disp |", "|---|---|---|---|---|---|"]
    md += [f"| {r['set']} | {r['task']} | {r['model']} | {r['images']} | {r['iou']:.3f} | {r['disp']:.3f} |"
           for r in rows]
    fit_md = ["| fitting images | fit seconds | CV ratio IoU (shipped) | CV free IoU (shipped) |",
              "|---|---|---|---|"]
    for n, f in fits.items():
        cv = f["cv"]
        fit_md.append(f"| {n} | {f['seconds']} | {cv['ratio']['iou']:.3f} ({cv['ratio']['shipped_iou']:.3f}) | "
                      f"{cv['free']['iou']:.3f} ({cv['free']['shipped_iou']:.3f}) |")
    figures = {
        "style": a.style, "style_description": STYLES[a.style][1],
        "split": f"FCDB train shuffled with seed 0: fit on the first N of {pool_size}, held out the next {n_test}; "
                 "and FCDB val (never seen by the shipped model)",
        "rows": rows, "fits": {str(n): f for n, f in fits.items()}, "commands": log,
        "load_average_before": [round(v, 2) for v in load0], "load_average_after":
            [round(v, 2) for v in os.getloadavg()],
        "git": git_sha(), "device": device_info(), "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["python", "bench/studies/style_experiment.py", *sys.argv[1:]]),
    }
    out = Path(a.out or RESULTS / f"style_experiment_{a.style}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n\n" + "\n".join(fit_md) + "\n")
    print("\n".join(md))
    print("\n".join(fit_md))
    print(json.dumps({"out": str(out), "rows": len(rows)}))


if __name__ == "__main__":
    main()
