"""`ExampleIndex`: an on-disk HNSW index of example images with row-aligned metadata.

A directory holds four files, written into a temporary sibling and renamed into place, so a
crash never leaves a half-written index that loads (the manifest is written last, and
loading requires it):

- `manifest.json`  format version, embedder (its `describe()`: id, dim, preprocessing),
                   space ("ip" on unit vectors = cosine), M, ef_construction, ef, count,
                   source, created / updated timestamps, hnswlib version;
- `graph.bin`      the hnswlib graph (`save_index`); labels are row ids 0..N-1;
- `vectors.npy`    float32 [N, D] unit rows, for exact search and for appending;
- `metadata.jsonl` row i = example i as `Example.to_json()` ("id" first). No pickle.

Subject boxes (the subject-aware task's examples): an example with a mask file gets the mask's
tight box (`mask_box`, extra["mask_box_from"] = "mask"); one with a box from its dataset keeps
it; one without either gets the automatic subject of `--subject auto` (faces, else persons, else
the salient region; index/subjects.py): `mask_box`, one box per crop in extra["mask_boxes"] and
extra["mask_box_from"] = "auto:faces" | "auto:persons" | "auto:saliency". `subjects="none"`
(`index build --subjects none`) leaves such examples without. The manifest's "subjects" records
the mode, how many rows got their box from where ("counts"), the detectors and their versions.

Loading is cheap: vectors are memory-mapped, metadata rows are parsed on first use and the
graph is read on the first approximate query. Small indexes (< `exact_below` rows) are
searched exactly by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import ExampleIndexError, ImageError, InputError
from cropper_engine.index.subjects import subject_counts
from cropper_engine.types import Box

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.bin"
VECTORS = "vectors.npy"
METADATA = "metadata.jsonl"
SPACE = "ip"
SUBJECT_MODES = ("auto", "none")

# Chosen with bench/index_bench.py (512-d, 1,000 Gaussian clusters, 2 cores). HNSW recall@30 against
# exact search: 0.993 at 10k, 1.000 at 100k, 0.991 at 1M (a plateau set by the graph: more ef does not
# raise it); p50 query ~0.6-0.75 ms at 100k; 100k built in 20-40 s. M=24 / ef=192 missed 0.99 at 10k,
# M=32 or ef_construction=200 doubled the build time. Below 20k rows exact search is as fast (< 1 ms).
DEFAULT_M = 28
DEFAULT_EF_CONSTRUCTION = 100
DEFAULT_EF = 176
DEFAULT_EXACT_BELOW = 20_000
RANDOM_SEED = 100

Exclude = Callable[[int], bool] | Collection[str] | str | None

_ID_PREFIX = '{"id": '
_decoder = json.JSONDecoder()


class Neighbour(NamedTuple):
    """One retrieved example: its row in the index, its id and its cosine similarity."""

    row: int
    id: str
    similarity: float


@dataclass
class BuildReport:
    """What a build or an append did: rows written, images skipped (with why), seconds."""

    count: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""
    total: int = 0
    subjects: dict[str, Any] = field(default_factory=dict)  # the rows written: counts by subject-box source

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "skipped": len(self.skipped),
                "skipped_messages": list(self.skipped), "seconds": round(self.seconds, 3),
                "path": self.path, "subjects": dict(self.subjects)}


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


def _normalise_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms < 1e-12).any():
        raise InputError(f"{what} contain an all-zero vector, which has no direction")
    if np.abs(norms - 1.0).max(initial=0.0) > 1e-4:
        x = x / norms
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalise_queries(q: np.ndarray) -> np.ndarray:
    """Like `_normalise_rows`, with one reduction: queries are on the hot path."""
    norms = np.sqrt(np.einsum("ij,ij->i", q, q))
    if not (np.isfinite(norms).all() and norms.min() > 1e-12):
        raise InputError("query vectors must be finite and non-zero")
    if np.abs(norms - 1.0).max() > 1e-4:
        q = q / norms[:, None]
    return q


def build_graph(vectors: np.ndarray, *, M: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                num_threads: int = -1, random_seed: int = RANDOM_SEED, max_elements: int | None = None) -> Any:
    """An hnswlib graph ("ip" space) over unit rows, labelled with row ids 0..N-1."""
    import hnswlib

    n, dim = vectors.shape
    graph = hnswlib.Index(space=SPACE, dim=int(dim))
    graph.init_index(max_elements=max(max_elements or n, 1), M=M, ef_construction=ef_construction,
                     random_seed=random_seed)
    if n:
        graph.add_items(vectors, np.arange(n, dtype=np.int64), num_threads=num_threads)
    return graph


# --- atomic directory writes ------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace something we should not (early, before the expensive work)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExampleIndexError(f"cannot write the index to {out}: it is a file, not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExampleIndexError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not (out / MANIFEST).exists():
        raise ExampleIndexError(
            f"{out} is not an example index (it has no {MANIFEST}); refusing to replace it even with "
            "--overwrite: choose another --out or remove it yourself"
        )


def _temp_dir(out: Path, tag: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a complete temporary index to `out`; an old index is moved aside, then removed."""
    _check_target(out, overwrite)
    aside: Path | None = None
    if out.exists():
        if any(out.iterdir()):
            aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, aside)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    try:
        _fsync_path(out.parent)
    except OSError:  # some filesystems do not fsync directories; the rename is done anyway
        pass
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_index_dir(tmp: Path, vectors: np.ndarray, lines: Iterable[bytes], graph: Any,
                     manifest: dict[str, Any]) -> None:
    """All files into `tmp`, each fsynced; the manifest last."""
    with open(tmp / VECTORS, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / METADATA, "wb") as f:
        for line in lines:
            f.write(line)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    graph.save_index(str(tmp / GRAPH))
    _fsync_path(tmp / GRAPH)
    manifest["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                         for name in (VECTORS, METADATA, GRAPH)}
    part = tmp / (MANIFEST + ".part")
    with open(part, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)
    _fsync_path(tmp)


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


# --- embedding examples -----------------------------------------------------------------


def _check_subjects(subjects: str) -> str:
    mode = str(subjects).strip().lower()
    if mode not in SUBJECT_MODES:
        raise InputError(f"subjects must be one of {', '.join(SUBJECT_MODES)}, got {subjects!r}")
    return mode


def _embed_examples(examples: Iterable[Example], embedder: Any, *, batch_size: int, progress: bool,
                    on_error: Callable[[str], None] | None, skip_ids: Collection[str] = (),
                    subjects: str = "auto", stats: dict[str, Any] | None = None,
                    ) -> tuple[np.ndarray, list[Example], list[str]]:
    """Open and embed examples in batches; unreadable images are reported and skipped.

    Each example gets its subject box on the way (see the module's docstring): from its mask
    file, else (subjects="auto", no box from the dataset) the automatic subject of its image.
    `stats` (when given) receives "subject_seconds" and "crop_boxes" (how the automatic per-crop
    boxes were found: the subject inside the crop, or the crop's own salient region)."""
    from tqdm import tqdm

    from cropper_engine.imageio import open_image
    from cropper_engine.index.subjects import apply_auto_subject, has_subject_box

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    auto = _check_subjects(subjects) == "auto"
    stats = stats if stats is not None else {}
    stats.setdefault("subject_seconds", 0.0)
    crop_from: dict[str, int] = stats.setdefault("crop_boxes", {})
    dim = int(embedder.dim)
    chunks: list[np.ndarray] = []
    kept: list[Example] = []
    skipped: list[str] = []
    seen: set[str] = set(skip_ids)
    batch_images: list[Any] = []
    batch_examples: list[Example] = []

    def skip(msg: str) -> None:
        skipped.append(msg)
        if on_error is not None:
            on_error(msg)

    def flush() -> None:
        if not batch_images:
            return
        vecs = np.asarray(embedder.embed(batch_images), dtype=np.float32)
        if vecs.shape != (len(batch_images), dim):
            raise ExampleIndexError(
                f"embedder {embedder.id!r} returned shape {vecs.shape} for {len(batch_images)} images; "
                f"expected ({len(batch_images)}, {dim})"
            )
        chunks.append(_normalise_rows(vecs, f"embeddings from {embedder.id!r}"))
        kept.extend(batch_examples)
        batch_images.clear()
        batch_examples.clear()

    desc = "embedding examples, subject boxes" if auto else "embedding examples"
    bar = tqdm(examples, desc=desc, unit="img", file=sys.stderr, disable=not progress)
    for ex in bar:
        if ex.id in seen:
            skip(f"{ex.id}: duplicate example id (already in the index), skipped")
            continue
        try:
            image = open_image(ex.image_path).image
        except ImageError as exc:
            skip(f"{ex.id}: {exc}")
            continue
        seen.add(ex.id)
        if ex.mask_path:
            _derive_subject_box(ex)
        if auto and not has_subject_box(ex):
            t = time.perf_counter()
            got = apply_auto_subject(ex, image)
            stats["subject_seconds"] += time.perf_counter() - t
            for how in got.crop_from if got is not None else ():
                crop_from[how] = crop_from.get(how, 0) + 1
        batch_images.append(image)
        batch_examples.append(ex)
        if len(batch_images) >= batch_size:
            flush()
    flush()
    bar.close()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    return vectors, kept, skipped


def _subjects_record(mode: str, kept: Sequence[Example], stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "subjects" for rows just embedded: the mode, the counts by source, and
    (where automatic boxes were computed) how the per-crop boxes were found, the seconds spent
    and the detectors with their versions."""
    from cropper_engine.index.subjects import detector_info

    counts = subject_counts(kept)
    rec: dict[str, Any] = {"mode": mode, "counts": counts}
    if any(k.startswith("auto:") for k in counts):
        rec["crop_boxes"] = dict(sorted(stats.get("crop_boxes", {}).items()))
        rec["seconds"] = round(float(stats.get("subject_seconds", 0.0)), 3)
        rec["detectors"] = detector_info()
    return rec


def _merge_subjects(old: dict[str, Any], new: dict[str, Any], old_rows: Sequence[bytes]) -> dict[str, Any]:
    """The manifest's "subjects" after an append: counts over all rows (an index written before
    they were recorded is counted from its rows), the build's detectors (each addition keeps its
    own in "additions")."""
    old_counts = old.get("counts")
    if not isinstance(old_counts, dict):
        old_counts = subject_counts(json.loads(line) for line in old_rows)
    counts = dict(old_counts)
    for k, v in new["counts"].items():
        counts[k] = counts.get(k, 0) + v
    out = {**new, **{k: v for k, v in old.items() if k not in ("counts", "crop_boxes", "seconds")}}
    out["counts"] = dict(sorted(counts.items()))
    crop_boxes = dict(old.get("crop_boxes") or {})
    for k, v in (new.get("crop_boxes") or {}).items():
        crop_boxes[k] = crop_boxes.get(k, 0) + v
    if crop_boxes:
        out["crop_boxes"] = dict(sorted(crop_boxes.items()))
    seconds = float(old.get("seconds") or 0.0) + float(new.get("seconds") or 0.0)
    if seconds:
        out["seconds"] = round(seconds, 3)
    return out


def _derive_subject_box(ex: Example) -> None:
    """The subject box of an example with a mask file: the mask's tight box (scaled to the image
    when the mask has another size), the same way the loop derives a query's; stored in the
    metadata as `mask_box` with extra["mask_box_from"] = "mask". An unreadable or empty mask
    leaves the dataset's own `mask_box` (if any; else, with subjects="auto", the
    automatic subject: index/subjects.py)."""
    from cropper_engine.engine.geometry import mask_bbox
    from cropper_engine.imageio import load_mask

    try:
        mask = load_mask(ex.mask_path)
        box = mask_bbox(mask)
    except (ImageError, ValueError, OSError):
        return
    h, w = mask.shape
    sx, sy = ex.width / w, ex.height / h
    ex.mask_box = Box(box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
    ex.extra = {**ex.extra, "mask_box_from": "mask"}


# --- the index --------------------------------------------------------------------------


class ExampleIndex:
    """A loaded example index. Build one with `build` / `from_vectors`, open one with `load`."""

    def __init__(self, path: Path, manifest: dict[str, Any], vectors: np.ndarray, metadata: bytes, *,
                 ef: int | None = None, exact_below: int = DEFAULT_EXACT_BELOW) -> None:
        self.path = path
        self.manifest = manifest
        self.vectors = vectors
        self.exact_below = int(exact_below)
        self._ef = int(ef if ef is not None else manifest["ef"])
        self._metadata = metadata
        self._lines: list[bytes] | None = None
        self._ids: dict[int, str] = {}
        self._examples: dict[int, Example] = {}
        self._row_of: dict[str, int] | None = None
        self._graph: Any = None
        self._lock = threading.Lock()

    # -- building -------------------------------------------------------------------------

    @classmethod
    def build(cls, examples: Iterable[Example], embedder: Any, out_dir: str | os.PathLike[str], *,
              M: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef: int = DEFAULT_EF,
              batch_size: int = 32, overwrite: bool = False, source: dict[str, Any] | None = None,
              progress: bool = False, on_error: Callable[[str], None] | None = None,
              subjects: str = "auto") -> BuildReport:
        """Embed the examples' images and write a new index to `out_dir` atomically.

        subjects="auto" (the default) gives every example without a subject box (no mask file,
        no box from its dataset) the automatic subject of `--subject auto` (index/subjects.py);
        "none" leaves them without. The manifest's "subjects" records the counts by source."""
        t0 = time.perf_counter()
        out = Path(out_dir)
        mode = _check_subjects(subjects)
        _check_target(out, overwrite)
        stats: dict[str, Any] = {}
        vectors, kept, skipped = _embed_examples(examples, embedder, batch_size=batch_size,
                                                 progress=progress, on_error=on_error, subjects=mode, stats=stats)
        if not kept:
            first = f"; first problem: {skipped[0]}" if skipped else ""
            raise ExampleIndexError(f"no example could be embedded, so no index was written to {out}{first}")
        record = _subjects_record(mode, kept, stats)
        cls.from_vectors(vectors, kept, out, embedder=embedder, M=M, ef_construction=ef_construction,
                         ef=ef, overwrite=overwrite, source=source, subjects=record)
        return BuildReport(count=len(kept), skipped=skipped, seconds=time.perf_counter() - t0,
                           path=str(out), total=len(kept), subjects=record)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, rows: Sequence[Example | dict[str, Any]],
                     out_dir: str | os.PathLike[str], *, embedder: Any, M: int = DEFAULT_M,
                     ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef: int = DEFAULT_EF,
                     overwrite: bool = False, source: dict[str, Any] | None = None, graph: Any = None,
                     num_threads: int = -1, exact_below: int = DEFAULT_EXACT_BELOW,
                     subjects: dict[str, Any] | None = None) -> ExampleIndex:
        """Write an index of precomputed unit vectors and their rows (Examples or their JSON).

        `embedder` is the Embedder (or its describe() dict) that made the vectors; `graph`
        an hnswlib graph already built over exactly these vectors (see `build_graph`);
        `subjects` the manifest's record of how the rows got their subject boxes (`build`
        passes it; by default mode "given": the rows are written as they are), whose "counts"
        are always those of `rows`.
        """
        out = Path(out_dir)
        _check_target(out, overwrite)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise InputError(f"vectors must be a non-empty [N, D] array, got shape {vectors.shape}")
        if len(rows) != vectors.shape[0]:
            raise InputError(f"{vectors.shape[0]} vectors but {len(rows)} metadata rows; they must align")
        info = _embedder_info(embedder)
        if info["dim"] != vectors.shape[1]:
            raise InputError(f"embedder {info['id']!r} has dim {info['dim']} but the vectors have "
                             f"dim {vectors.shape[1]}")
        vectors = _normalise_rows(vectors, "vectors")
        lines = [_example_line(r) for r in rows]
        seen: set[str] = set()
        for line in lines:
            ex_id = _line_id(line)
            if ex_id in seen:
                raise InputError(f"example ids must be unique; {ex_id!r} appears more than once")
            seen.add(ex_id)
        if graph is None:
            graph = build_graph(vectors, M=M, ef_construction=ef_construction, num_threads=num_threads)
        elif graph.get_current_count() != len(vectors) or graph.dim != vectors.shape[1]:
            raise InputError("the given graph does not hold exactly these vectors")
        now = _now()
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedder": info,
            "space": SPACE,
            "dim": int(vectors.shape[1]),
            "M": int(M),
            "ef_construction": int(ef_construction),
            "ef": int(ef),
            "count": len(vectors),
            "source": dict(source or {}),
            "created": now,
            "updated": now,
            "hnswlib": _hnswlib_version(),
            "subjects": {"mode": "given", **(subjects or {}), "counts": subject_counts(rows)},
        }
        tmp = _temp_dir(out, "tmp")
        try:
            _write_index_dir(tmp, vectors, lines, graph, manifest)
            _swap_in(tmp, out, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(out, info["id"], exact_below=exact_below)

    def add(self, examples: Iterable[Example], embedder: Any, *, batch_size: int = 32,
            progress: bool = False, on_error: Callable[[str], None] | None = None,
            source: dict[str, Any] | None = None, subjects: str | None = None) -> BuildReport:
        """Append examples (ids already present are skipped) and rewrite the index atomically.

        `subjects` as for `build`; None: the index's own mode (its manifest's), else "auto"."""
        t0 = time.perf_counter()
        self._check_embedder(embedder)
        self.verify()  # never extend (and re-checksum) a damaged index
        old_rec = self.manifest.get("subjects") if isinstance(self.manifest.get("subjects"), dict) else {}
        if subjects is None:
            subjects = old_rec.get("mode") if old_rec.get("mode") in SUBJECT_MODES else "auto"
        mode = _check_subjects(subjects)
        stats: dict[str, Any] = {}
        vectors, kept, skipped = _embed_examples(examples, embedder, batch_size=batch_size,
                                                 progress=progress, on_error=on_error,
                                                 skip_ids=self._id_map().keys(), subjects=mode, stats=stats)
        record = _subjects_record(mode, kept, stats)
        report = BuildReport(count=len(kept), skipped=skipped, path=str(self.path), total=len(self),
                             subjects=record)
        if not kept:
            report.seconds = time.perf_counter() - t0
            return report
        import hnswlib

        n_old = len(self)
        graph = hnswlib.Index(space=SPACE, dim=self.dim)
        try:
            graph.load_index(str(self.path / GRAPH), max_elements=n_old + len(kept))
        except (RuntimeError, OSError, ValueError) as exc:
            raise ExampleIndexError(f"{self.path / GRAPH} is damaged ({exc}); "
                                    f"{_rebuild_hint(self.path, self.manifest)}") from None
        if graph.get_current_count() != n_old:
            raise ExampleIndexError(f"{self.path / GRAPH} holds {graph.get_current_count()} items but the "
                                    f"manifest says {n_old}; {_rebuild_hint(self.path, self.manifest)}")
        graph.add_items(vectors, np.arange(n_old, n_old + len(kept), dtype=np.int64))
        all_vectors = np.concatenate([np.asarray(self.vectors, dtype=np.float32), vectors])
        manifest = dict(self.manifest)
        manifest["count"] = len(all_vectors)
        manifest["updated"] = _now()
        manifest["hnswlib"] = _hnswlib_version()
        manifest["additions"] = [*manifest.get("additions", []),
                                 {"time": manifest["updated"], "count": len(kept), "source": dict(source or {}),
                                  "subjects": record}]
        manifest["subjects"] = _merge_subjects(old_rec, record, self._rows())
        lines = [*self._rows(), *(_example_line(ex) for ex in kept)]
        tmp = _temp_dir(self.path, "tmp")
        try:
            _write_index_dir(tmp, all_vectors, lines, graph, manifest)
            _swap_in(tmp, self.path, overwrite=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fresh = type(self).load(self.path, ef=self._ef, exact_below=self.exact_below)
        with self._lock:
            self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "_lock"})
        report.total = len(self)
        report.seconds = time.perf_counter() - t0
        return report

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], embedder: Any = None, *, ef: int | None = None,
             exact_below: int = DEFAULT_EXACT_BELOW) -> ExampleIndex:
        """Open an index; `embedder` (an Embedder or its id) must be the one it was built with."""
        p = Path(path)
        manifest = _read_manifest(p)
        _check_sizes(p, manifest)
        count, dim = manifest["count"], manifest["dim"]
        try:
            vectors = np.load(p / VECTORS, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise ExampleIndexError(f"the index at {p} has no {VECTORS}; {_rebuild_hint(p)}") from None
        except (ValueError, OSError) as exc:
            raise ExampleIndexError(f"{p / VECTORS} is damaged ({exc}); {_rebuild_hint(p)}") from None
        if vectors.shape != (count, dim) or vectors.dtype != np.float32:
            raise ExampleIndexError(
                f"{p / VECTORS} holds {vectors.dtype} {vectors.shape} but the manifest says float32 "
                f"({count}, {dim}); {_rebuild_hint(p)}"
            )
        _check_unit_rows(p / VECTORS, vectors, manifest)
        try:
            metadata = (p / METADATA).read_bytes()
        except FileNotFoundError:
            raise ExampleIndexError(f"the index at {p} has no {METADATA}; {_rebuild_hint(p)}") from None
        rows = metadata.count(b"\n") + (0 if not metadata or metadata.endswith(b"\n") else 1)
        if rows != count:
            raise ExampleIndexError(f"{p / METADATA} has {rows} rows but the manifest says {count}; "
                                    f"{_rebuild_hint(p)}")
        want = ((manifest.get("files") or {}).get(METADATA) or {}).get("sha256")
        if want and hashlib.sha256(metadata).hexdigest() != want:  # small: checked at every load
            raise ExampleIndexError(f"{p / METADATA} is damaged: its checksum is not the manifest's; "
                                    f"{_rebuild_hint(p, manifest)}")
        if not (p / GRAPH).is_file():
            raise ExampleIndexError(f"the index at {p} has no {GRAPH}; {_rebuild_hint(p)}")
        index = cls(p, manifest, vectors, metadata, ef=ef, exact_below=exact_below)
        if embedder is not None:
            index._check_embedder(embedder)
        return index

    def _check_embedder(self, embedder: Any) -> None:
        built_id, built_dim = str(self.manifest["embedder"]["id"]), int(self.manifest["embedder"]["dim"])
        if isinstance(embedder, str):
            given_id, given_dim = embedder, None
        else:
            given_id, given_dim = str(embedder.id), int(embedder.dim)
        if given_id == built_id and given_dim in (None, built_dim):
            return
        given = f"{given_id!r}" + ("" if given_dim is None else f" (dim {given_dim})")
        raise ExampleIndexError(
            f"the example index at {self.path} was built with embedder {built_id!r} (dim {built_dim}), "
            f"but embedder {given} was given. Rebuild the index with the same embedder "
            f"(`cropper-engine index build --embedder {given_id} ... --overwrite`) or pass the "
            f"matching `--embedder {built_id}`"
        )

    def _load_graph(self) -> Any:
        if self._graph is None:
            with self._lock:
                if self._graph is None:
                    import hnswlib

                    graph = hnswlib.Index(space=SPACE, dim=self.dim)
                    try:
                        graph.load_index(str(self.path / GRAPH))
                    except (RuntimeError, OSError, ValueError) as exc:
                        raise ExampleIndexError(f"{self.path / GRAPH} is damaged ({exc}); "
                                                f"{_rebuild_hint(self.path, self.manifest)}") from None
                    if graph.get_current_count() != len(self):
                        raise ExampleIndexError(
                            f"{self.path / GRAPH} holds {graph.get_current_count()} items but the "
                            f"manifest says {len(self)}; {_rebuild_hint(self.path, self.manifest)}"
                        )
                    graph.set_ef(self._ef)
                    self._graph = graph
        return self._graph

    # -- rows -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return (f"ExampleIndex({str(self.path)!r}, count={len(self)}, "
                f"embedder={self.embedder_id!r}, dim={self.dim})")

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def embedder_id(self) -> str:
        return str(self.manifest["embedder"]["id"])

    @property
    def ef(self) -> int:
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        self._ef = int(value)
        if self._graph is not None:
            self._graph.set_ef(self._ef)

    def _rows(self) -> list[bytes]:
        if self._lines is None:
            data = self._metadata
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            self._lines = lines
        return self._lines

    def _check_row(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the index (0..{len(self) - 1})")
        return row

    def id_of(self, row: int) -> str:
        """The example id of a row (parsed without decoding the whole row)."""
        row = self._check_row(row)
        got = self._ids.get(row)
        if got is None:
            got = self._ids[row] = _line_id(self._rows()[row])
        return got

    def example(self, row: int) -> Example:
        row = self._check_row(row)
        ex = self._examples.get(row)
        if ex is None:
            try:
                ex = Example.from_json(json.loads(self._rows()[row]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ExampleIndexError(f"row {row} of {self.path / METADATA} is damaged ({exc}); "
                                        f"{_rebuild_hint(self.path, self.manifest)}") from None
            self._examples[row] = ex
        return ex

    def __iter__(self) -> Iterator[Example]:
        return (self.example(i) for i in range(len(self)))

    def _id_map(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {self.id_of(i): i for i in range(len(self))}
        return self._row_of

    def find(self, example_id: str) -> int | None:
        """The row of an example id, or None."""
        return self._id_map().get(str(example_id))

    def verify(self) -> None:
        """Each file's SHA-256 against the manifest (indexes written before it was kept: sizes
        only). Raises ExampleIndexError naming the damaged file and the rebuild command."""
        _check_sizes(self.path, self.manifest)
        for name, rec in (self.manifest.get("files") or {}).items():
            want = rec.get("sha256") if isinstance(rec, dict) else None
            if want and _sha256(self.path / name) != want:
                raise ExampleIndexError(f"{self.path / name} is damaged: its checksum is not the manifest's; "
                                        f"{_rebuild_hint(self.path, self.manifest)}")

    def info(self) -> dict[str, Any]:
        """The manifest plus where the index is and its sizes on disk (for `index info`)."""
        files = {name: (self.path / name).stat().st_size
                 for name in (MANIFEST, GRAPH, VECTORS, METADATA) if (self.path / name).exists()}
        return {**self.manifest, "path": str(self.path), "files": files, "bytes": sum(files.values()),
                "exact_below": self.exact_below}

    def embedder_spec(self) -> str | None:
        """The spec string that builds this index's embedder again (None if not recorded)."""
        return self.manifest["embedder"].get("spec")

    def has_images(self) -> bool:
        """Whether the examples' images are on this machine (a VLM can be shown them)."""
        if self.manifest.get("has_images") is False or len(self) == 0:
            return False
        return Path(self.example(0).image_path).is_file()

    def describe(self) -> dict[str, Any]:
        """A short description for logs and `Cropper.describe()`."""
        return {"path": str(self.path), "count": len(self), "embedder": self.embedder_id,
                "source": self.manifest.get("source")}

    # -- search ---------------------------------------------------------------------------

    def query(self, vectors: np.ndarray, k: int, *, exact: bool | None = None,
              exclude: Exclude = None) -> list[list[Neighbour]]:
        """The k nearest examples of each query vector ([Q, D] or [D]), most similar first.

        exact=None searches exactly below `exact_below` rows and with HNSW above; `exclude`
        is a set of example ids or a predicate on rows (True = leave out).
        """
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"query vectors must be [Q, {self.dim}] for this index "
                             f"(embedder {self.embedder_id!r}), got shape {np.shape(vectors)}")
        if int(k) < 1:
            raise InputError(f"k must be at least 1, got {k}")
        if len(q) == 0:
            return []
        q = _normalise_queries(q)
        k = min(int(k), len(self))
        if exact is None:
            exact = len(self) < self.exact_below
        excl_ids: frozenset[str] = frozenset()
        excl_fn: Callable[[int], bool] | None = None
        if isinstance(exclude, str):
            excl_ids = frozenset([exclude])
        elif callable(exclude):
            excl_fn = exclude
        elif exclude is not None:
            excl_ids = frozenset(str(e) for e in exclude)
        fetch = min(len(self), k + len(excl_ids) + (k if excl_fn is not None else 0))
        search = self._search_exact if exact else self._search_hnsw
        rows, sims = search(q, fetch)
        out: list[list[Neighbour]] = []
        for i in range(len(q)):
            got = self._keep(rows[i], sims[i], k, excl_ids, excl_fn)
            f = fetch
            while len(got) < k and f < len(self):  # the excluded rows ate into k: fetch more
                f = min(len(self), f * 2)
                r2, s2 = search(q[i : i + 1], f)
                got = self._keep(r2[0], s2[0], k, excl_ids, excl_fn)
            out.append(got)
        return out

    def query_images(self, images: Sequence[Any], embedder: Any, k: int, *, exact: bool | None = None,
                     exclude: Exclude = None) -> list[list[Neighbour]]:
        """Embed images (paths, PIL images or arrays) with the index's embedder and query."""
        from cropper_engine.imageio import open_image

        self._check_embedder(embedder)
        pil = [open_image(im).image for im in images]
        if not pil:
            return []
        return self.query(embedder.embed(pil), k, exact=exact, exclude=exclude)

    def _keep(self, rows: np.ndarray, sims: np.ndarray, k: int, excl_ids: frozenset[str],
              excl_fn: Callable[[int], bool] | None) -> list[Neighbour]:
        got: list[Neighbour] = []
        ids = self._ids
        lines = self._rows()
        for r, s in zip(rows.tolist(), sims.tolist(), strict=True):
            if r < 0 or (excl_fn is not None and excl_fn(r)):
                continue
            ex_id = ids.get(r)
            if ex_id is None:
                ex_id = ids[r] = _line_id(lines[r])
            if ex_id in excl_ids:
                continue
            got.append(Neighbour(r, ex_id, s))
            if len(got) == k:
                break
        return got

    def _search_exact(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        rows = np.empty((len(q), fetch), dtype=np.int64)
        sims = np.empty((len(q), fetch), dtype=np.float32)
        step = max(1, (1 << 26) // max(n, 1))  # keep each [step, N] block of similarities near 256 MB
        for start in range(0, len(q), step):
            block = q[start : start + step] @ np.asarray(self.vectors).T
            if fetch < n:
                top = np.argpartition(-block, fetch - 1, axis=1)[:, :fetch]
            else:
                top = np.broadcast_to(np.arange(n), block.shape)
            top_sims = np.take_along_axis(block, top, axis=1)
            for j in range(len(block)):
                order = np.lexsort((top[j], -top_sims[j]))
                rows[start + j] = top[j][order]
                sims[start + j] = top_sims[j][order]
        return rows, sims

    def _search_hnsw(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        graph = self._load_graph()
        try:
            labels, dists = graph.knn_query(q, k=fetch)
        except RuntimeError:  # the graph found fewer than `fetch` items: fall back to exact search
            return self._search_exact(q, fetch)
        return labels.astype(np.int64), (1.0 - dists).astype(np.float32)


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


__all__ = [
    "DEFAULT_EF",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EXACT_BELOW",
    "DEFAULT_M",
    "BuildReport",
    "ExampleIndex",
    "Neighbour",
    "build_graph",
]
