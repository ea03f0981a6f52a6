"""The built-in example table shipped in the package: used when no --index is given.

It holds descriptors and normalised ground-truth crops of a public cropping dataset (FCDB's
training split: 1,138 images; no images, only their file names as ids, sizes and crops), built
for one embedder; `builtin_index(embedder)` returns it when it matches the embedder in use, else
None. It is an `ExampleIndex` (the same search, exclusion by id and metadata rows) kept small:

    assets/builtin/<embedder id>/manifest.json    an index manifest, "has_images": false
                                 vectors.f16.npy  float16 unit rows (re-normalised on load)
                                 metadata.jsonl   one example a row: id (the FCDB file name),
                                                  image, width, height, crops (pixels)

No HNSW graph: at this size exact search is faster. Rebuild it (it reads the images from the
dataset folder and writes only the table):

    python -m cropper_engine.index.builtin --fcdb ../shared/data/fcdb
"""

from __future__ import annotations

import argparse
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "builtin"
VECTORS_F16 = "vectors.f16.npy"
EXACT_BELOW = 1 << 30  # always exact search: there is no graph


def table_dir(embedder_id: str) -> Path:
    return ASSETS / re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_id)


@lru_cache(maxsize=4)
def _load(d: str) -> Any:
    from cropper_engine.index.store import ExampleIndex

    p = Path(d)
    manifest = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
    vectors = np.load(p / VECTORS_F16, allow_pickle=False).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    metadata = (p / "metadata.jsonl").read_bytes()
    if vectors.shape != (manifest["count"], manifest["dim"]):
        from cropper_engine.errors import ExampleIndexError

        raise ExampleIndexError(f"the built-in table at {p} is damaged (vectors {vectors.shape}, manifest "
                                f"{manifest['count']} x {manifest['dim']}); reinstall cropper-engine")
    return ExampleIndex(p, manifest, vectors, metadata, exact_below=EXACT_BELOW)


def load_table(embedder_id: str) -> Any | None:
    """The built-in table for an embedder id, or None when none is shipped for it."""
    d = table_dir(embedder_id)
    if not (d / "manifest.json").is_file() or not (d / VECTORS_F16).is_file():
        return None
    return _load(str(d))


def builtin_index(embedder: Any) -> Any | None:
    index = load_table(embedder.id)
    if index is not None:
        index._check_embedder(embedder)
    return index


def build_table(fcdb: str | Path, out: str | Path | None = None, split: str = "train.jsonl") -> Path:
    """Embed FCDB's training images with the classical embedder and write the table."""
    from cropper_engine.data.readers import read_dataset
    from cropper_engine.imageio import open_image
    from cropper_engine.index.store import FORMAT_VERSION, SPACE, _embedder_info, _example_line, _now
    from cropper_engine.models.classical import ClassicalEmbedder

    emb = ClassicalEmbedder()
    ds = read_dataset("fcdb", Path(fcdb) / split)
    examples = sorted(ds.examples, key=lambda e: e.id)
    vectors = np.zeros((len(examples), emb.dim), dtype=np.float32)
    rows = []
    for i, ex in enumerate(examples):
        vectors[i] = emb.embed([open_image(ex.image_path).image])[0]
        d = ex.to_json()
        d["image"] = Path(ex.image_path).name  # never a path of this machine
        rows.append(_example_line(d))
    out_dir = Path(out) if out is not None else table_dir(emb.id)
    out_dir.mkdir(parents=True, exist_ok=True)
    v16 = vectors.astype(np.float16)
    info = _embedder_info(emb)
    manifest = {
        "format_version": FORMAT_VERSION, "embedder": info, "space": SPACE, "dim": int(emb.dim),
        "M": 0, "ef_construction": 0, "ef": 1, "count": len(examples),
        "source": {"dataset": "fcdb", "split": Path(split).stem, "count": len(examples),
                   "command": "python -m cropper_engine.index.builtin --fcdb ../shared/data/fcdb"},
        "created": _now(), "updated": _now(), "has_images": False, "vectors": VECTORS_F16,
    }
    np.save(out_dir / VECTORS_F16, v16, allow_pickle=False)
    (out_dir / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _load.cache_clear()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cropper_engine.index.builtin", description=__doc__.split("\n")[0])
    ap.add_argument("--fcdb", required=True, help="the FCDB folder (train.jsonl and images/)")
    ap.add_argument("--out", default=None, help="where to write it (default: the package's assets)")
    a = ap.parse_args(argv)
    d = build_table(a.fcdb, a.out)
    print(f"wrote {d} ({sum(f.stat().st_size for f in d.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
