"""The README's evaluation table: FCDB val (200 images) for the baselines and the no-VLM default.

    python -m bench eval [--data ../shared/data/fcdb] [--limit N] [--out PATH]

Runs `cropper-engine eval --json` once per row (each a fresh process, the default configuration:
keep faces whole on, the built-in table, every image excluded from its own neighbours) and writes
the four runs, each with its exact command, to bench/results/fcdb_val_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = RESULTS / "fcdb_val_eval.json"
RUNS = [  # (row, eval arguments)
    ("center", ["--method", "center", "--ratio-from-gt"]),
    ("full", ["--method", "full"]),
    ("cropper_ratio", ["--method", "cropper", "--ratio-from-gt"]),
    ("cropper_free", ["--method", "cropper"]),
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the FCDB folder (val.jsonl, images/)")
    ap.add_argument("--limit", type=int, default=None, help="the first N images only (a smoke test)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    ann = Path(a.data) / "val.jsonl"
    if not ann.exists():
        sys.exit(f"{ann} not found: pass --data DIR (the FCDB folder with val.jsonl and images/)")
    runs = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for row, extra in RUNS:
        args = ["eval", "--dataset", "fcdb", "--annotations", str(ann), *extra, "--json"]
        if a.limit:
            args += ["--limit", str(a.limit)]
        out = subprocess.run([sys.executable, "-m", "cropper_engine.cli", *args], capture_output=True, text=True,
                             env=env, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"cropper-engine {' '.join(args)} failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        shown = " ".join("../shared/data/fcdb/val.jsonl" if x == str(ann) else x for x in args)
        runs.append({"row": row, **res, "command": f"cropper-engine {shown}"})
        print(f"{row:14s} n={res['n']} IoU {res['iou']:.3f} Disp {res['disp']:.3f} "
              f"alpha-recall {res['alpha_recall']:.3f} ({res['seconds']:.1f} s)", flush=True)
    figures = {"what": "FCDB val: baselines and the no-VLM default (default configuration: keep faces whole "
                       "on, the built-in table, each image excluded from its own neighbours)",
               "limit": a.limit, "runs": runs}
    save_json(a.out, figures)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
