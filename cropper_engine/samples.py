"""Write a few freely licensed sample photos (from scikit-image's package data) to a folder.

    python -m cropper_engine.samples samples/

The photos and their licences, as scikit-image documents them:
astronaut (Eileen Collins, NASA: public domain), chelsea (the cat, Stefan van der Walt: CC0),
coffee (Rachel Michetti: CC0), rocket (NASA / SpaceX launch: public domain).
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLES = {
    "astronaut": "public domain (NASA)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "rocket": "public domain (NASA)",
}


def write_samples(out_dir: str | Path) -> list[Path]:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("scikit-image is needed for the samples: pip install scikit-image") from None
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLES:
        arr = getattr(data, name)()
        path = out / f"{name}.jpg"
        Image.fromarray(arr).convert("RGB").save(path, quality=92)
        paths.append(path)
    (out / "LICENSES.txt").write_text(
        "".join(f"{n}.jpg: {lic}, from scikit-image's data\n" for n, lic in SAMPLES.items()))
    return paths


if __name__ == "__main__":
    for p in write_samples(sys.argv[1] if len(sys.argv) > 1 else "samples"):
        print(p)
