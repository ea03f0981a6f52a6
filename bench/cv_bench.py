"""The README's cross-validation table of the no-VLM default: FCDB train, grouped 5-fold CV.

    python -m bench cv [--fcdb ../shared/data/fcdb] [--folds 5] [--limit N] [--out PATH]

The same rows and CV as `python -m cropper_engine.engine.fit_default` (which fits the shipped
model, and keeps the CV in its model.json): every training image and its mirror image, its
neighbours in the built-in table leave-one-out, every candidate's features; one LambdaRank
model per task fitted on 4 folds and scored on the fifth (grouped by image; val never read).
Nothing is fitted into the package: only bench/results/default_cv.json is written.
Needs lightgbm (`pip install 'cropper-engine[fit]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = RESULTS / "default_cv.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fcdb", default=str(DEFAULT_DATA), help="the FCDB folder (train.jsonl, images/)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="processes for the features")
    ap.add_argument("--limit", type=int, default=None, help="the first N training images only (a smoke test)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    if a.folds < 2:
        ap.error("--folds must be at least 2")
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        sys.exit("the CV needs lightgbm: pip install 'cropper-engine[fit]' (or pip install lightgbm)")
    if not (Path(a.fcdb) / "train.jsonl").exists():
        sys.exit(f"{Path(a.fcdb) / 'train.jsonl'} not found: pass --fcdb DIR (the FCDB folder)")
    from cropper_engine.engine.fit_default import TASKS, build_rows, cross_validate

    rows = build_rows(a.fcdb, mirror=True, jobs=a.jobs, limit=a.limit)
    cv = {}
    for task in TASKS:
        cv[task] = cross_validate(rows[task], a.folds, log=lambda s: print(s, flush=True), task=task)
        print(f"{task}: {cv[task]}", flush=True)
    figures = {"what": "FCDB train, grouped k-fold CV of the no-VLM default's trees (shipped settings)",
               "folds": a.folds, "limit": a.limit, "cv": cv}
    save_json(a.out, figures)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
