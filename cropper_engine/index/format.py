"""The on-disk format of an example index: file names, manifest, rows, and the checks at load.

A directory holds four files, written into a temporary sibling and renamed into place, so a
crash never leaves a half-written index that loads (the manifest is written last, and
loading requires it; index/atomic.py):

- `manifest.json`  format version, embedder (its `describe()`: id, dim, preprocessing),
                   space ("ip" on unit vectors = cosine), M, ef_construction, ef, count,
                   source, created / updated timestamps, hnswlib version;
- `graph.bin`      the hnswlib graph (`save_index`); labels are row ids 0..N-1;
- `vectors.npy`    float32 [N, D] unit rows, for exact search and for appending;
- `metadata.jsonl` row i = example i as `Example.to_json()` ("id" first). No pickle.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import ExampleIndexError, InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.bin"
VECTORS = "vectors.npy"
METADATA = "metadata.jsonl"
SPACE = "ip"

# Chosen with bench/index_bench.py (512-d, 1,000 Gaussian clusters, 2 cores). HNSW recall@30 against
# exact search: 0.993 at 10k, 1.000 at 100k, 0.991 at 1M (a plateau set by the graph: more ef does not
# raise it); p50 query ~0.6-0.75 ms at 100k; 100k built in 20-40 s. M=24 / ef=192 missed 0.99 at 10k,
# M=32 or ef_construction=200 doubled the build time. Below 20k rows exact search is as fast (< 1 ms).
DEFAULT_M = 28
DEFAULT_EF_CONSTRUCTION = 100
DEFAULT_EF = 176
DEFAULT_EXACT_BELOW = 20_000
RANDOM_SEED = 100

_ID_PREFIX = '{"id": '
_decoder = json.JSONDecoder()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _hnswlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hnswlib")
    except PackageNotFoundError:
        return "unknown"


def _rebuild_hint(path: Path, manifest: dict[str, Any] | None = None) -> str:
    """The command that rebuilds the index: in full where the manifest names its source."""
    src = (manifest or {}).get("source") or {}
    if isinstance(src, dict) and src.get("dataset") and src.get("annotations"):
        import shlex

        args = ["--dataset", str(src["dataset"]), "--annotations", str(src["annotations"])]
        for key in ("images", "split"):
            if src.get(key):
                args += [f"--{key}", str(src[key])]
        spec = ((manifest or {}).get("embedder") or {}).get("spec")
        if spec:
            args += ["--embedder", str(spec)]
        cmd = " ".join(shlex.quote(a) for a in args)
        return f"rebuild it with `cropper-engine index build {cmd} --out {shlex.quote(str(path))} --overwrite`"
    return f"rebuild it with `cropper-engine index build ... --out {path} --overwrite`"


def _embedder_info(embedder: Any) -> dict[str, Any]:
    """An embedder's describe() dict (or a given dict), checked for id and dim."""
    info = dict(embedder) if isinstance(embedder, dict) else dict(embedder.describe())
    if not isinstance(embedder, dict):
        info.setdefault("id", embedder.id)
        info.setdefault("dim", embedder.dim)
        if getattr(embedder, "spec", None):
            info.setdefault("spec", embedder.spec)
    if not info.get("id") or not isinstance(info.get("dim"), int):
        raise InputError(f"an embedder description needs an 'id' and an integer 'dim', got {info}")
    return info


def _check_unit_rows(path: Path, vectors: np.ndarray, manifest: dict[str, Any], chunk: int = 65536) -> None:
    """Every row finite and of unit length, as written: a file damaged without changing its size
    (similarities of 1e28) is named at load, in a few ms a 100k rows (the full checksums of the
    large files are `verify`'s, `index info`'s)."""
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start:start + chunk], dtype=np.float32)
        with np.errstate(all="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise ExampleIndexError(f"{path} is damaged: row {row} is not a unit vector (its length is "
                                    f"{norms[row - start]:.3g}); {_rebuild_hint(path.parent, manifest)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sizes(p: Path, manifest: dict[str, Any]) -> None:
    """Each file's size against the manifest's record of it (indexes written before the record
    was kept have none): a truncated or replaced file is named at load, with the fix."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    for name, rec in files.items():
        want = rec.get("bytes") if isinstance(rec, dict) else None
        if not isinstance(want, int):
            continue
        try:
            got = (p / name).stat().st_size
        except FileNotFoundError:
            raise ExampleIndexError(f"the index at {p} has no {name}; {_rebuild_hint(p, manifest)}") from None
        if got != want:
            raise ExampleIndexError(f"{p / name} is damaged: {got} bytes but the manifest says {want} "
                                    f"(truncated or replaced?); {_rebuild_hint(p, manifest)}")


def _example_line(row: Example | dict[str, Any]) -> bytes:
    d = row.to_json() if isinstance(row, Example) else dict(row)
    if "id" not in d:
        raise InputError(f"a metadata row needs an 'id': {str(d)[:200]}")
    d = {"id": str(d["id"]), **{k: v for k, v in d.items() if k != "id"}}
    # ASCII JSON: a name that is not UTF-8 (surrogate escapes) is written as \udcXX, never a crash
    return json.dumps(d, ensure_ascii=True).encode("ascii")


def _line_id(line: bytes) -> str:
    text = line.decode("utf-8")
    if text.startswith(_ID_PREFIX):
        value, _ = _decoder.raw_decode(text, len(_ID_PREFIX))
        return str(value)
    return str(json.loads(text)["id"])


def _read_manifest(p: Path) -> dict[str, Any]:
    if not p.exists():
        hint = ""
        stale = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.exists() else []
        if stale:
            hint = f" (an interrupted rebuild left the previous index at {stale[-1]}; rename it back)"
        raise ExampleIndexError(f"no example index at {p}{hint}; build one with "
                                f"`cropper-engine index build ... --out {p}`")
    if not p.is_dir():
        raise ExampleIndexError(f"{p} is a file, not an example index folder")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ExampleIndexError(f"{p} has no {MANIFEST}: it is not a complete example index (was its "
                                f"build interrupted?); {_rebuild_hint(p)}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExampleIndexError(f"{mpath} is corrupt ({exc}); {_rebuild_hint(p)}") from None
    if not isinstance(manifest, dict):
        raise ExampleIndexError(f"{mpath} is corrupt (not a JSON object); {_rebuild_hint(p)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExampleIndexError(f"the index at {p} has format version {version!r}; this cropper-engine "
                                f"reads version {FORMAT_VERSION}: {_rebuild_hint(p)}")
    emb = manifest.get("embedder")
    problems = [key for key in ("count", "dim", "ef", "M", "ef_construction")
                if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool)]
    if not isinstance(emb, dict) or not emb.get("id") or not isinstance(emb.get("dim"), int):
        problems.append("embedder")
    if manifest.get("space") != SPACE:
        problems.append("space")
    if problems:
        raise ExampleIndexError(f"{mpath} is corrupt (bad or missing: {', '.join(problems)}); "
                                f"{_rebuild_hint(p)}")
    if emb["dim"] != manifest["dim"] or manifest["count"] < 1 or manifest["ef"] < 1:
        raise ExampleIndexError(f"{mpath} is inconsistent (dim or count); {_rebuild_hint(p)}")
    return manifest
