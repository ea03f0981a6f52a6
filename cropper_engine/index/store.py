"""`ExampleIndex`: an on-disk HNSW index of example images with row-aligned metadata.

A directory holds four files (manifest, graph, vectors, metadata rows: index/format.py),
written into a temporary sibling and renamed into place (index/atomic.py). Examples are
embedded with their subject boxes on the way (index/embed.py); the vectors are unit rows and
the graph is hnswlib's (index/search.py).

Loading is cheap: vectors are memory-mapped, metadata rows are parsed on first use and the
graph is read on the first approximate query. Small indexes (< `exact_below` rows) are
searched exactly by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cropper_engine.data.example import Example
from cropper_engine.errors import ExampleIndexError, InputError
from cropper_engine.index.atomic import _check_target, _swap_in, _temp_dir, _write_index_dir
from cropper_engine.index.embed import (
    SUBJECT_MODES,
    _check_subjects,
    _embed_examples,
    _merge_subjects,
    _subjects_record,
)
from cropper_engine.index.format import (
    DEFAULT_EF,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EXACT_BELOW,
    DEFAULT_M,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    METADATA,
    SPACE,
    VECTORS,
    _check_sizes,
    _check_unit_rows,
    _embedder_info,
    _example_line,
    _hnswlib_version,
    _line_id,
    _now,
    _read_manifest,
    _rebuild_hint,
    _sha256,
)
from cropper_engine.index.search import (
    _normalise_queries,
    _normalise_rows,
    build_graph,
    search_exact,
    search_hnsw,
)
from cropper_engine.index.subjects import subject_counts

Exclude = Callable[[int], bool] | Collection[str] | str | None


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
        return search_exact(self.vectors, q, fetch)

    def _search_hnsw(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        return search_hnsw(self._load_graph(), q, fetch, self.vectors)


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
