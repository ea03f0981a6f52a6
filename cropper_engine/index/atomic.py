"""Atomic index writes: every file into a temporary sibling folder, each fsynced, the manifest
last; then the folder is swapped in for the old one (moved aside, then removed), so a crash never
leaves a half-written index that loads."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cropper_engine.errors import ExampleIndexError
from cropper_engine.index.format import GRAPH, MANIFEST, METADATA, VECTORS, _sha256


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
