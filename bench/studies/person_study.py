"""Do people who crop photos keep whole persons, as they keep faces? FCDB's annotators, measured.

    python -m bench persons [--data ../shared/data/fcdb] [--limit N] [--out PATH]

For every FCDB image (train and val), the person detector (MediaPipe, as `--subject person` runs
it) and the face detector; for the largest person: its share of the frame and whether the ground
truth crop holds the whole person box (within 2 % of the image's longer side). Reported: how
many images show a large person (at least 15 % of the frame), the share of those whose human
crop keeps the whole person, the same for the images among them without a detected face, and,
for comparison, the share of images with faces whose human crop keeps the largest face whole.
This is why the default keeps the main faces inside every crop but not whole persons (a person
subject does: `--subject person`). Writes bench/results/person_study.json (with provenance).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, save_json  # noqa: E402  (first: it notes the load at the start)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fcdb"
DEFAULT_OUT = RESULTS / "person_study.json"
LARGE = 0.15  # a person box at least this share of the frame is a large person
TOL = 0.02  # of the image's longer side: how far a box may stick out of the crop and still count as held


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the FCDB folder (train.jsonl, val.jsonl, images/)")
    ap.add_argument("--limit", type=int, default=None, help="the first N images of each split (a smoke test)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    from cropper_engine.engine.subject.detectors import detect_faces, detect_persons, face_detector, person_detector
    from cropper_engine.imageio import open_image
    from cropper_engine.types import Box

    persons, faces = person_detector(), face_detector()
    if persons is None or faces is None:
        sys.exit("the study needs MediaPipe's detectors: pip install 'cropper-engine[subject]'")
    data = Path(a.data)
    rows = []
    for split in ("train", "val"):
        lines = [x for x in (data / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        rows += [json.loads(x) for x in lines[:a.limit]]
    n = {"images": 0, "with_person": 0, "large_person": 0, "large_person_kept": 0, "large_person_no_face": 0,
         "large_person_no_face_kept": 0, "with_face": 0, "largest_face_kept": 0}
    t0 = time.perf_counter()
    for r in rows:
        img = open_image(str(data / "images" / r["image"])).image
        w, h = img.size
        gt, tol = Box(*(float(v) for v in r["crop"])), TOL * max(w, h)
        n["images"] += 1
        found = detect_faces(img, faces)
        if found:
            n["with_face"] += 1
            n["largest_face_kept"] += gt.contains(found[0].box, tol=tol)
        boxes, _ = detect_persons(img, persons)
        if not boxes:
            continue
        n["with_person"] += 1
        big = max(boxes, key=lambda b: b.area)
        if big.area < LARGE * w * h:
            continue
        kept = gt.contains(big, tol=tol)
        n["large_person"] += 1
        n["large_person_kept"] += kept
        if not found:
            n["large_person_no_face"] += 1
            n["large_person_no_face_kept"] += kept

    def share(k: str, of: str) -> float | None:
        return round(n[k] / n[of], 4) if n[of] else None

    figures = {"what": "FCDB train + val: do the human crops keep whole large persons, and the largest face",
               "large": LARGE, "tolerance": TOL, "limit": a.limit, "counts": n,
               "large_person_kept_share": share("large_person_kept", "large_person"),
               "large_person_no_face_kept_share": share("large_person_no_face_kept", "large_person_no_face"),
               "largest_face_kept_share": share("largest_face_kept", "with_face"),
               "seconds": round(time.perf_counter() - t0, 1)}
    save_json(a.out, figures)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
